"""``refine train``: train a student on ground truth or on a label store, replaying stored crops.

Layout follows torchvision's classification reference: :func:`load_data`, :func:`train_one_epoch`,
:func:`evaluate`, :func:`fit`. The label mode, loss and precision are chosen once in :func:`fit`
and passed into the step loop as objects; the loop itself has no flag branches.
"""
import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .crop_plan import DEFAULT_SLOT_POLICY, PARITY_VIEWS_PER_CROP, CropPlan, crops_for_parity
from .dataset import open_dataset
from .distributed import init_from_env, is_main
from .errors import RefineryError, RefineryWarning
from .label_store import DEFAULT_TOP_K, LabelStore
from .losses import get_loss
from .models import (check_input_size, create_model, normalize, save_checkpoint, to_model_input,
                     to_pixels)
from .precise_bn import lagging_statistics_memory, recompute_from_loader
from .progress import progress_bar
from .refinery import autocast_for
from .replay import FixedCrops, FreshCrops, ReplayedCrops, make_loader
from .schedule import lr_factor
from .steps import AdversarialStep, NaturalStep
from .targets import GroundTruthTargets, HardTargets, OnlineTargets, StoredTargets


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out_dir: str
    labels: str = None          # label store location; None trains on ground truth
    arch: str = "resnet18"
    epochs: int = 16
    batch_size: int = 256
    lr: float = 0.4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    lr_scheduler: str = "linear"  # decay after the warm-up: linear, cosine or step
    lr_step_size: int = 30      # step: epochs between decays
    lr_gamma: float = 0.1       # step: factor per decay
    label_smoothing: float = 0.0
    label_mode: str = "soft"    # 'soft', 'hard' (arg-max) or 'static' (whole-image label)
    teacher: str = None         # online refinery checkpoint: labels every crop as it is shown
    teacher_bn: str = "train"
    teacher_crops: str = "fresh"  # 'fresh' random crops, or 'replay' the store's crops (parity)
    loss: str = "kl"
    adversarial_eta: float = 0.0  # > 0: also train on adversarial twins (needs a teacher)
    precise_bn: int = 0         # > 0: recompute BN statistics over this many batches before eval
    rest: str = "uniform"       # where the mass outside the stored top-k goes
    slot_policy: str = DEFAULT_SLOT_POLICY  # or "random": an independent slot every epoch
    res: int = None             # crop size; defaults to the store's refinery input size, else 224
    workers: int = 2
    seed: int = 0
    eval_every: int = 1
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    resume: bool = False
    allow_partial: bool = False
    cache_dir: str = None
    progress: bool = True


def resolve_device(name: str) -> torch.device:
    import os
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- data

def load_data(cfg: TrainConfig, device):
    """Data sets, loaders and the target source for ``cfg``."""
    train_ds = open_dataset(cfg.data, "train", cfg.cache_dir, num_workers=cfg.workers)
    val_ds = open_dataset(_val_location(cfg.data), "val", cfg.cache_dir, num_workers=cfg.workers)
    if val_ds.classes != train_ds.classes:
        raise RefineryError(f"{val_ds.path}: validation classes differ from the training classes; "
                            "give both splits the same class folders")
    store = _open_store(cfg, train_ds)
    teacher = _online_refinery(cfg, train_ds.classes, store, device)
    res = cfg.res or _default_res(store, teacher)
    _warn_if_resampled(cfg, store, res)
    _warn_if_crops_overused(cfg, store)
    _warn_if_labels_truncated(cfg, store, len(train_ds.classes))
    crops, records = _crop_source(cfg, train_ds, store)
    targets = _target_source(cfg, len(train_ds.classes), device, records, teacher)
    # --allow-partial: train only on images whose chunk is done
    indices = None
    if store is not None and cfg.allow_partial:
        indices = np.flatnonzero(store.done_images())
    train_loader = make_loader(train_ds, crops, (res, res), cfg.batch_size, cfg.workers,
                               train=True, seed=cfg.seed, indices=indices,
                               distributed=torch.distributed.is_initialized())
    val_loader = make_loader(val_ds, FixedCrops(val_ds.heights, val_ds.widths), (res, res),
                             cfg.batch_size, cfg.workers, train=False)
    return train_ds, train_loader, val_loader, targets, res


