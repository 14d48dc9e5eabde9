"""What every plain (FFCV-free) reader of a store's crops shares, and the sample it hands on.

:class:`StoredCrops` holds a store's labels, frames and recipe, the epoch and its crops (read
for that epoch alone into shared memory, so persistent workers see ``set_epoch``), cuts a
stored box from an image of any frame, runs the store's recipe and builds the
:class:`CropSample`. Two readers build on it: the map-style
:class:`.torch_data.StoreCropDataset` and the streaming :class:`.stream.StoreCrops`.
"""
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from ..core.errors import DataSetError
from ..core.validators import one_of, optional_callable, optional_whole_number, whole_number
from ..plan.crop_plan import SLOT_POLICIES, SlotSchedule
from ..plan.recipe import plan_augment
from ..sources.pixels import box_in_frame, cut_crop, reframed
from ..store.label_store import open_for_reading
from .copies import reframed_message
from .crop_batch import MixedLabels
from .epoch_reads import CUT_ARRAYS, LABEL_ARRAYS, EpochReader, SharedEpoch, StoreSlots, read_epoch
from .recipe_ops import recipe_crops

CROP_FORMATS = ("tensor", "pil", "numpy")
NO_PARTNER = -1  # CropSample.partner_label of a crop no mixing recipe made


class CropSample(NamedTuple):
    """One item of :class:`.torch_data.StoreCropDataset` (see
    :class:`.torch_data.CropCollate` for batches)."""

    image: Any             # the crop after the user's transform
    label: int             # ground-truth class (the store's)
    index: int             # the store's row n of the image
    slot: int              # the stored slot this crop replays
    topk_indices: np.ndarray  # (k,) int64 stored top-k classes of this crop
    topk_probs: np.ndarray    # (k,) float16 their probabilities
    # A mixing recipe's partner (CropBatch.mix, one sample of it): the partner image's class
    # (NO_PARTNER without a mixing recipe) and the crop's own share of the pixels (1: unmixed).
    partner_label: int = NO_PARTNER
    mix_weight: float = 1.0
    # Whether the crop was cut from the very bytes the refinery decoded (its labels describe
    # exactly these pixels); False: approximate (another encoding or size of the image).
    exact: bool = False


