"""``refine train``: train a student on ground truth or on a label store, replaying stored crops.

Layout follows torchvision's classification reference: :func:`load_data`, :func:`train_one_epoch`,
:func:`evaluate`, :func:`fit`. The label mode, loss and precision are chosen once in :func:`fit`
and passed into the step loop as objects; the loop itself has no flag branches.
"""
import itertools
import json
import math
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.devices import resolve_device
from ..core.distributed import init_from_env, is_main, world_size
from ..core.errors import (CheckpointError, DataSetError, IncompleteStoreError, RefineryError,
                           RefineryWarning, RunError)
from ..core.option_relevance import CATEGORY_VISUAL, CATEGORY_WORDNET, check_options_used
from ..core.progress import progress_bar
from ..labelling.refinery import autocast_for
from ..loaders.replay import (ClassMap, FixedCrops, FreshCrops, StoreRows, make_loader,
                              replayed_crops)
from ..models.checkpoint_safety import load_weights_file
from ..models.checkpoints import file_sha256, load_trained_model, save_checkpoint
from ..models.registry import OptionNames, check_input_size, create_model
from ..models.tensors import normalize, to_model_input, to_pixels
from ..plan.augment import Recipe, plan_augment
from ..plan.crop_plan import DEFAULT_SLOT_POLICY, PARITY_VIEWS_PER_CROP, CropPlan, crops_for_parity
from ..sources.data_cache import open_dataset
from ..sources.dataset import check_cap_applies, conversion_options
from ..store.label_store import DEFAULT_TOP_K, LabelStore
from .evaluation import data_ids
from .losses import DEFAULT_REST, get_loss
from .precise_bn import lagging_statistics_memory, recompute_from_loader
from .schedule import few_steps_problem, lr_factor, milestone_problem, warmup_problem
from .steps import AdversarialStep, NaturalStep
from .targets import (CategoryTargets, GroundTruthTargets, HardTargets, OnlineTargets,
                      StoredTargets, store_category_table)
from .wordnet import DEFAULT_TEMPERATURE, wordnet_category_table, wordnet_reader


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
    lr_scheduler: str = "linear"  # decay after the warm-up: linear, cosine, step or multistep
    lr_step_size: int = 30      # step: epochs between decays
    lr_gamma: float = 0.1       # step, multistep: factor per decay
    lr_milestones: tuple = ()   # multistep: the epochs at which the LR is multiplied by lr_gamma
    label_smoothing: float = 0.0
    label_mode: str = "soft"    # 'soft', 'hard' (arg-max), 'static' (whole-image label) or
    #                             'category-visual' (each class's mean stored label) or
    #                             'category-wordnet' (WordNet similarity of the class names)
    wordnet_temperature: float = DEFAULT_TEMPERATURE  # category-wordnet: softmax(wup / this)
    teacher: str = None         # online refinery checkpoint: labels every crop as it is shown
    #                             (a tuple of several: an ensemble, the mean of their labels)
    init: str = None            # student weights to start from (paper Table 3: the refined model)
    teacher_arch: str = None    # the teacher's architecture, where its checkpoint records none
    teacher_bn: str = "train"
    augment: tuple = ()         # recipe after crop and flip (augment.Recipe names); a store's own
    teacher_crops: str = "fresh"  # 'fresh' random crops, or 'replay' the store's crops (parity)
    loss: str = "kl"
    adversarial_eta: float = 0.0  # > 0: also train on adversarial twins (needs a teacher)
    adversarial_bn: str = "separate"  # or "shared": twins in the natural crops' BN batch (paper)
    precise_bn: int = 0         # > 0: recompute BN statistics over this many batches before eval
    rest: str = DEFAULT_REST    # where the mass outside the stored top-k goes
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
    allow_missing: bool = False  # a keyed store's images a copy (DATA) lacks: skipped
    val: str = None             # the validation data; None: DATA's val/ or its '*val.beton'
    skip_store_check: bool = False  # only after a passing `refine verify` of the same bytes
    trust_checkpoint: bool = False  # load weights files that run code to load (trusted ones only)
    cache_dir: str = None
    max_resolution: int = None  # cap a tree's longer side; None: the store's record, else keep
    progress: bool = True
    # how DATA's kind of source is read (sources.open_source options: label_column, classes...)
    source_options: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- data

