"""What fills a crop table (:mod:`.crop_table`) before each epoch: every image's crop of the epoch.

* :class:`ReplayedCrops`: a stored slot per image (stored labels), read epoch by epoch;
* :class:`FreshCrops`: a new seeded random box and flip per image (ground-truth and online
  modes);
* :class:`FixedCrops`: the same centred square every epoch (evaluation).

With a recipe (:mod:`..plan.recipe`), a mixing one adds the partner crop as the table's second
column, and each source hands the loader the epoch's :class:`.recipe_ops.BatchRecipe`, which runs
on the cut crops after the loader and before the batch is handed on, with parameters drawn from
each crop's own (n, k). Nothing here imports FFCV: the loaders (:mod:`.replay`) do.
"""
from dataclasses import replace

import numpy as np

from ..plan.crop_plan import (DEFAULT_SLOT_POLICY, CropPlan, SlotSchedule, centre_square,
                              sample_boxes, sample_flips)
from ..sources.pixels import boxes_in_frames
from .crop_batch import NOT_STORED
from .crop_table import SOURCE
from .epoch_reads import CUT_ARRAYS, LABEL_ARRAYS, ArraySlots, EpochCrops, EpochReader, read_epoch


class _RecipeCrops:
    """What the crop sources share about a recipe: a mixing recipe needs a second table column
    (the partner crop), and every batch goes through the recipe
    (:class:`.recipe_ops.BatchRecipe`)."""

    recipe = None  # PlanAugment of the epoch's crops, or None: crop and flip only
    recipe_threads = 1  # threads running the recipe on each batch (make_loader: its workers)

    @property
    def table_slots(self) -> int:
        return 2 if self.recipe is not None and self.recipe.recipe.mixes else 1

    def batch_recipe(self, epoch: int):
        return None

    @staticmethod
    def _fill_partners(table, boxes, flips, images, slots, items=slice(None)):
        """Column 1 of table rows ``items`` (default all): the partner crop of each, cut from
        table image ``images`` (its box and flip as given); ``slots`` is what the batch
        reports for it."""
        table[items, 1, :4], table[items, 1, 4] = boxes, flips
        table[items, 1, 5], table[items, 1, SOURCE] = slots, np.asarray(images) + 1


