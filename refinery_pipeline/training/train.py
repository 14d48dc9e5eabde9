"""``refine train``: train a student on ground truth or on a label store, replaying stored crops.

Layout follows torchvision's classification reference: :func:`load_data`, :func:`train_one_epoch`,
:func:`evaluate`, :func:`fit`. The label mode, loss and precision are chosen once in :func:`fit`
and passed into the step loop as objects; the loop itself has no flag branches.
"""
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.devices import resolve_device
from ..core.distributed import init_from_env, is_main
from ..core.errors import CheckpointError, RefineryError, RefineryWarning
from ..core.option_relevance import CATEGORY_WORDNET, check_options_used
from ..core.progress import progress_bar
from ..loaders.replay import make_loader
from ..models.checkpoints import file_sha256, load_trained_model, save_checkpoint
from ..models.registry import OptionNames, check_input_size, create_model
from ..models.tensors import normalize, to_pixels
from ..sources.data_cache import open_dataset
from ..store.label_store import LabelStore
from .config import TrainConfig
from .data import (_conversion, _fresh_crops, _val_data, _warn_if_warmup_outlasts_the_run,
                   load_data, model_classes)
from .evaluation import data_ids, evaluate
from .losses import get_loss
from .precise_bn import lagging_statistics_memory, recompute_from_loader
from .run_dir import (_check_epochs, _check_epochs_left, _check_run_dir, _check_same_run, _log,
                      _maybe_resume, _record_run, _saved_config)
from .schedule import lr_factor
from .steps import AdversarialStep, NaturalStep
from .targets import CategoryTargets
from .wordnet import wordnet_reader

# ----------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------- steps

def train_one_epoch(model, loader, targets, loss_fn, optimizer, scheduler, device, num_classes,
                    channels_last=True, progress=False, desc="train", step=NaturalStep()):
    """One pass over ``loader``; returns mean loss, train top-1 and per-class train accuracy (on
    the crops as shown), plus what ``step`` reports (see :mod:`.steps`)."""
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros(num_classes, device=device)
    seen = torch.zeros(num_classes, device=device)
    verdicts = ExactCount()
    for batch in progress_bar(loader, enabled=progress, desc=desc, leave=False):
        verdicts.add(batch)  # on the host, before the batch moves
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
            "train_per_class": per_class, **verdicts.summary(), **step.summary()}


class ExactCount:
    """How many crops of an epoch were exact (cut from the bytes the refinery decoded) and how
    many approximate, from each batch's ``exact`` (crops replaying a store carry it)."""

    def __init__(self):
        self.exact = self.total = 0

    def add(self, batch):
        if batch.exact is not None:
            self.exact += int(batch.exact.sum())
            self.total += len(batch.exact)

    def summary(self) -> dict:
        if not self.total:
            return {}
        return {"crops_exact": self.exact, "crops_approximate": self.total - self.exact}


# ----------------------------------------------------------------------------- fit