class StoredCrops:
    """What every plain reader of a store's crops shares: the store's labels, frames and
    recipe, the epoch and its crops (read for the epoch alone, :mod:`.epoch_reads`, into
    shared memory, so persistent workers see :meth:`set_epoch`), the cut of a stored box from
    an image of any frame, and the sample handed on."""

    def _open(self, store, transform, slot_policy, seed, epoch, size, crop_format):
        optional_callable("transform", transform)
        one_of("slot_policy", slot_policy, SLOT_POLICIES)
        one_of("crop_format", crop_format, CROP_FORMATS)
        seed, epoch = whole_number("seed", seed), whole_number("epoch", epoch)
        size = optional_whole_number("size", size, 1, "pass a crop side in pixels, or None "
                                     "for the size the refinery labelled")
        self.store = open_for_reading(store)
        self.labels = self.store.read_labels()
        self.stored_sizes = self.store.read_image_sizes()
        self.transform, self.crop_format = transform, crop_format
        self.slot_policy, self.seed = slot_policy, seed
        self.size = size or self.store.refinery.input_size
        self.recipe = plan_augment(self.store.plan, len(self.labels), self.size)
        self._epoch = torch.tensor([epoch], dtype=torch.int64).share_memory_()
        # Every row's slot of an epoch is drawn at once in the process that sets the epoch:
        # drawing one row's slot per item cost ~80 us of a ~300 us item
        # (benchmarks/results/plain_loader_sources_cpu.md); its crops are read with it.
        self._schedule = SlotSchedule(seed, len(self.labels),
                                      self.store.layout.crops_per_image, slot_policy)
        self._reader = EpochReader(self._read_epoch, keep=False)  # copied to _crops
        self._crops = None  # SharedEpoch: the epoch's crops, sized by _hold
        self._records = None  # every crop's records, read only for a crop of another epoch

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def records(self):
        """Every crop's records (:class:`~refinery_pipeline.CropRecords`), read from the store
        on first use: replaying an epoch never needs them (its crops are read for it), a
        crop of another slot does."""
        if self._records is None:
            self._records = open_for_reading(self.store.location).read_crops() \
                if isinstance(self.store, _StoreSummary) else self.store.read_crops()
        return self._records

    def set_epoch(self, epoch: int):
        """Replay ``epoch``'s slots from now on (shared memory: persistent workers see it);
        epochs count from 0."""
        epoch = whole_number("epoch", epoch, 0, "pass the epoch number, from 0")
        self._fill_epoch(epoch)
        self._epoch[0] = epoch

    def _hold(self, capacity: int):
        """Make the shared table of the epoch's crops, for up to ``capacity`` rows."""
        mixes = self.recipe is not None and self.recipe.recipe.mixes
        self._crops = SharedEpoch(capacity, self.store.layout.top_k, partners=mixes)

    def _fill_epoch(self, epoch: int, rows=None):
        """Read ``epoch``'s crops of store rows ``rows`` (default: every row replayed, and
        then the next epoch's too, in the background) into the shared table."""
        self._crops.write(self._reader(epoch, rows))
        if rows is None:
            self._reader.prefetch(epoch + 1)

    def _read_epoch(self, epoch: int, rows=None):
        rows = self._replayed_rows() if rows is None else rows
        mixes = self.recipe is not None and self.recipe.recipe.mixes
        return read_epoch(StoreSlots(self.store), epoch, rows, self._slots_of,
                          CUT_ARRAYS + LABEL_ARRAYS, self.recipe.partners if mixes else None)

    def _replayed_rows(self) -> np.ndarray:
        return np.arange(len(self.labels))

    def _slots_of(self, epoch: int, rows: np.ndarray) -> np.ndarray:
        """Store rows ``rows``' slots of ``epoch``: ``slot_of(epoch, n, ...)`` of each."""
        return self._schedule(epoch, rows)

    def _epoch_slot(self, n: int) -> int:
        """Row ``n``'s slot this epoch: the table's, else (a row not read for it) drawn."""
        held = self._crops.crop_of(n)
        if held is not None:
            return int(held["slots"])
        return int(self._slots_of(self.epoch, np.array([n]))[0])

    def _crop_record(self, n: int, slot: int, held: Optional[dict] = None) -> "CropRecord":
        """Crop ``(n, slot)``'s box, flip and label (and its mixing partner's box and flip):
        from the epoch's table where this epoch replays it (``held``: row ``n``'s there, when
        the caller looked it up), else from :attr:`records`."""
        held = self._crops.crop_of(n) if held is None else held
        if held is not None and held["slots"] == slot:
            partner = (held["partner_boxes"], held["partner_flips"]) \
                if "partner_boxes" in held else None
            return CropRecord(held["boxes"], held["flips"], held["topk_indices"],
                         held["topk_probs"], partner)
        records, partner = self.records, None
        if self.recipe is not None and self.recipe.recipe.mixes:
            m, j = (int(v[0]) for v in self.recipe.partners([n], [slot]))
            partner = (records.boxes[m, j], records.flips[m, j])
        return CropRecord(records.boxes[n, slot], records.flips[n, slot],
                     records.topk_indices[n, slot], records.topk_probs[n, slot], partner)

    def _cut(self, image: np.ndarray, n: int, box, flip, where) -> np.ndarray:
        """Stored crop ``box``, ``flip`` of row ``n`` cut from ``image`` (box and flip only),
        the box rescaled to the image's frame where it differs from the stored one; a frame
        that is no rescaling of it is refused (``where()`` names the image)."""
        box = self._box(n, box, image.shape[:2])
        if box is None:
            raise DataSetError(reframed_message(where(), self.stored_sizes[n], image.shape[:2]))
        return cut_crop(image, box, bool(flip), self.size)

    def _box(self, n: int, box, frame) -> Optional[np.ndarray]:
        """Row ``n``'s stored ``box`` in an image of ``frame`` ``(H', W')``
        (``pixels.box_in_frame``), or None where that frame is no rescaling of the stored one
        (``pixels.reframed``)."""
        if self.stored_sizes is None or tuple(self.stored_sizes[n]) == tuple(frame):
            return box
        if reframed(self.stored_sizes[n], frame):
            return None
        return box_in_frame(box, self.stored_sizes[n], frame)

    def _through_recipe(self, crop, n: int, slot: int, partner_crop=None) -> tuple:
        """The crop after the store's recipe (as labelled), and its :class:`MixedLabels` (one
        row) where the recipe mixes; ``partner_crop(m, j)`` cuts the partner crop (m, j)."""
        if self.recipe is None:
            return crop, None
        params = self.recipe.pair_params([n], [slot])
        partner, mix = None, None
        if self.recipe.recipe.mixes:
            m, j = int(params[0].partner[0]), int(params[0].partner_slot[0])
            partner = torch.from_numpy(partner_crop(m, j))[None]
            mix = MixedLabels.of_crops(params[0], self.labels)
        crop = recipe_crops(torch.from_numpy(crop)[None], partner, params)[0].numpy()
        return crop, mix

    def _sample(self, n: int, slot: int, record: "CropRecord", crop, mix,
                exact: bool) -> CropSample:
        crop = _as_format(crop, self.crop_format)
        if self.transform is not None:
            crop = self.transform(crop)
        partner = (NO_PARTNER, 1.0) if mix is None else \
            (int(mix.partner_labels[0]), float(mix.weights[0]))
        return CropSample(crop, int(self.labels[n]), n, slot,
                          record.topk_indices.astype(np.int64), record.topk_probs.copy(),
                          *partner, bool(exact))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["store"] = _StoreSummary.of(self.store)  # zarr handles stay in the parent
        state["_records"] = None  # read again where needed, never shipped
        return state


class CropRecord(NamedTuple):
    """A stored crop's records: box, flip, top-k label, and its mixing partner's
    ``(box, flip)`` (None without a mixing recipe)."""

    box: np.ndarray
    flip: int
    topk_indices: np.ndarray
    topk_probs: np.ndarray
    partner: Optional[tuple]


class _StoreSummary:
    """What a worker needs of the store: its layout (everything else was read already)."""

    def __init__(self, layout, location):
        self.layout, self.location = layout, location

    @classmethod
    def of(cls, store):
        return store if isinstance(store, cls) else cls(store.layout, store.location)


def _as_format(crop: np.ndarray, crop_format: str):
    if crop_format == "numpy":
        return crop
    if crop_format == "pil":
        from PIL import Image
        return Image.fromarray(crop)
    return torch.from_numpy(channels_first(crop))


def channels_first(crop: np.ndarray) -> np.ndarray:
    """``(S, S, 3)`` uint8 as a contiguous ``(3, S, S)`` array, by OpenCV's channel split into
    its planes (~4 us at 96 px, where torch's ``permute().contiguous()`` takes ~22 us)."""
    import cv2
    planes = np.empty((crop.shape[2],) + crop.shape[:2], crop.dtype)
    cv2.split(crop, list(planes))
    return planes