def _open_store(cfg: TrainConfig, train_ds):
    if cfg.labels is None:
        return None
    store = LabelStore.open(cfg.labels)
    store.check_matches(train_ds.fingerprint())  # cached fingerprint: well under a second
    store.require_complete(cfg.allow_partial)
    return store


def _online_refinery(cfg: TrainConfig, classes: list, store, device):
    """The ``--teacher`` refinery (None without one), loaded once: its recorded input size is
    also the default crop size."""
    if cfg.teacher is None:
        return None
    from .refinery import Refinery
    size = cfg.res or (store.refinery.input_size if store is not None else None)
    return Refinery.from_checkpoint(cfg.teacher, classes=classes, input_size=size,
                                    bn_mode=cfg.teacher_bn, device=device, compile=cfg.compile)


def _default_res(store, teacher) -> int:
    """Crop size: the store's (so replayed pixels are the labelled pixels), the teacher's, 224."""
    if store is not None:
        return store.refinery.input_size
    if teacher is not None:
        return teacher.input_size  # the checkpoint's, else 224
    return 224


def _warn_if_resampled(cfg: TrainConfig, store, res: int):
    """A replayed box shown at another size than it was labelled at is the same region but not
    the same pixels: allowed (a deliberate resolution change), but never silently."""
    if store is None or (cfg.teacher is not None and cfg.teacher_crops == "fresh"):
        return
    labelled = store.refinery.input_size
    if res != labelled and is_main():
        warnings.warn(f"{cfg.labels}: labels were computed on {labelled} px crops but training "
                      f"shows them at {res} px; omit --res to replay the labelled pixels",
                      RefineryWarning, stacklevel=2)


def _warn_if_crops_overused(cfg: TrainConfig, store):
    """Too few stored crops for the schedule costs accuracy against an online refinery; say how
    many crops would not, since the fix (a larger K) is a precompute away."""
    if store is None or cfg.teacher is not None or cfg.label_mode == "static":
        return
    k, needed = store.layout.crops_per_image, crops_for_parity(cfg.epochs)
    if k < needed and is_main():
        warnings.warn(f"{cfg.labels}: {cfg.epochs} epochs replay each of its {k} crops per image "
                      f"{cfg.epochs / k:.1f} times; more than {PARITY_VIEWS_PER_CROP} costs accuracy "
                      f"against an online refinery (precompute with -K {needed} or more)",
                      RefineryWarning, stacklevel=2)


def _warn_if_labels_truncated(cfg: TrainConfig, store, num_classes: int):
    """Dropping all but the top few classes of each label cost accuracy against an online
    refinery; say how many classes to store, as for K."""
    if store is None or cfg.teacher is not None or cfg.label_mode == "hard":
        return
    k, needed = store.layout.top_k, min(num_classes, DEFAULT_TOP_K)
    if k < needed and is_main():
        warnings.warn(f"{cfg.labels}: keeps the top {k} of {num_classes} classes per crop; fewer "
                      f"than {needed} cost accuracy against an online refinery (precompute with "
                      f"--top-k {needed})", RefineryWarning, stacklevel=2)


def _warn_if_bn_statistics_lag(cfg: TrainConfig, model, steps: int):
    """Slow BatchNorm momentum in a short run evaluates below the weights (MobileNetV3-small,
    momentum 0.01: 15-28 points low after 584 steps, 0.2-0.7 after 2336, none after 4672); the
    fix is a flag away."""
    memory = lagging_statistics_memory(model, steps)
    if cfg.precise_bn or not memory or not is_main():
        return
    warnings.warn(f"--arch {cfg.arch}: its BatchNorm running statistics average over ~{memory:.0f} "
                  f"steps, {memory / steps:.1%} of this {steps}-step run, so evaluation will read "
                  "them stale (pass --precise-bn 100)", RefineryWarning, stacklevel=2)


def _crop_source(cfg: TrainConfig, train_ds, store):
    """Replay the store's crops, or draw fresh seeded crops every epoch."""
    fresh = store is None or (cfg.teacher is not None and cfg.teacher_crops == "fresh")
    if cfg.teacher is not None and cfg.teacher_crops == "replay" and store is None:
        raise RefineryError("--teacher-crops replay needs --labels STORE to replay; pass a store "
                            "or use --teacher-crops fresh")
    if fresh:
        return _fresh_crops(cfg, train_ds), None
    records = store.read_crops(static=cfg.label_mode == "static")
    return ReplayedCrops(records.boxes, records.flips, cfg.seed, cfg.slot_policy), records


