"""A run's data and labels: the training and validation sets, the store (checked, joined with a
copy by key), the crops each epoch replays or draws fresh, and where each crop's target comes
from; warnings for settings that work but probably not as meant.
"""
import warnings
from pathlib import Path

import numpy as np
import torch

from ..core.distributed import is_main, world_size
from ..core.errors import DataSetError, IncompleteStoreError, RefineryError, RefineryWarning
from ..core.option_relevance import CATEGORY_VISUAL, CATEGORY_WORDNET
from ..loaders.crop_sources import FixedCrops, FreshCrops, replayed_crops
from ..loaders.replay import ClassMap, StoreRows, make_loader
from ..models.registry import OptionNames
from ..plan.crop_plan import PARITY_VIEWS_PER_CROP, CropPlan, crops_for_parity
from ..plan.recipe import Recipe, plan_augment
from ..sources.data_cache import open_dataset
from ..sources.dataset import check_cap_applies, conversion_options
from ..store.label_store import LabelStore
from ..store.schema import DEFAULT_TOP_K
from .config import TrainConfig
from .schedule import few_steps_problem, warmup_problem
from .targets import (CategoryTargets, GroundTruthTargets, HardTargets, OnlineTargets,
                      StoredTargets, store_category_table)
from .wordnet import wordnet_category_table


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