class ReplayedCrops(_RecipeCrops):
    """Each epoch, every image replays one of its stored slots (chosen by ``slot_policy``); with
    the store's recipe (``recipe``, a :class:`..plan.recipe.PlanAugment`), each crop goes
    through it as it was labelled, its partner (m, j) the stored crop j of image m.

    ``boxes`` and ``flips`` are the store's ``(N, K, ...)`` arrays (:meth:`reading` reads a
    store's instead, epoch by epoch), ``labels`` its classes, per store row. ``copy`` (a
    :class:`.copies.CopyJoin`) says which ``.beton`` item holds each store row; without it,
    row n is item n (the store's own ``.beton``). Slots and recipe draws are always of store
    rows, so a copy in any order replays the same crops; a mixing partner the copy lacks moves
    the slot (:func:`.copies.replayable_slot`). ``frames``: ``(stored, copy's)`` ``(N, 2)``
    frames of each row where the copy's images are rescaled, whose boxes are carried over.

    Before each epoch :meth:`fill` writes the crop table's rows of the items the loader
    decodes in it (``items_of(epoch)``; all of them by default), reading just those rows' slot
    of the epoch (:mod:`.epoch_reads`), and starts reading the next epoch's."""

    def __init__(self, boxes, flips, seed: int, slot_policy: str = DEFAULT_SLOT_POLICY,
                 recipe=None, labels=None, copy=None):
        self._setup(ArraySlots({"boxes": boxes, "flips": flips}), seed, slot_policy, recipe,
                    labels, copy)

    @classmethod
    def reading(cls, source, seed: int, slot_policy: str = DEFAULT_SLOT_POLICY, recipe=None,
                labels=None, copy=None, frames=None, stored_labels: bool = True):
        """Crops read from ``source`` (:class:`.epoch_reads.StoreSlots`) epoch by epoch, with
        their stored labels (``stored_labels``) for :meth:`sparse_labels`."""
        crops = cls.__new__(cls)
        crops._setup(source, seed, slot_policy, recipe, labels, copy, frames, stored_labels)
        return crops

    def _setup(self, source, seed, slot_policy, recipe, labels, copy, frames=None,
               stored_labels=False):
        self.source, self.seed, self.slot_policy = source, seed, slot_policy
        self.recipe, self.labels, self.copy, self.frames = recipe, labels, copy, frames
        self.schedule = SlotSchedule(seed, source.num_images, source.crops_per_image,
                                     slot_policy)
        self.names = CUT_ARRAYS + (LABEL_ARRAYS if stored_labels else ())
        self.reader = EpochReader(self._read)
        self.current = None  # the last filled epoch's EpochCrops
        self.items_of = None  # the loader's items of an epoch (CropLoader.epoch_items)
        if copy is not None:  # the store row each .beton item holds (-1: none replayed)
            self._row_of_item = np.full(int(copy.copy_index.max(initial=-1)) + 1, -1, np.int64)
            self._row_of_item[copy.copy_index[copy.rows]] = copy.rows

    @property
    def slots(self) -> np.ndarray:
        """``(N,)`` the slot each store row replayed in the last filled epoch (-1: not
        replayed here)."""
        slots = np.full(self.source.num_images, -1, np.int64)
        if self.current is not None:
            slots[self.current.rows] = self.current.slots
        return slots

    def fill(self, table: np.ndarray, epoch: int):
        crops = self.current = self.reader(epoch)
        self.reader.prefetch(epoch + 1)
        items = crops.rows if self.copy is None else self.copy.copy_index[crops.rows]
        table[items, 0, :4] = self._in_frames(crops.arrays["boxes"], crops.rows)
        table[items, 0, 4] = crops.arrays["flips"]
        table[items, 0, 5] = crops.slots
        if self.table_slots == 2:
            m = crops.partner_rows
            where = m if self.copy is None else self.copy.item[m]
            self._fill_partners(table, self._in_frames(crops.partner_arrays["boxes"], m),
                                crops.partner_arrays["flips"], where, crops.partner_slots, items)

    def _rows(self, epoch: int) -> np.ndarray:
        """The store rows replayed in ``epoch`` here: those of the loader's items that epoch
        (every replayed row when the loader does not say)."""
        if self.items_of is None:
            return np.arange(self.source.num_images) if self.copy is None else self.copy.rows
        items = np.asarray(self.items_of(epoch), np.int64)
        if self.copy is None:
            return items
        rows = self._row_of_item[items[items < len(self._row_of_item)]]
        return rows[rows >= 0]  # items holding no replayed row are never decoded

    def _read(self, epoch: int, rows=None) -> EpochCrops:
        rows = self._rows(epoch) if rows is None else rows
        partners = self.recipe.partners if self.table_slots == 2 else None
        return read_epoch(self.source, epoch, rows, self.epoch_slots, self.names, partners)

    def _in_frames(self, boxes, rows):
        """Stored boxes of ``rows`` carried into the copy's frames (as they are without one)."""
        if self.frames is None:
            return boxes
        stored, actual = self.frames
        return boxes_in_frames(boxes, stored[rows], actual[rows])

    def sparse_labels(self, images, slots):
        """The stored labels of crops ``(images[i], slots[i])`` of the last filled epoch
        (:meth:`.epoch_reads.EpochCrops.sparse_labels`): what the loader attaches to each
        batch."""
        return self.current.sparse_labels(images, slots)

    def batch_recipe(self, epoch: int):
        if self.recipe is None:
            return None
        from .recipe_ops import BatchRecipe
        return BatchRecipe(self.recipe, self.labels, threads=self.recipe_threads)

    def epoch_slots(self, epoch: int, rows=None) -> np.ndarray:
        """:func:`.crop_plan.epoch_slots` of every image (or of store rows ``rows``), the
        ``cycle`` order kept for its round where every row is replayed
        (:class:`.crop_plan.SlotSchedule`), each moved where a copy lacks its mixing
        partner (:meth:`.copies.CopyJoin.slots`)."""
        slots = np.asarray(self.schedule(epoch, rows), np.int64)
        if self.copy is None:
            return slots
        rows = np.arange(self.source.num_images) if rows is None else rows
        return self.copy.slots(rows, slots)