def _fresh_crops(cfg: TrainConfig, train_ds) -> FreshCrops:
    """A new seeded RandomResizedCrop box and flip per training image every epoch."""
    return FreshCrops(CropPlan(seed=cfg.seed), train_ds.heights, train_ds.widths)


def _target_source(cfg: TrainConfig, num_classes: int, device, records, teacher):
    """Ground truth, stored labels (dynamic or static) or an online teacher; hard if asked."""
    if teacher is not None:
        source = OnlineTargets(teacher)
    elif records is None:
        return GroundTruthTargets(num_classes, cfg.label_smoothing)
    elif cfg.label_mode == "static":
        return StoredTargets(records.static_indices, records.static_probs, num_classes,
                             device, cfg.rest)
    else:
        source = StoredTargets(records.topk_indices, records.topk_probs, num_classes, device,
                               cfg.rest)
    return HardTargets(source) if cfg.label_mode == "hard" else source


def _val_location(data):
    """The validation split: ``DATA/val`` for a tree, ``X_val.beton`` beside ``X_train.beton``."""
    p = Path(data)
    if p.suffix == ".beton":
        head, found, tail = p.name.rpartition("train")  # the last one: 'mytrainset_train.beton'
        guess = p.with_name(head + "val" + tail) if found else p
        if guess == p or not guess.is_file():
            raise RefineryError(f"{p}: cannot find its validation .beton; name the pair "
                                "'<name>train.beton' and '<name>val.beton', or pass an ImageFolder "
                                "tree with train/ and val/")
        return guess
    if not (p / "val").is_dir():
        raise RefineryError(f"{p}: no val/ folder; training evaluates on DATA/val (ImageFolder)")
    return p


# ----------------------------------------------------------------------------- steps

def train_one_epoch(model, loader, targets, loss_fn, optimizer, scheduler, device, num_classes,
                    channels_last=True, progress=False, desc="train", step=NaturalStep()):
    """One pass over ``loader``; returns mean loss, train top-1 and per-class train accuracy (on
    the crops as shown), plus what ``step`` reports (see :mod:`.steps`)."""
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros(num_classes, device=device)
    seen = torch.zeros(num_classes, device=device)
    for batch in progress_bar(loader, enabled=progress, desc=desc, leave=False):
        batch = batch.to(device)
        labels = batch.labels
        pixels = to_pixels(batch.images, device)  # one copy, shared with an online refinery
        x = normalize(pixels, channels_last=channels_last)
        target = targets(batch, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss, logits = step(model, x, target, loss_fn)
        optimizer.step()
        scheduler.step()
        total_loss += loss
        hit = (logits.argmax(1) == labels).float()
        correct.index_add_(0, labels, hit)
        seen.index_add_(0, labels, torch.ones_like(hit))
    per_class = (100 * correct / seen.clamp_min(1)).tolist()  # the only CPU-GPU sync per epoch
    return {"train_loss": total_loss.item() / max(1, len(loader)),
            "train_top1": 100 * correct.sum().item() / max(1, seen.sum().item()),
            "train_per_class": per_class, **step.summary()}


@torch.no_grad()
def evaluate(model, loader, device, num_classes, channels_last=True):
    """Top-1, top-5 and per-class top-1 (percent) on a single centred crop per image."""
    model.eval()
    correct1 = torch.zeros(num_classes, device=device)
    correct5 = torch.zeros((), device=device)
    seen = torch.zeros(num_classes, device=device)
    for batch in loader:
        labels = batch.labels.to(device)
        with autocast_for(device):
            logits = model(to_model_input(batch.images, device, channels_last=channels_last))
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1.index_add_(0, labels, (top[:, 0] == labels).float())
        correct5 += (top == labels[:, None]).any(1).sum()
        seen.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float))
    n = seen.sum().item()
    return {"val_top1": 100 * correct1.sum().item() / n, "val_top5": 100 * correct5.item() / n,
            "val_per_class": (100 * correct1 / seen.clamp_min(1)).tolist()}


# ----------------------------------------------------------------------------- fit