def load_data(cfg: TrainConfig, device):
    """Data sets, loaders and the target source for ``cfg``.

    The validation split is located and opened first: converting a large ``train/`` tree takes
    minutes, and a missing or unreadable ``val/`` must not be reported only after that. A store
    is joined with the training data (by key for a keyed store and a copy of its data set, else
    by position) before any refinery is loaded, so a copy lacking images is refused first."""
    options = _conversion(cfg)
    val_ds = open_dataset(_val_data(cfg), "val", cfg.cache_dir, options, cfg.workers)
    train_ds = open_dataset(cfg.data, "train", cfg.cache_dir, options, cfg.workers,
                            **cfg.source_options)
    store = _open_store(cfg, train_ds)
    copy = _join(cfg, store, train_ds)
    classes = model_classes(store, train_ds)
    val_classes = _val_class_map(val_ds, classes, copy)
    indices = _trained_images(cfg, store, copy)
    world = world_size()
    images = train_ds.num_images if indices is None else len(indices)
    _check_an_epoch_trains(cfg, images, world)
    _warn_if_few_steps(cfg, images, world)
    teacher = _online_refinery(cfg, classes, store, device)
    res = cfg.res or _default_res(store, teacher)
    _warn_if_resampled(cfg, store, res)
    _warn_if_crops_overused(cfg, store)
    _warn_if_labels_truncated(cfg, store, len(classes))
    crops = _crop_source(cfg, train_ds, store, res, copy)
    _warn_if_rest_flattens(cfg, store, len(classes))
    labels = store.read_labels() if store is not None else train_ds.labels
    targets = _target_source(cfg, classes, device, store, crops, teacher, labels)
    train_loader = make_loader(train_ds, crops, (res, res), cfg.batch_size, cfg.workers,
                               train=True, seed=cfg.seed, indices=indices,
                               distributed=torch.distributed.is_initialized())
    if _labels_per_crop(cfg, store):  # each batch brings its crops' labels, of its epoch
        train_loader.records = crops
    if copy is not None:  # batches carry store rows, the store's classes and exact
        train_loader.relabel = StoreRows.of(copy, train_ds.num_images, labels)
        train_loader.join = copy
    val_loader = make_loader(val_ds, FixedCrops(val_ds.heights, val_ds.widths), (res, res),
                             cfg.batch_size, cfg.workers, train=False)
    val_loader.relabel = val_classes
    return train_ds, train_loader, val_loader, targets, res


def model_classes(store, train_ds) -> list:
    """The classes the student learns: the store's (a copy of its data set may name or number
    them otherwise), else the training data's."""
    return store.classes if store is not None else train_ds.classes


def _join(cfg: TrainConfig, store, train_ds):
    """The store's rows in the training ``.beton`` (:func:`.copies.join_beton`): a keyed store
    joins any keyed copy by key (refusing missing images unless ``--allow-missing``), an
    unkeyed one takes its own ``.beton`` by position, checked by fingerprint. None without a
    store."""
    if store is None:
        return None
    from ..loaders.copies import join_beton
    recipe = plan_augment(store.plan, store.layout.num_images, store.refinery.input_size)
    return join_beton(store, train_ds, recipe=recipe, allow_missing=cfg.allow_missing)


def _val_class_map(val_ds, classes: list, copy):
    """How the validation labels become the model's classes: as they are where the names and
    order agree; through a :class:`.replay.ClassMap` where a copy of a keyed store's data set
    orders the same names otherwise; else refused."""
    if val_ds.classes == classes:
        return None
    keyed = copy is not None and copy.keys is not None
    if keyed and sorted(val_ds.classes) == sorted(classes):
        return ClassMap([classes.index(name) for name in val_ds.classes])
    theirs = "the store's" if keyed else "the training"
    raise RefineryError(f"{val_ds.path}: validation classes differ from {theirs} classes; give "
                        "both splits the same class folders")