def fit(cfg: TrainConfig) -> dict:
    """Train, evaluate, checkpoint. Writes ``config.json``, ``metrics.jsonl``, ``last.pt`` (for
    ``--resume``) and ``model.pt`` (loadable as a refinery) under ``cfg.out_dir``.

    Every refusal comes before the first byte is written: a refused run leaves ``cfg.out_dir``
    as it was (or absent)."""
    check_options_used("train", cfg)  # an option this run would ignore: refused
    _check_adversarial(cfg)
    _check_label_mode(cfg)
    _check_precise_bn(cfg)
    _check_epochs(cfg)
    _warn_if_warmup_outlasts_the_run(cfg)
    out = Path(cfg.out_dir)
    _check_run_dir(cfg, out)
    saved = _saved_config(out) if cfg.resume else None
    _check_same_run(out, saved, {k: v for k, v in asdict(cfg).items() if k != "res"})
    device = resolve_device(cfg.device)
    init_from_env(device)
    torch.manual_seed(cfg.seed)
    train_ds, train_loader, val_loader, targets, res = load_data(cfg, device)
    copy = getattr(train_loader, "join", None)
    classes = model_classes(LabelStore.open(cfg.labels) if cfg.labels else None, train_ds)
    check_input_size(cfg.arch, res)  # a fixed-size arch (vit_b_16) at another --res: one line
    model = create_model(cfg.arch, len(classes))
    run_config = {**asdict(cfg), "res": res, "classes": classes,
                  "train_images": len(train_loader.indices),
                  "init_sha256": _initialise(model, cfg, classes) if cfg.init else None,
                  "conversion": _conversion(cfg).recorded(),  # its frames, for refine evaluate
                  "data_ids": data_ids(train_ds, open_dataset(_val_data(cfg), "val",
                                                              cfg.cache_dir, _conversion(cfg))),
                  **_copy_record(copy)}
    _check_same_run(out, saved, run_config)  # again, with what only the data tells
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        cfg.lr_scheduler, len(train_loader), cfg.epochs, cfg.warmup_epochs, cfg.lr_step_size,
        cfg.lr_gamma, cfg.lr_milestones))
    start_epoch = _maybe_resume(cfg, out, model, optimizer, scheduler)
    _check_epochs_left(cfg, out, start_epoch)
    _warn_if_bn_statistics_lag(cfg, model, len(train_loader) * cfg.epochs)
    train_loader.next_epoch = start_epoch
    step_model = _wrap(model, cfg, device)
    loss_fn = get_loss(cfg.loss)
    step = _training_step(cfg, targets)
    bn_loader = _bn_statistics_loader(cfg, train_ds, res) if cfg.precise_bn else None
    if is_main():
        _record_run(out, run_config, start_epoch)
        if isinstance(targets, CategoryTargets):  # what every crop of class c was trained on
            np.save(out / "category_targets.npy", targets.table.cpu().numpy())
    record = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        record = train_one_epoch(step_model, train_loader, targets, loss_fn, optimizer, scheduler,
                                 device, len(classes), cfg.channels_last,
                                 cfg.progress and is_main(), f"epoch {epoch + 1}/{cfg.epochs}",
                                 step)
        record.update(epoch=epoch + 1, epoch_seconds=time.perf_counter() - t0,
                      lr=scheduler.get_last_lr()[0], **_copy_epoch(copy))
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


def _copy_record(copy) -> dict:
    """What a run's config records of a copy joined by key: every count of the join."""
    return {} if copy is None or copy.keys is None else {"copy": copy.counts()}


def _copy_epoch(copy) -> dict:
    """What each epoch's log line says of a copy joined by key: the store images it lacked
    and those skipped in all (missing, reframed, unreplayable); the crops' exact and
    approximate counts come from the batches (:func:`train_one_epoch`)."""
    if copy is None or copy.keys is None:
        return {}
    return {"images_missing": copy.missing, "images_skipped": copy.skipped}


def _initialise(model, cfg: TrainConfig, classes: list) -> str:
    """``--init``: start from trained weights of the same architecture and classes instead of
    a random initialisation (the paper's Table 3 starts its adversarial students from the refined
    model). Any layout ``--weights`` takes; another architecture or class set is one line.
    Returns the SHA-256 of the weights file, as a label store identifies its refinery."""
    trained, ckpt = load_trained_model(cfg.init, cfg.arch, classes,
                                       trust_checkpoint=cfg.trust_checkpoint,
                                       option_names=OptionNames("--arch", "--res"))
    try:
        model.load_state_dict(trained.state_dict())
    except RuntimeError:  # e.g. an ImageNet-1k model whose outputs were selected for a subset
        raise CheckpointError(f"{cfg.init}: its weights do not fit a {cfg.arch} for these "
                              f"{len(classes)} classes; --init needs a checkpoint of this "
                              "architecture trained on these classes") from None
    return file_sha256(ckpt["file"])


def _check_adversarial(cfg: TrainConfig):
    """A negative step is no step (that adversarial twins need a --teacher is a row of
    :data:`.option_relevance.OPTION_USES`). Checked before any data is read or converted."""
    if cfg.adversarial_eta < 0:
        raise RefineryError(f"--adversarial-eta {cfg.adversarial_eta}: adversarial jittering "
                            "needs a positive step; pass e.g. 50, or 0 for off")


def _check_label_mode(cfg: TrainConfig):
    """WordNet's category labels need WordNet: a missing or damaged database is reported before
    any data is read (which labels each mode reads is :data:`.option_relevance.OPTION_USES`)."""
    if cfg.label_mode == CATEGORY_WORDNET:
        wordnet_reader()


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
                           channels_last=cfg.channels_last, bn=cfg.adversarial_bn)


def _wrap(model, cfg, device):
    if torch.distributed.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if cfg.compile else model


# ----------------------------------------------------------------------------- run directory