def fit(cfg: TrainConfig) -> dict:
    """Train, evaluate, checkpoint. Writes ``config.json``, ``metrics.jsonl``, ``last.pt`` (for
    ``--resume``) and ``model.pt`` (loadable as a refinery) under ``cfg.out_dir``."""
    _check_adversarial(cfg)
    _check_precise_bn(cfg)
    device = resolve_device(cfg.device)
    init_from_env(device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_ds, train_loader, val_loader, targets, res = load_data(cfg, device)
    classes = train_ds.classes
    check_input_size(cfg.arch, res)  # a fixed-size arch (vit_b_16) at another --res: one line
    model = create_model(cfg.arch, len(classes)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        cfg.lr_scheduler, len(train_loader), cfg.epochs, cfg.warmup_epochs, cfg.lr_step_size,
        cfg.lr_gamma))
    start_epoch = _maybe_resume(cfg, out, model, optimizer, scheduler)
    _warn_if_bn_statistics_lag(cfg, model, len(train_loader) * cfg.epochs)
    train_loader.next_epoch = start_epoch
    step_model = _wrap(model, cfg, device)
    loss_fn = get_loss(cfg.loss)
    step = _training_step(cfg, targets)
    bn_loader = _bn_statistics_loader(cfg, train_ds, res) if cfg.precise_bn else None
    if is_main():
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "res": res,
                                                     "classes": classes}, indent=1))
    record = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        record = train_one_epoch(step_model, train_loader, targets, loss_fn, optimizer, scheduler,
                                 device, len(classes), cfg.channels_last,
                                 cfg.progress and is_main(), f"epoch {epoch + 1}/{cfg.epochs}",
                                 step)
        record.update(epoch=epoch + 1, epoch_seconds=time.perf_counter() - t0,
                      lr=scheduler.get_last_lr()[0])
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            if bn_loader is not None:
                record["precise_bn_batches"] = _recompute_bn(model, bn_loader, epoch, cfg, device)
            record.update(evaluate(model, val_loader, device, len(classes), cfg.channels_last))
        if is_main():
            _log(out, record, cfg.progress)
            save_checkpoint(out / "last.pt", model, cfg.arch, classes, res, epoch=epoch + 1,
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            torch_rng=torch.get_rng_state())
    if is_main():
        save_checkpoint(out / "model.pt", model, cfg.arch, classes, res, metrics=record)
    return record


def _check_adversarial(cfg: TrainConfig):
    """Adversarial twins need labels of pixels no store holds: only an online refinery has them.
    Checked before any data is read or converted."""
    if cfg.adversarial_eta and (cfg.adversarial_eta < 0 or cfg.teacher is None):
        raise RefineryError(f"--adversarial-eta {cfg.adversarial_eta}: adversarial jittering "
                            "needs a positive step and an online refinery to label the perturbed "
                            "crops; pass --teacher CHECKPOINT")


def _check_precise_bn(cfg: TrainConfig):
    if cfg.precise_bn < 0:
        raise RefineryError(f"--precise-bn {cfg.precise_bn}: give the number of training batches "
                            "to recompute BatchNorm statistics over (e.g. 100), or 0 for off")


def _bn_statistics_loader(cfg: TrainConfig, train_ds, res: int):
    """Fresh random training crops for precise BN, from a loader of their own so the training
    loader's epochs (and with them resume) are untouched."""
    return make_loader(train_ds, _fresh_crops(cfg, train_ds), (res, res), cfg.batch_size,
                       cfg.workers, train=True, seed=cfg.seed,
                       distributed=torch.distributed.is_initialized())


def _recompute_bn(model, loader, epoch: int, cfg: TrainConfig, device) -> int:
    """Precise BN before an evaluation, over ``cfg.precise_bn`` batches of this epoch's crops
    (seeded by epoch, so a resumed run recomputes the same statistics)."""
    loader.next_epoch = epoch
    return recompute_from_loader(model, loader, cfg.precise_bn, device, cfg.channels_last)


def _training_step(cfg: TrainConfig, targets):
    if not cfg.adversarial_eta:
        return NaturalStep()
    return AdversarialStep(targets.label_pixels, cfg.adversarial_eta,
                           channels_last=cfg.channels_last)


def _wrap(model, cfg, device):
    if torch.distributed.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if cfg.compile else model


def _maybe_resume(cfg, out, model, optimizer, scheduler) -> int:
    last = out / "last.pt"
    if not cfg.resume or not last.is_file():
        return 0
    state = torch.load(last, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"])


def _log(out: Path, record: dict, echo: bool):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if echo:
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()
                 if not k.endswith("per_class")}
        print(json.dumps(shown), flush=True)


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    return replace(cfg, **kw)
