"""The FFCV backend: loaders over a crop table, yielding :class:`.crop_batch.CropBatch` es.

One pipeline serves precompute and training (:func:`_pipelines`): the decoder cuts the boxes
of a crop table (:mod:`.crop_table`, :mod:`.ffcv_ops`), the label op carries each crop's slot.
:func:`multi_crop_loader` cuts every planned crop of each image (precompute, ``refine show``);
:func:`make_loader` one crop per image per epoch from a crop source (:mod:`.crop_sources`),
which rewrites the table before every epoch; :func:`replay_loader` is the public FFCV backend
over a store. A recipe (:mod:`.recipe_ops`) runs on the cut crops, after the loader and before
the batch is handed on (:class:`CropBatches`), with parameters drawn from each crop's own (n, k).
"""
import contextlib
import queue
import warnings

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import ToTensor

from ..core.errors import RefineryWarning
from ..plan.crop_plan import DEFAULT_SLOT_POLICY, SLOT_POLICIES
from .crop_batch import CropBatch, batch_from_rows
from .crop_sources import replayed_crops
from .crop_table import TABLE_FIELDS
from .ffcv_ops import PlannedCropDecoder, WithIndexAndSlots

BATCHES_AHEAD = 2  # FFCV keeps BATCHES_AHEAD + 2 batches of output buffers


def usable_workers(requested: int) -> int:
    """FFCV decodes with numba threads, and numba refuses more threads than this machine has
    (a ValueError deep inside the loader); cap the request there and say so once."""
    available = numba.config.NUMBA_NUM_THREADS
    if requested > available:  # reported once per loader kind (one warning location each)
        warnings.warn(f"--workers {requested}: this machine runs at most {available} decoding "
                      f"threads; using {available}", RefineryWarning, stacklevel=2)
        return available
    return max(1, requested)


class StoreRows:
    """What the batches of a loader over a ``.beton`` replaying a store carry about each item:
    its store row as ``indices`` (a copy holds them in another order), the store's class as
    ``labels`` (a copy may number classes otherwise; the store's are the truth) and whether
    the item's bytes are the refinery's (``exact``). Run on each batch before the recipe, which
    draws from store rows."""

    def __init__(self, row_of_item: np.ndarray, labels: np.ndarray, exact: np.ndarray):
        self.row_of_item, self.labels, self.exact = row_of_item, labels, exact

    @classmethod
    def of(cls, copy, num_items: int, labels) -> "StoreRows":
        """From a :class:`.copies.CopyJoin` of a ``.beton`` of ``num_items`` items."""
        rows = copy.rows
        row_of_item = np.full(num_items, -1, np.int64)
        row_of_item[copy.copy_index[rows]] = rows
        exact = copy.exact if copy.exact is not None else np.zeros(copy.num_rows, bool)
        return cls(row_of_item, np.asarray(labels, np.int64), exact)

    def __call__(self, batch: CropBatch) -> CropBatch:
        rows = self.row_of_item[batch.indices.numpy()]
        return batch._replace(indices=torch.from_numpy(rows),
                              labels=torch.from_numpy(self.labels[rows]),
                              exact=torch.from_numpy(self.exact[rows]))


class ClassMap:
    """Batches whose ``labels`` number the classes otherwise than the model does (a copy's
    validation split): each label through ``table`` (copy class -> the model's class)."""

    def __init__(self, table):
        self.table = np.asarray(table, np.int64)

    def __call__(self, batch: CropBatch) -> CropBatch:
        return batch._replace(labels=torch.from_numpy(self.table[batch.labels.numpy()]))


class CropBatches:
    """One epoch of an FFCV loader as :class:`.crop_batch.CropBatch` es (the loader contract),
    each first through ``relabel`` (:class:`StoreRows` or :class:`ClassMap`) where given, with
    each crop's stored label attached when ``records`` are given (anything with
    ``sparse_labels(images, slots)``: :class:`ReplayedCrops`, the epoch's labels).

    ``close()`` stops FFCV's decoding thread when an epoch is abandoned early (precise BN).
    """

    def __init__(self, epoch, records=None, recipe=None, relabel=None):
        self.epoch, self.records, self.recipe, self.relabel = epoch, records, recipe, relabel

    def __iter__(self):
        return self

    def __next__(self) -> CropBatch:
        images, rows = next(self.epoch)
        batch = batch_from_rows(images, rows)
        if self.relabel is not None:
            batch = self.relabel(batch)
        if self.recipe is not None:  # .recipe_ops.BatchRecipe: the crops as labelled
            batch = self.recipe(batch)
        if self.records is None:
            return batch
        return batch._replace(targets=self.records.sparse_labels(batch.indices.numpy(),
                                                                 batch.slots.numpy()))

    def __len__(self):
        return len(self.epoch)

    def close(self):
        self.epoch.close()


