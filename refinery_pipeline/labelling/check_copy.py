"""``refine check-copy``: can a copy of a label store's data set be trained on, and how exactly?

What a team runs before training on a store it did not make. The copy is joined with the store
as a training run joins it (:mod:`.copies`: by key for a store that names its images, by
position for older ones), then each matched image's bytes are read once and the image is told:

* *exact*: its bytes hash to the store's ``image_digests``, the very bytes the refinery
  decoded, so every crop is the labelled pixels;
* *resized*: another frame, a rescaling of the stored one; boxes are rescaled, labels
  approximate;
* *re-encoded*: the stored frame, other bytes (another JPEG quality, a PNG); approximate;
* *decoded*: pixels of a source without encoded bytes (a mapped data set); approximate;
* *reframed*: a frame that is no rescaling of the stored one (rotated, cropped, padded);
  skipped like a missing image;
* *unreadable*: no image header; a training run would stop at it.

Given the refinery, a seeded sample of crops is cut from the copy's pixels exactly as a training
run cuts them (:class:`.torch_data.StoreCropDataset`) and labelled again in the BN mode the store
records. Eval-mode labels are made crop by crop. Train-mode labels depend on their batch
neighbours, so whole loader batches of the original run are rebuilt (:meth:`.Batching.units`,
as ``refine audit`` does) from copies holding all their images. Stored and new labels are
compared for exact and approximate crops apart: an exact crop that disagrees means another or a
nondeterministic refinery, not the copy.
"""
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Optional

import numpy as np

from ..core.errors import DataSetError, StoreMismatchError
from ..core.validators import flag, optional_callable, whole_number
from ..loaders.copies import EXAMPLES, replayable_slots
from ..sources.keys import join
from ..sources.pixels import reframed
from ..store.label_store import open_for_reading
from .label_agreement import Agreement, agreement_lines, measure_agreement
from .verdicts import DECODED, EXACT, REENCODED, REFRAMED, RESIZED, UNREADABLE, USABLE_VERDICTS

USABLE, NEEDS_ALLOW_MISSING, UNUSABLE = 0, 1, 2  # CopyReport.status: check-copy's exit code
DEFAULT_SAMPLE = 1000  # crops labelled again, by default

SCAN_BATCH = 512  # images read per round of the hashing threads (bounds memory)


@dataclass
class CopyReport:
    """What ``refine check-copy`` prints: ``lines`` (one per finding, the last the verdict),
    ``status`` (``USABLE`` 0, ``NEEDS_ALLOW_MISSING`` 1, ``UNUSABLE`` 2: its exit code),
    ``counts`` (each finding's number), ``verdicts`` (``(N,)`` uint8 per store row: ``ABSENT``,
    ``EXACT``, ``RESIZED``, ``REENCODED``, ``DECODED``, ``REFRAMED``, ``UNREADABLE``) and the
    label ``agreement`` (None without a refinery, or where nothing could be compared)."""
    status: int
    lines: list
    counts: dict = field(default_factory=dict)
    verdicts: Optional[np.ndarray] = None
    agreement: Optional[Agreement] = None

    @property
    def usable(self) -> bool:
        return self.status == USABLE


