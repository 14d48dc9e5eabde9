"""torchrun support: rank, world size and barriers that degrade to no-ops in a single process.
(Each rank reads only its own share of the label store per epoch: :mod:`.epoch_reads`.)"""
import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device = None) -> tuple:
    """``(rank, world_size)``; starts a process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        use_nccl = device is not None and device.type == "cuda"
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