class TableLoader(Loader):
    """An FFCV ``Loader`` over a crop table, yielding :class:`.crop_batch.CropBatch` es.

    One epoch decodes at a time: the crop table and the decoder's per-thread scratch belong to
    the loader, so an epoch abandoned without ``close()`` (a ``break``) is stopped, and its
    thread awaited, before the next one starts; FFCV alone would let both decode at once.
    """

    records = None  # sparse_labels(images, slots): each crop's stored label, attached
    relabel = None  # StoreRows or ClassMap: run on each batch first
    _running = None  # FFCV's EpochIterator (a thread) of the latest epoch

    def __iter__(self):
        self._stop_running_epoch()
        self._prepare_epoch()
        recipe = self._batch_recipe()  # before FFCV's __iter__ moves next_epoch on
        self._running = super().__iter__()
        return CropBatches(self._running, self.records, recipe, self.relabel)

    def _stop_running_epoch(self):
        """Stop the latest epoch's decoding thread and wait for it. FFCV's ``close()`` only
        asks it to stop once its queue is full; with no batches left it ends at once, after
        handing over (here: dropping) what it had decoded."""
        running = self._running
        if running is None or not running.is_alive():
            return
        running.close()
        running.iter_ixes = iter(())  # FFCV 1.0.2 reads its next batch from this iterator
        while running.is_alive():
            with contextlib.suppress(queue.Empty):
                running.output_queue.get_nowait()
            running.join(0.01)

    def _prepare_epoch(self):
        pass

    def _batch_recipe(self):
        return None


class CropLoader(TableLoader):
    """A :class:`TableLoader` whose crop table is refreshed from ``crops.fill`` before each epoch.

    FFCV starts decoding inside ``__iter__``, so the table must be written *before* calling the
    parent. Set ``next_epoch`` to resume at a given epoch.
    """

    def __init__(self, path, crops, table, **kwargs):
        self.crops, self.table = crops, table
        super().__init__(path, **kwargs)

    def set_epoch(self, epoch: int):
        """Replay ``epoch``'s crops on the next iteration (as ``StoreCropDataset.set_epoch``);
        epochs count from 0."""
        from ..core.validators import whole_number
        self.next_epoch = whole_number("epoch", epoch, 0, "pass the epoch number, from 0")

    def epoch_items(self, epoch: int) -> np.ndarray:
        """The items this process decodes in ``epoch``, in any order: all of the loader's, or
        with ``distributed=True`` this rank's share, which FFCV draws afresh every epoch
        (``DistributedSampler``); a sampler of its own, so it may run in another thread."""
        if not self.distributed:
            return self.indices
        return type(self.traversal_order)(self).sample_order(epoch)

    def _prepare_epoch(self):
        self.crops.fill(self.table, self.next_epoch)

    def _batch_recipe(self):
        return self.crops.batch_recipe(self.next_epoch)


def _pipelines(table: np.ndarray, output_size, threads: int) -> dict:
    """Image and label pipelines over one crop table: the decoder cuts its rows (decoding with
    ``threads`` threads), the label op copies their slots into each sample's row."""
    return {"image": [PlannedCropDecoder(table, output_size, threads), ToTensor()],
            "label": [IntDecoder(), WithIndexAndSlots(table), ToTensor()]}


def make_loader(dataset, crops, output_size, batch_size: int, num_workers: int = 2,
                train: bool = True, seed: int = 0, distributed: bool = False,
                indices=None, drop_last: bool = None) -> CropLoader:
    """A loader of one crop per image from ``crops``, yielding :class:`.crop_batch.CropBatch` es
    of uint8 NHWC crops."""
    table = np.zeros((dataset.num_images, crops.table_slots, TABLE_FIELDS), dtype=np.int32)
    threads = usable_workers(num_workers)
    crops.recipe_threads = threads  # the recipe runs as wide as decoding
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    loader = CropLoader(str(dataset.path), crops, table, batch_size=batch_size,
                        num_workers=threads, order=order, seed=seed,
                        drop_last=train if drop_last is None else drop_last,
                        distributed=distributed, indices=indices,
                        pipelines=_pipelines(table, output_size, threads),
                        batches_ahead=BATCHES_AHEAD)
    crops.items_of = loader.epoch_items  # a replaying source reads only these items' rows
    return loader


def multi_crop_loader(dataset, table: np.ndarray, output_size, images_per_batch: int,
                      indices, num_workers: int = 2) -> TableLoader:
    """Sequential loader over ``indices`` yielding :class:`.crop_batch.CropBatch` es of all the
    table's crops per image, ``(B, S, H, W, 3)`` (``(B, H, W, 3)`` when S is 1)."""
    threads = usable_workers(num_workers)
    return TableLoader(str(dataset.path), batch_size=images_per_batch, num_workers=threads,
                       order=OrderOption.SEQUENTIAL, indices=np.asarray(indices),
                       drop_last=False, pipelines=_pipelines(table, output_size, threads),
                       batches_ahead=BATCHES_AHEAD)