def check_copy(store, data, refinery=None, *, sample: int = DEFAULT_SAMPLE, seed: int = 0,
               allow_missing: bool = False, num_workers: int = 2, key_fn=None,
               **source_options) -> CopyReport:
    """Check a copy of a store's data set before training on it: what matches, what is
    exact, what is approximate, and (given the refinery) how far the stored labels are from the
    refinery's on the copy's pixels.

    Parameters
    ----------
    store : LabelStore or str or os.PathLike
        The label store (checked as a training run checks it).
    data : str, os.PathLike, list or object
        The copy, in any form :class:`~refinery_pipeline.StoreCropDataset` reads (a tree, a
        flat folder, a list of paths, a ``.beton``, WebDataset shards, a Hugging Face table, a
        map-style data set with ``key_fn``, an opened ``ImageSource``); for a store that names
        no images, the data set it was made from.
    refinery : Labeller, optional
        The refinery that wrote the store (``refinery.load_as_recorded``); without it, labels
        are not compared.
    sample : int
        Crops labelled again (train-mode BN: rounded up to whole loader batches).
    seed : int
        Which crops are sampled.
    allow_missing : bool
        The copy will be trained with ``--allow-missing``: images it lacks make it usable
        (status 0), not ``NEEDS_ALLOW_MISSING``.
    num_workers : int
        Threads hashing the copy's bytes.
    key_fn : callable, optional
        Keys of a map-style data set without file names.
    **source_options
        How ``data`` is read (:func:`~refinery_pipeline.sources.open_source`: ``split``,
        ``key_column``, ``classes``, ...).

    Returns
    -------
    CopyReport

    Raises
    ------
    StoreCorruptError, IncompleteStoreError
        The store fails the checks a training run makes.
    StoreMismatchError
        ``refinery`` is not the one that wrote the store.
    DataSetError
        The copy cannot be opened.
    ArgumentError
        An argument of the wrong kind or range.
    """
    flag("allow_missing", allow_missing)
    optional_callable("key_fn", key_fn)
    sample = whole_number("sample", sample, 1, "pass how many crops to label again, e.g. 1000")
    seed = whole_number("seed", seed)
    num_workers = whole_number("num_workers", num_workers, 1, "pass 1 or more threads")
    store = open_for_reading(store)
    if refinery is not None:
        _require_same_refinery(store, refinery)
    spec = data
    if source_options:
        from ..sources import open_source
        spec = open_source(data, **source_options)
    from ..loaders.pixel_readers import keyed_source
    source = keyed_source(store, spec, key_fn) if store.keyed else None
    found = _by_key(store, source, num_workers) if source is not None else \
        _by_position(store, spec, num_workers)
    if found.failure is not None:
        return CopyReport(UNUSABLE, found.lines + [f"unusable: {found.failure}"])
    counts = found.counts()
    status, verdict = _verdict(counts, allow_missing)
    agreement = None
    if refinery is not None and counts["used"]:
        agreement = measure_agreement(found.crops, refinery, found.verdicts, found.usable_slots,
                                      sample, seed)
    lines = found.lines + found.verdict_lines() + agreement_lines(agreement, store, seed)
    return CopyReport(status, lines + [verdict], counts, found.verdicts, agreement)


def _require_same_refinery(store, refinery):
    from .refinery import identity_mismatch
    mismatch = identity_mismatch(store.attrs["refinery"], refinery)
    if mismatch:
        raise StoreMismatchError(f"{store.location}: {mismatch}")


# ----------------------------------------------------------------------------- the join

