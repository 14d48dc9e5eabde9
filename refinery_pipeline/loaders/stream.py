"""A label store's crops as a stage of a streaming pipeline (WebDataset), for data read as a
stream of samples rather than by index.

:class:`StoreCrops` maps each sample of a copy of the store's data set (a dict with ``__key__``
and an image member, as ``webdataset`` yields them) to its :class:`~.stored_crops.CropSample`
for the current epoch, by the rules of :class:`~.torch_data.StoreCropDataset`: the key finds
the store row (:class:`.keys.KeyIndex`, :func:`.keys.join`'s rule), the slot is
``slot_of(epoch, row)``, the box is rescaled to the sample's frame, and the crop is *exact*
when the sample's bytes hash to the store's digest. Samples the store does not label give None,
which ``webdataset``'s ``map`` drops::

    pipeline = wds.WebDataset(urls).map(refinery.StoreCrops(store))
    loader = DataLoader(pipeline, batch_size=256, num_workers=8,
                        collate_fn=refinery.CropCollate())

A stream cannot reach a sample it has not reached yet, so a store whose recipe mixes each crop
with a partner crop of another image is refused here: read such shards by index with
``StoreCropDataset(store, "shards-{000..099}.tar")`` (shards are indexed once for random
access). Which store images a stream lacks is unknown until it ends: ``refine check-copy``
tells up front, and :attr:`StoreCrops.counts` counts what one process saw.
"""
import hashlib
from typing import Callable, Optional

from ..plan.crop_plan import DEFAULT_SLOT_POLICY
from ..core.errors import DataSetError
from ..sources.keys import KeyIndex
from ..sources.pixels import rgb_of_any
from .stored_crops import CropSample, StoredCrops
from ..core.validators import flag, refuse

IMAGE_FIX = "name the image member with image_ext=, e.g. 'jpg' or ('jpg', 'png')"


class StoreCrops(StoredCrops):
    """Map a WebDataset sample to its stored crop (a stage for ``webdataset``'s ``map``).

    Parameters
    ----------
    store : LabelStore or str or os.PathLike
        A label store that names its images (format 5).
    transform, slot_policy, seed, epoch, size, crop_format
        As :class:`~refinery_pipeline.StoreCropDataset`; :meth:`set_epoch` reaches
        ``DataLoader`` workers (shared memory).
    image_ext : str or sequence of str, optional
        The sample's image member(s), first found wins; default ``jpg``, ``jpeg``, ``png``,
        ``webp`` and the other image extensions. Its value may be the encoded bytes (exact
        where they hash to the store's digest) or pixels a ``.decode()`` stage made
        (approximate).
    allow_missing : bool
        Drop samples whose frame is no rescaling of the stored one (rotated, cropped or
        padded; counted) instead of raising.

    Returns (when called on a sample)
    ---------------------------------
    CropSample or None
        None for a sample the store does not label (``counts["extra"]``), or whose key ends
        several store keys (``counts["ambiguous"]``).

    Raises
    ------
    ArgumentError
        A store without keys, or whose recipe mixes crops with partners.
    DataSetError
        A sample without ``__key__`` or an image member; a reframed image without
        ``allow_missing``.
    """

    def __init__(self, store, transform: Optional[Callable] = None, *,
                 slot_policy: str = DEFAULT_SLOT_POLICY, seed: int = 0, epoch: int = 0,
                 size: Optional[int] = None, crop_format: str = "tensor", image_ext=None,
                 allow_missing: bool = False):
        from ..sources.shards import _image_exts
        self.allow_missing = flag("allow_missing", allow_missing)
        self._open(store, transform, slot_policy, seed, epoch, size, crop_format)
        if not self.store.keyed:
            raise refuse("store", store, f"names no images (store format "
                         f"{self.store.format_version}), so samples cannot find their rows",
                         "pass its own data set to StoreCropDataset, or a store precomputed "
                         "by this version")
        if self.recipe is not None and self.recipe.recipe.mixes:
            raise refuse("store", store, "its recipe mixes each crop with a partner crop of "
                         "another image, which a stream of samples cannot reach",
                         "pass the shards to StoreCropDataset(store, shards) instead (read by "
                         "index)")
        self.image_exts = _image_exts(image_ext)
        self.index = KeyIndex(self.store.read_keys())
        self.digests = self.store.read_image_digests()
        self.counts = {"used": 0, "exact": 0, "extra": 0, "ambiguous": 0, "reframed": 0}
        self._hold(len(self.labels))  # any row may come: every row's crop of the epoch
        self._fill_epoch(self.epoch)

    def __call__(self, sample: dict) -> Optional[CropSample]:
        n = self.index.row(_key_of(sample))
        if n < 0:
            self.counts["ambiguous" if n == -2 else "extra"] += 1
            return None
        image, exact = self._pixels(sample, n)
        slot = self._epoch_slot(n)
        record = self._crop_record(n, slot)
        if self._box(n, record.box, image.shape[:2]) is None and self.allow_missing:
            self.counts["reframed"] += 1
            return None
        crop = self._cut(image, n, record.box, record.flip, lambda: _where(sample))
        crop, mix = self._through_recipe(crop, n, slot)
        self.counts["used"] += 1
        self.counts["exact"] += bool(exact)
        return self._sample(n, slot, record, crop, mix, exact)

    def _pixels(self, sample: dict, n: int) -> tuple:
        """``(image, exact)``: encoded bytes decoded by the spec's decoder and hashed against
        the store's digest; pixels already decoded upstream, by the pixel mode rule
        (approximate: their bytes are gone)."""
        from ..sources import decode_image
        value = self._image_member(sample)
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            exact = self.digests is not None and \
                hashlib.sha256(data).digest() == self.digests[n].tobytes()
            return decode_image(data, _where(sample)), exact
        return rgb_of_any(value, _where(sample)), False

    def _image_member(self, sample: dict):
        members = {str(k).lower(): k for k in sample if not str(k).startswith("__")}
        for ext in self.image_exts:
            if ext in members:
                return sample[members[ext]]
        raise DataSetError(f"{_where(sample)}: no image member ({', '.join(sorted(members))}); "
                           f"{IMAGE_FIX}")


def _key_of(sample) -> str:
    if not isinstance(sample, dict) or "__key__" not in sample:
        raise DataSetError(f"a sample without __key__ ({type(sample).__name__}); put "
                           "StoreCrops before any stage that drops the key (to_tuple, "
                           "rename), e.g. wds.WebDataset(urls).map(StoreCrops(store))")
    return sample["__key__"]


def _where(sample: dict) -> str:
    url = sample.get("__url__")
    return f"{url} sample {sample['__key__']!r}" if url else f"sample {sample['__key__']!r}"