class FreshCrops(_RecipeCrops):
    """Each epoch, a new seeded random box and flip per image (ground-truth and online modes),
    through ``recipe`` (:class:`..plan.recipe.Recipe`, on ``size``-pixel crops) when given,
    with fresh parameters too: the epoch's plan has K = 1, and a crop's partner is image m's
    crop of the same epoch. ``labels`` (the images' classes) give mixed crops their
    ground-truth shares."""

    def __init__(self, plan: CropPlan, heights, widths, recipe=None, labels=None,
                 size: int = None):
        self.plan, self.heights, self.widths = plan, heights, widths
        self.recipe_spec, self.labels, self.size = recipe, labels, size
        self.slots = None
        self.recipe = self._epoch_recipe(0)

    def epoch_plan(self, epoch: int) -> CropPlan:
        return replace(self.plan, seed=self.plan.seed * 1_000_003 + epoch + 1, crops_per_image=1)

    def _epoch_recipe(self, epoch: int):
        if not self.recipe_spec:
            return None
        from ..plan.recipe import PlanAugment
        return PlanAugment(self.recipe_spec, self.epoch_plan(epoch).seed, len(self.heights), 1,
                           self.size)

    def fill(self, table: np.ndarray, epoch: int):
        plan = self.epoch_plan(epoch)
        ids = np.arange(len(self.heights))
        boxes = sample_boxes(plan, ids, self.heights, self.widths)[:, 0]
        flips = sample_flips(plan, ids)[:, 0]
        table[:, 0, :4], table[:, 0, 4], table[:, 0, 5] = boxes, flips, NOT_STORED
        self.recipe = self._epoch_recipe(epoch)
        if self.table_slots == 2:
            m, _ = self.recipe.partners(ids, np.zeros(len(ids)))
            self._fill_partners(table, boxes[m], flips[m], m, NOT_STORED)

    def batch_recipe(self, epoch: int):
        if self.recipe is None:
            return None
        from .recipe_ops import BatchRecipe
        return BatchRecipe(self._epoch_recipe(epoch), self.labels, fresh=True,
                           threads=self.recipe_threads)


class FixedCrops(_RecipeCrops):
    """The same crop every epoch: used for evaluation (the centred square of each image)."""

    def __init__(self, heights, widths):
        self.boxes = centre_square(heights, widths)
        self.slots = None

    def fill(self, table: np.ndarray, epoch: int):
        table[:, 0, :4] = self.boxes
        table[:, 0, 4] = 0
        table[:, 0, 5] = NOT_STORED


def replayed_crops(store, dataset, seed: int, slot_policy: str, size: int,
                   allow_missing: bool = False, copy=None, stored_labels: bool = True,
                   verify: bool = True) -> tuple:
    """``(ReplayedCrops, CopyJoin)``: the store's crops over ``dataset`` (an ``ImageDataset``:
    the store's own ``.beton`` or a keyed copy, joined by :func:`.copies.join_beton` unless
    ``copy`` is that join already), boxes carried into the copy's frames, read epoch by epoch
    (each chunk checked against its checksums unless ``verify`` is False), with the crops'
    stored labels where ``stored_labels``."""
    from ..plan.recipe import plan_augment
    from .copies import join_beton
    from .epoch_reads import StoreSlots
    recipe = plan_augment(store.plan, store.layout.num_images, size)
    if copy is None:
        copy = join_beton(store, dataset, recipe=recipe, allow_missing=allow_missing)
    keyed, frames = copy.keys is not None, None
    if keyed:
        stored = store.read_image_sizes()
        frames = (stored, np.where((copy.item >= 0)[:, None],  # rows the copy lacks keep theirs
                                   np.stack([dataset.heights, dataset.widths], -1)[copy.item],
                                   stored))
    crops = ReplayedCrops.reading(StoreSlots(store, verify), seed, slot_policy, recipe,
                                  store.read_labels(), copy if keyed else None, frames,
                                  stored_labels)
    return crops, copy