@dataclass
class _Found:
    """The copy joined and read: the reader of its crops, each store row's verdict, and the
    join's own lines (matched, missing, extra, ...); ``failure`` where nothing is usable."""
    crops: object = None
    verdicts: Optional[np.ndarray] = None
    lines: list = field(default_factory=list)
    failure: Optional[str] = None
    matched: np.ndarray = None  # (N,) bool: store rows the copy holds
    digests: bool = True        # whether the store records digests (exact can be told)
    usable_slots: Optional[np.ndarray] = None
    unreplayable: int = 0
    examples: dict = field(default_factory=dict)

    def settle(self, keys):
        """Rows usable once reframed and unreadable images are out, and, under a mixing
        recipe, the slots whose partner image is usable (a row with none is unreplayable)."""
        present = np.isin(self.verdicts, USABLE_VERDICTS)
        self.usable_slots = replayable_slots(self.crops.recipe, present)
        lone = present & ~self.usable_slots.any(1) if self.usable_slots is not None else \
            np.zeros_like(present)
        self.unreplayable = int(lone.sum())
        for name, mask in (("reframed", self.verdicts == REFRAMED),
                           ("unreadable", self.verdicts == UNREADABLE), ("unreplayable", lone)):
            self.examples[name] = [keys(n) for n in np.flatnonzero(mask)[:EXAMPLES]]
        return self

    def count(self, verdict: int) -> int:
        return int(np.count_nonzero(self.verdicts == verdict))

    def counts(self) -> dict:
        n = len(self.verdicts)
        used = int(np.isin(self.verdicts, USABLE_VERDICTS).sum()) - self.unreplayable
        counts = {"store_images": n, "matched": int(self.matched.sum()),
                  "missing": int(n - self.matched.sum()), "reframed": self.count(REFRAMED),
                  "unreadable": self.count(UNREADABLE), "unreplayable": self.unreplayable,
                  "used": used, "exact": self.count(EXACT), "resized": self.count(RESIZED),
                  "reencoded": self.count(REENCODED), "decoded": self.count(DECODED)}
        keyed = getattr(self.crops.join, "keys", None)
        for name in ("extra", "ambiguous", "duplicates"):
            counts[name] = 0 if keyed is None else getattr(keyed, name)
        return counts

    def verdict_lines(self) -> list:
        """The lines of what was read: images unusable, then how exact the usable ones are."""
        lines = []
        for name, count, what in (
                ("reframed", self.count(REFRAMED), "store images whose copy is rotated, cropped "
                 "or padded (no stored box fits it: skipped)"),
                ("unreadable", self.count(UNREADABLE), "store images whose copy is no image "
                 "(a training run would stop at it)"),
                ("unreplayable", self.unreplayable, "store images whose every slot mixes with "
                 "an image the copy cannot give (skipped)")):
            if count:
                names = ", ".join(repr(k) for k in self.examples[name])
                lines.append(f"{name}: {count:,} {what}, e.g. {names}")
        usable = int(np.isin(self.verdicts, USABLE_VERDICTS).sum())
        exact_what = "the bytes the refinery decoded: crops are the labelled pixels" \
            if self.digests else "unknown: the store records no digests of its images"
        lines.append(f"exact: {self.count(EXACT):,} of {usable:,} usable images ({exact_what})")
        for name, verdict, what in (
                ("resized", RESIZED, "another size of the image: boxes rescaled, labels "
                 "approximate"),
                ("re-encoded", REENCODED, "the stored size, other bytes: labels approximate"
                 if self.digests else "the stored size, bytes not comparable: labels "
                 "approximate unless the bytes are the ones labelled"),
                ("decoded", DECODED, "pixels without their encoded bytes: labels approximate")):
            if self.count(verdict):
                lines.append(f"{name}: {self.count(verdict):,} ({what})")
        return lines


def _by_key(store, source, workers: int) -> _Found:
    """A keyed store and a copy with keys: joined as a training run joins it, then every
    matched image read once (hash, frame)."""
    from ..loaders.torch_data import StoreCropDataset
    header = f"copy: {source.location} ({source.kind}, {len(source):,} images)"
    try:
        crops = StoreCropDataset(store, source, allow_missing=True, crop_format="numpy")
    except StoreMismatchError as exc:  # nothing matches, or classes differ
        return _Found(lines=[header] + join(store.read_keys(), source.keys()).findings(),
                      failure=str(exc))
    joined = crops.join.keys
    matched = joined.rows >= 0
    rows = np.flatnonzero(matched)
    digests = store.read_image_digests()
    verdicts = np.zeros(len(matched), np.uint8)
    if source.has_bytes:
        read = source.iter_encoded(joined.rows[rows])
        verdicts[rows] = _scan(read, rows, store.read_image_sizes(), digests, workers)
    else:
        frames = ((source.image(int(i)).shape[:2]) for i in joined.rows[rows])
        verdicts[rows] = [_frame_verdict(s, f, DECODED) for s, f in
                          zip(store.read_image_sizes()[rows], frames)]
    keys = store.read_keys()
    return _Found(crops, verdicts, [header] + joined.findings(), matched=matched,
                  digests=digests is not None).settle(keys.__getitem__)