def _conversion(cfg: TrainConfig):
    """How a tree is converted: as the store's labels were made (its recorded
    ``--max-resolution``), and validation as training, so both are seen in one frame."""
    check_cap_applies(cfg.data, cfg.max_resolution)
    source = LabelStore.open(cfg.labels).dataset.source if cfg.labels is not None else None
    return conversion_options(source, cfg.max_resolution)


def _trained_images(cfg: TrainConfig, store, copy):
    """The training ``.beton``'s items to train on: those holding the store rows the copy
    gives (all, for the store's own ``.beton``) and, with ``--allow-partial``, whose chunk is
    done; None: every item."""
    if store is None or (copy.keys is None and not cfg.allow_partial):
        return None
    rows = copy.rows
    if cfg.allow_partial:
        rows = rows[store.done_images()[rows]]
    return copy.copy_index[rows]


def _check_an_epoch_trains(cfg: TrainConfig, images: int, world: int = 1):
    """Training drops each rank's last incomplete batch, so fewer images per rank than
    ``--batch-size`` would train 0 steps per epoch, log a loss of 0 and save an untrained model
    that looks like any other: refuse, naming the sizes."""
    per_rank = -(-images // world)  # FFCV shards like DistributedSampler: padded to equal shares
    if per_rank >= cfg.batch_size:
        return
    if images == 0:
        raise IncompleteStoreError(f"{cfg.labels}: no chunk is finished, so --allow-partial has "
                                   "no image to train on; rerun `refine precompute` to write some")
    partial = cfg.labels is not None and cfg.allow_partial
    where = f"{cfg.labels}: its finished chunks hold" if partial else f"{cfg.data}: holds"
    ranks = f", {per_rank} per rank on {world} ranks" if world > 1 else ""
    raise DataSetError(f"{where} {images} training images{ranks}, fewer than --batch-size "
                       f"{cfg.batch_size}, so every epoch would train 0 steps (incomplete batches "
                       f"are dropped); pass --batch-size {per_rank} or less")


def _warn_if_few_steps(cfg: TrainConfig, images: int, world: int = 1):
    """An epoch of very few SGD steps gives a per-epoch schedule (warm-up, decay) too few steps
    to follow: the defaults on 500 images took one step per epoch and diverged. Allowed (a quick
    try on tiny data), never silent."""
    problem = few_steps_problem(images, world, cfg.batch_size, cfg.lr, cfg.epochs)
    if problem and is_main():
        warnings.warn(problem, RefineryWarning, stacklevel=2)


def _warn_if_warmup_outlasts_the_run(cfg: TrainConfig):
    """A warm-up longer than the run never reaches --lr and never decays."""
    problem = warmup_problem(cfg.warmup_epochs, cfg.epochs)
    if problem and is_main():
        warnings.warn(problem, RefineryWarning, stacklevel=2)


def _open_store(cfg: TrainConfig, train_ds):
    if cfg.labels is None:
        return None
    store = LabelStore.open(cfg.labels)
    store.require_intact()  # layout, attribute digest, labels: before trusting what they say
    store.require_complete(cfg.allow_partial)  # the data is checked by the join (_join)
    if cfg.skip_store_check:
        from ..store.store_tools import require_verified
        require_verified(cfg.labels, cfg.cache_dir)
    return store


def _online_refinery(cfg: TrainConfig, classes: list, store, device):
    """The ``--teacher`` refinery (None without one), loaded once: its recorded input size is
    also the default crop size."""
    if cfg.teacher is None:
        return None
    from ..labelling.refinery import load_refinery
    size = cfg.res or (store.refinery.input_size if store is not None else None)
    return load_refinery(cfg.teacher, cfg.teacher_arch, classes, size, bn_mode=cfg.teacher_bn,
                         device=device, compile=cfg.compile,
                         trust_checkpoint=cfg.trust_checkpoint,
                         option_names=OptionNames("--teacher-arch", "--res"))


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


# Fewer stored classes per crop than this cost accuracy against an online refinery: top-1 and
# top-2 did (Tiny-ImageNet-200 and imagenette), top-5 did not measurably, renormalized
# (benchmarks/results/top_k_rest_tin200_cpu32.md, top_k_rest_gpu.md).
MIN_TOP_K = 5
# Above this share of each target spread evenly by --rest uniform (the mass outside the top k),
# warn. Students trailed --rest renormalize by 1.6 to 4.8 points at 49% to 91% spread
# (Tiny-ImageNet-200); below 49% it is unmeasured, so 25% is a judgement, not a measurement.
MAX_UNIFORM_REST = 0.25


def _warn_if_labels_truncated(cfg: TrainConfig, store, num_classes: int):
    """Dropping all but the top few classes of each label cost accuracy against an online
    refinery; say how many classes to store, as for K."""
    if store is None or cfg.teacher is not None or cfg.label_mode == "hard":
        return
    k, needed = store.layout.top_k, min(num_classes, MIN_TOP_K)
    if k < needed and is_main():
        warnings.warn(f"{cfg.labels}: keeps the top {k} of {num_classes} classes per crop; fewer "
                      f"than {needed} cost accuracy against an online refinery (precompute with "
                      f"--top-k {min(num_classes, DEFAULT_TOP_K)})", RefineryWarning,
                      stacklevel=2)


def _warn_if_rest_flattens(cfg: TrainConfig, store, num_classes: int, sample: int = 4096):
    """``--rest uniform`` spreads the mass outside each crop's top k evenly over the other
    classes: where the refinery's top k holds little of it (many classes, a hesitant refinery)
    most of every target is then the same flat vector, and students learn less. Measured on the
    first ``sample`` images' labels (cheap at any store size)."""
    if cfg.rest != "uniform" or not _replays(cfg, store) or cfg.label_mode != "soft" or \
            not is_main():
        return
    first = np.arange(min(sample, store.layout.num_images))
    probs = store.read_crops(first, verify=not cfg.skip_store_check).topk_probs
    if probs.shape[-1] >= num_classes:
        return
    spread = 1.0 - float(np.clip(probs.astype(np.float32).sum(-1), 0, 1).mean())
    if spread > MAX_UNIFORM_REST:
        warnings.warn(f"{cfg.labels}: --rest uniform spreads {spread:.0%} of each target evenly "
                      f"over the {num_classes - probs.shape[-1]} classes outside its top "
                      f"{probs.shape[-1]}; students did better with the default --rest "
                      "renormalize", RefineryWarning, stacklevel=2)


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


def _crop_source(cfg: TrainConfig, train_ds, store, res: int, copy=None):
    """Replay the store's crops (of its rows in ``copy``, the training ``.beton``) through the
    store's recipe, read epoch by epoch (each rank its own share of rows, and their labels
    where they are the targets), or draw fresh seeded crops every epoch through ``--augment``'s."""
    if not _replays(cfg, store):
        return _fresh_crops(cfg, train_ds, Recipe.parse(cfg.augment), res)
    _check_store_recipe(cfg, store)
    crops, _ = replayed_crops(store, train_ds, cfg.seed, cfg.slot_policy, res, copy=copy,
                              stored_labels=_labels_per_crop(cfg, store),
                              verify=not cfg.skip_store_check)
    return crops


def _replays(cfg: TrainConfig, store) -> bool:
    """Whether training replays the store's crops (not fresh ones: no store, or an online
    teacher on fresh crops)."""
    return store is not None and not (cfg.teacher is not None and cfg.teacher_crops == "fresh")


def _check_store_recipe(cfg: TrainConfig, store):
    """A store's labels describe its crops after its own recipe, so replay applies that recipe;
    an ``--augment`` that says otherwise would be silently ignored, or contradict the labels."""
    stored, asked = tuple(store.plan.augment), Recipe.parse(cfg.augment).names()
    if cfg.allow_partial and Recipe.parse(stored).mixes and not store.done_chunks().all():
        raise IncompleteStoreError(f"{cfg.labels}: its recipe mixes each crop with a partner "
                                   "crop of any image, which may lie in an unfinished chunk, so "
                                   "--allow-partial cannot replay it; finish the store with "
                                   "`refine precompute` first")
    if asked and asked != stored:
        shown = " ".join(stored) if stored else "none (crop and flip only)"
        raise RefineryError(f"{cfg.labels}: its labels were computed with the recipe {shown}, "
                            f"not --augment {' '.join(asked)}; omit --augment to replay the "
                            "store's recipe, or precompute a store with this one")


def _fresh_crops(cfg: TrainConfig, train_ds, recipe: Recipe = None, res: int = None) -> FreshCrops:
    """A new seeded RandomResizedCrop box and flip per training image every epoch, through
    ``recipe`` (on ``res``-pixel crops) when given."""
    return FreshCrops(CropPlan(seed=cfg.seed), train_ds.heights, train_ds.widths,
                      recipe or None, train_ds.labels, res)


def _target_source(cfg: TrainConfig, classes, device, store, crops, teacher, labels=None):
    """Ground truth, stored labels (dynamic: the epoch's, looked up in ``crops``; static or
    per class: read for it), WordNet's per class or an online teacher; hard if asked.
    ``labels``: the training images' classes (for per-class labels)."""
    num_classes, verify = len(classes), not cfg.skip_store_check
    if cfg.label_mode == CATEGORY_WORDNET:
        return CategoryTargets(wordnet_category_table(classes, cfg.wordnet_temperature,
                                                      f"{cfg.data}: train"), device)
    if teacher is not None:
        source = OnlineTargets(teacher)
    elif not _replays(cfg, store):
        return GroundTruthTargets(num_classes, cfg.label_smoothing)
    elif cfg.label_mode == "static":
        return StoredTargets(*store.read_static(verify), num_classes, device, cfg.rest)
    elif cfg.label_mode == CATEGORY_VISUAL:
        return CategoryTargets(store_category_table(store, labels, num_classes, cfg.rest,
                                                    verify), device)
    else:  # looked up from each batch's labels, which the loader gathers (_labels_per_crop)
        source = StoredTargets.of_crops(crops, num_classes, cfg.rest)
    return HardTargets(source) if cfg.label_mode == "hard" else source


def _labels_per_crop(cfg: TrainConfig, store) -> bool:
    """Whether the training loader attaches each crop's stored label to its batch (what
    :class:`.targets.StoredTargets` reads): only where the store's dynamic labels are the
    targets."""
    return _replays(cfg, store) and cfg.teacher is None and \
        cfg.label_mode not in ("static", CATEGORY_VISUAL, CATEGORY_WORDNET)


def _val_data(cfg: TrainConfig):
    """``--val``, else the validation split beside ``DATA`` (:func:`_val_location`)."""
    return cfg.val if cfg.val is not None else _val_location(cfg.data, "--val")


def _val_location(data, option: str = None):
    """The validation split: ``DATA/val`` for a tree, ``X_val.beton`` beside ``X_train.beton``.
    ``option`` names the command's option that passes it otherwise, for the error."""
    p = Path(data)
    other = f"pass {option} VAL_DATA, or " if option else ""
    if p.suffix == ".beton":
        head, found, tail = p.name.rpartition("train")  # the last one: 'mytrainset_train.beton'
        guess = p.with_name(head + "val" + tail) if found else p
        if guess == p or not guess.is_file():
            raise RefineryError(f"{p}: cannot find its validation .beton; {other}name the pair "
                                "'<name>train.beton' and '<name>val.beton', or pass an ImageFolder "
                                "tree with train/ and val/")
        return guess
    if not (p / "val").is_dir():
        also = f", or on {option} VAL_DATA" if option else ""
        raise RefineryError(f"{p}: no val/ folder; training evaluates on DATA/val "
                            f"(ImageFolder){also}")
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

RUN_FILES = ("metrics.jsonl", "last.pt", "model.pt")  # what a run that trained an epoch leaves
# Settings that say how a run executes, not what it computes: a --resume may change them. Others
# (lr, epochs, data, batch size, ...) would continue the saved state under another schedule or
# on other data, so they must match config.json. --device and --compile change float rounding
# only; --eval-every only which epochs are evaluated; --skip-store-check only whether a verified
# store is checked again; --trust-checkpoint only whether a file that runs code may load.
RESUMABLE_CHANGES = frozenset({"out_dir", "resume", "workers", "device", "compile", "progress",
                               "cache_dir", "eval_every", "skip_store_check", "trust_checkpoint"})


def _check_run_dir(cfg: TrainConfig, out: Path):
    """Runs never mix their files: a fresh run refuses an --out holding another run (its log
    would read epochs 1, 2, 1), and --resume refuses one with no run to continue."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: not a directory; choose another --out")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if cfg.resume and not (out / "last.pt").is_file():
        raise RunError(f"{out / 'last.pt'}: not found, so there is no run to resume; drop --resume "
                       "to start a fresh run" + (" in another --out" if found else ""))
    if not cfg.resume and found:
        raise RunError(f"{out}: already holds a run ({', '.join(found)}); pass --resume to "
                       "continue it, or choose another --out")


def _saved_config(out: Path) -> dict:
    """The ``config.json`` of the run to resume: what its settings must match."""
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        saved = getattr(exc, "strerror", None) or str(exc)
    if not isinstance(saved, dict):
        raise RunError(f"{path}: cannot be read ({saved}), so the settings of the run to resume "
                       "are unknown; restore it, or start a new run in another --out")
    return saved


def _check_same_run(out: Path, saved: dict, settings: dict):
    """--resume continues the run recorded in ``config.json`` (``saved``; None for a fresh run):
    refuse settings that differ, other than :data:`RESUMABLE_CHANGES`, naming the first. Keys a
    saved config lacks (written before they existed) are not compared."""
    if saved is None:
        return
    now = json.loads(json.dumps(settings))  # compare as saved: tuples as lists, 1 as 1.0
    for key, value in now.items():
        if key in RESUMABLE_CHANGES or key not in saved or saved[key] == value:
            continue
        raise RunError(f"{out / 'config.json'}: the run was started with {key} "
                       f"{_shown(saved[key])}, this resume has {key} {_shown(value)}; resume "
                       "with the run's settings and data, or start a new run in another --out")


def _shown(value, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _maybe_resume(cfg, out, model, optimizer, scheduler) -> int:
    """The epoch ``out/last.pt`` ends at (0 for a fresh run), with model, optimizer, schedule
    and RNG restored from it."""
    if not cfg.resume:
        return 0
    last = out / "last.pt"
    try:
        state = load_weights_file(last, cfg.trust_checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["epoch"])
    except (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, TypeError,
            ValueError) as exc:
        raise CheckpointError(f"{last}: cannot resume from it ({str(exc).splitlines()[0]}); it is "
                              "not this run's last.pt; start a new run in another --out") from None


def _check_epochs(cfg: TrainConfig):
    """``--epochs 0`` would save an untrained model.pt and report metrics it never computed;
    milestones that do not fit the scheduler or the run would train another schedule."""
    if cfg.epochs < 1:
        raise RefineryError(f"--epochs {cfg.epochs}: nothing to train; pass --epochs 1 or more")
    problem = milestone_problem(cfg.lr_scheduler, cfg.lr_milestones, cfg.epochs)
    if problem:
        raise RefineryError(problem)


def _check_epochs_left(cfg: TrainConfig, out: Path, start_epoch: int):
    """Resuming a finished run would train nothing and report metrics it never computed."""
    if start_epoch >= cfg.epochs:
        raise RunError(f"{out / 'last.pt'}: the run already trained all {cfg.epochs} epochs, so "
                       "there is nothing to resume (its final weights are in last.pt and "
                       "model.pt); start a new run in another --out")


def _record_run(out: Path, run_config: dict, start_epoch: int):
    """Write a fresh run's ``config.json``. A resumed run keeps its own, and forgets the epochs
    it logged but never checkpointed (killed between the two): it trains and logs them again."""
    out.mkdir(parents=True, exist_ok=True)
    if not run_config["resume"]:
        (out / "config.json").write_text(json.dumps(run_config, indent=1))
        return
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True) if log.is_file() else []
    kept = list(itertools.takewhile(lambda line: _epoch_of(line) <= start_epoch, lines))
    if len(kept) < len(lines):
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, log)


def _epoch_of(line: str) -> float:
    """A metrics.jsonl line's epoch; infinite for a line torn by a kill mid-write."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _log(out: Path, record: dict, echo: bool):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if echo:
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()
                 if not k.endswith("per_class")}
        print(json.dumps(shown), flush=True)


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    return replace(cfg, **kw)