def replay_loader(store, data, batch_size: int, num_workers: int = 2, *, seed: int = 0,
                  slot_policy: str = DEFAULT_SLOT_POLICY, size: int = None,
                  distributed: bool = False, drop_last: bool = True, cache_dir=None,
                  allow_missing: bool = False) -> CropLoader:
    """The FFCV backend for any training loop: a store's crops replayed with their labels.

    Parameters
    ----------
    store : LabelStore or str
        The label store (or its location).
    data : str or os.PathLike
        Its data set: a ``.beton``, or an ImageFolder tree (converted once, cached, as the
        store records it was: see :func:`~refinery_pipeline.beton_path`). For a store that
        names its images (format 5), any copy that is converted to a keyed ``.beton``: another
        order, a subset (with ``allow_missing``), a flat copy, a resized one; joined by key.
    batch_size, num_workers : int
        As FFCV's ``Loader`` (``num_workers`` decoding threads).
    seed : int
        Shuffling and slot-choice seed (``refine train --seed``).
    slot_policy : {"cycle", "random"}
        Which slot each epoch replays.
    size : int, optional
        Crop side; defaults to the size the refinery labelled.
    distributed : bool
        Shard images over ``torch.distributed`` ranks (FFCV's ``distributed=True``).
    drop_last : bool
        Drop the last incomplete batch, as training does.
    cache_dir : str, optional
        Where a converted tree's ``.beton`` is cached.
    allow_missing : bool
        Skip the store images the copy cannot give (missing, reframed, or, under a mixing
        recipe, without a slot whose partner it holds) instead of refusing it; ``loader.join``
        counts them.

    Returns
    -------
    CropLoader
        Iterating it yields :class:`~refinery_pipeline.CropBatch` es of uint8 ``(B, S, S, 3)``
        crops (after the store's recipe, if it has one, as they were labelled) with
        :class:`~refinery_pipeline.SparseLabels` targets, ``mix`` where the recipe mixes, and
        ``exact``; ``indices`` are store rows and ``labels`` the store's classes, whatever the
        copy's order or numbering. Epochs count from 0 (``loader.set_epoch(e)`` picks one).
        Slot ``(epoch, n)`` is :func:`~refinery_pipeline.slot_of`'s, the same as in
        :class:`StoreCropDataset`. ``loader.join`` is the :class:`~refinery_pipeline.CopyJoin`.

    Raises
    ------
    StoreCorruptError
        The store fails the checks ``refine verify`` and ``refine train`` run.
    StoreMismatchError
        ``data`` is not the store's data set (nor, for a keyed store, a copy of it).
    MissingImagesError
        The copy lacks store images and ``allow_missing`` is False.
    ArgumentError
        An argument of the wrong kind or range.

    Notes
    -----
    FFCV reuses its batch buffers: a batch's tensors (``images``, ``labels``, ``indices``,
    ``slots``) are overwritten a few batches later. Use them within the step, or keep a copy
    (``batch.images[i].clone()``); a kept view shows other crops' pixels.
    """
    from ..core.validators import flag, one_of, optional_whole_number, path_like, whole_number
    from ..sources.data_cache import open_dataset
    from ..sources.dataset import conversion_options
    from ..store.label_store import open_for_reading
    batch_size = whole_number("batch_size", batch_size, 1, "pass a positive batch size")
    num_workers = whole_number("num_workers", num_workers, 1, "pass 1 or more decoding threads")
    seed = whole_number("seed", seed)
    one_of("slot_policy", slot_policy, SLOT_POLICIES)
    size = optional_whole_number("size", size, 1, "pass a crop side in pixels, or None for the "
                                 "size the refinery labelled")
    flag("distributed", distributed)
    flag("drop_last", drop_last)
    flag("allow_missing", allow_missing)
    path_like("data", data, ".beton or ImageFolder tree")
    if cache_dir is not None:
        path_like("cache_dir", cache_dir, "cache directory")
    store = open_for_reading(store)
    dataset = open_dataset(data, "train", cache_dir, conversion_options(store.dataset.source))
    size = size or store.refinery.input_size
    crops, copy = replayed_crops(store, dataset, seed, slot_policy, size, allow_missing)
    loader = make_loader(dataset, crops, (size, size), batch_size, num_workers, train=True,
                         seed=seed, distributed=distributed, drop_last=drop_last,
                         indices=copy.copy_index[copy.rows] if copy.keys is not None else None)
    loader.records = crops  # each batch's labels, of the epoch's crops
    loader.relabel = StoreRows.of(copy, dataset.num_images, crops.labels)
    loader.join = copy
    return loader