def _by_position(store, spec, workers: int) -> _Found:
    """A store that names no images (or a ``.beton`` without keys): only the data set it was
    made from, in its order, is usable: its ``.beton`` (exact), its tree (re-encoded or
    resized: the ``.beton`` the store was labelled from held a re-encoding), a map-style data
    set (decoded pixels)."""
    from ..loaders.pixel_readers import BetonImages, FolderImages
    from ..loaders.torch_data import StoreCropDataset
    n = store.layout.num_images
    why = (f"{store.location} names no images (store format {store.format_version})"
           if not store.keyed else "the copy names no images")
    try:
        crops = StoreCropDataset(store, spec, crop_format="numpy")
    except (StoreMismatchError, DataSetError) as exc:
        return _Found(lines=[f"matched: 0 of {n:,} store images ({why}, so only the data set it "
                             "was made from, in its order, is usable)"], failure=str(exc))
    images = crops.pixels.images
    sizes = store.read_image_sizes()
    if isinstance(images, BetonImages):
        verdicts = np.full(n, EXACT, np.uint8)
    elif isinstance(images, FolderImages):
        from ..sources.base import read_file_bytes
        verdicts = _scan(map(read_file_bytes, images.files), np.arange(n), sizes, None, workers)
    else:
        verdicts = np.array([_frame_verdict(sizes[r], images.image(r).shape[:2], DECODED)
                             for r in range(n)], np.uint8)
    found = _Found(crops, verdicts, [f"matched: {n:,} of {n:,} store images (by position: "
                                     f"{why})"], matched=np.ones(n, bool),
                   digests=isinstance(images, BetonImages))
    return found.settle(lambda r: f"image {r}")


def _scan(encoded, rows, stored_sizes, digests, workers: int) -> np.ndarray:
    """The verdict of each store row ``rows`` from the copy's bytes ``encoded`` (an iterator,
    in the same order), read in rounds of :data:`SCAN_BATCH` and hashed in ``workers``
    threads (hashlib releases the GIL)."""
    def verdict(pair):
        n, data = pair
        frame = encoded_frame(data)
        if frame is None:
            return UNREADABLE
        if digests is not None and hashlib.sha256(data).digest() == digests[n].tobytes():
            return EXACT
        return _frame_verdict(stored_sizes[n], frame, REENCODED)

    out, pairs = [], zip(np.asarray(rows).tolist(), encoded)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            batch = list(islice(pairs, SCAN_BATCH))
            if not batch:
                break
            out.extend(pool.map(verdict, batch))
    return np.asarray(out, np.uint8)


def _frame_verdict(stored, frame, same: int) -> int:
    """``same`` where ``frame`` is the stored one, else resized or reframed."""
    if tuple(int(v) for v in frame) == tuple(int(v) for v in stored):
        return same
    return REFRAMED if reframed(stored, frame) else RESIZED


def encoded_frame(data: bytes):
    """``(height, width)`` of encoded image bytes from their header (nothing decoded), or
    None where no image header can be read."""
    if data[:2] == b"\xff\xd8":
        import simplejpeg
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return height, width
        except ValueError:
            pass  # PIL below
    import io

    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return height, width
    except Exception:  # noqa: BLE001 - PIL raises many types for foreign bytes
        return None


def _verdict(counts: dict, allow_missing: bool) -> tuple:
    """``(status, the last line)``."""
    n, used = counts["store_images"], counts["used"]
    if counts["unreadable"]:
        return UNUSABLE, (f"unusable: {counts['unreadable']:,} images of the copy are no "
                          "images (a training run would stop at the first); replace them, or "
                          "remove them from the copy and train with --allow-missing")
    if not used:
        return UNUSABLE, "unusable: no store image can be replayed from the copy"
    share = f"{used:,} of {n:,} store images"
    if used == n:
        return USABLE, f"usable: all {share}"
    if allow_missing:
        return USABLE, (f"usable with --allow-missing: {share} (the rest missing, reframed or "
                        "without a mixing partner)")
    return NEEDS_ALLOW_MISSING, (f"usable only with --allow-missing: {share} (the rest missing, "
                                 "reframed or without a mixing partner); pass --allow-missing "
                                 "to train on them, or restore the rest")


# ----------------------------------------------------------------------------- the labels
