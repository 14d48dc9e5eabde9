"""A plain PyTorch loop on a label store: StoreCropDataset + DataLoader + CropCollate.

Each epoch replays every image's stored crop for that epoch with its stored top-k label; the
sparse labels become dense targets on the device, trained with KL divergence. Under torchrun
it shards with DistributedSampler (image n replays the same slot on any rank).

    python examples/plain_pytorch.py labels.zarr imagenet/train --epochs 2
"""
import argparse
import os

import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

import refinery_pipeline as refinery

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("store"), parser.add_argument("data", help=".beton or ImageFolder tree")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--limit-steps", type=int, default=0, help="steps per epoch at most")
args = parser.parse_args()
if "LOCAL_RANK" in os.environ:  # launched by torchrun: one process per device
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    args.device = f"cuda:{os.environ['LOCAL_RANK']}" if args.device == "cuda" else args.device

store = refinery.open_store(args.store)
num_classes = store.num_classes
transform = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
dataset = refinery.StoreCropDataset(store, args.data, transform)
sampler = DistributedSampler(dataset) if dist.is_initialized() else None
loader = DataLoader(dataset, args.batch_size, shuffle=sampler is None, sampler=sampler,
                    num_workers=2, collate_fn=refinery.CropCollate(), drop_last=True)
model = torchvision.models.resnet18(num_classes=num_classes).to(args.device)
if sampler is not None:
    model = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)

for epoch in range(args.epochs):
    dataset.set_epoch(epoch)  # which stored crop each image replays this epoch
    if sampler is not None:
        sampler.set_epoch(epoch)  # the shuffle
    total, steps = 0.0, 0
    for batch in loader:
        images = batch.images.to(args.device, non_blocking=True)
        targets = refinery.dense_targets(batch.targets, num_classes, device=args.device)
        loss = refinery.kl_divergence(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
        if steps == args.limit_steps:
            break
    print(f"epoch {epoch}: mean loss {total / max(steps, 1):.4f}", flush=True)
