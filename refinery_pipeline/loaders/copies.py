"""A copy of a label store's data set, lined up with the store row by row.

A store of format 5 names its images by key; any copy of its data set (another order, a subset,
a flat folder, WebDataset shards, a Hugging Face table, a resized copy) is joined with it by
:func:`.keys.join`. What a reader needs of that join is defined here once, for both loader
backends and ``refine train``:

* which store rows the copy holds usably, and which item of the copy holds each;
* which rows it cannot give: images *missing* from the copy, *reframed* ones (a frame that is
  no rescaling of the stored one: rotated, cropped or padded, so no box can be carried over)
  and, under a mixing recipe, images none of whose slots has its partner image in the copy
  (*unreplayable*). Refused by default (:class:`.errors.MissingImagesError`: the count, a few
  names and the fix), skipped when the caller allows missing images;
* per store row, whether the copy's bytes are the very bytes the refinery decoded (*exact*, by
  SHA-256), where the copy's bytes are known up front (a ``.beton``); other readers hash each
  item's bytes as they read it;
* the slot rule under a mixing recipe: crop ``(n, s)`` mixes with the partner crop ``(m, j)``
  of image m; where the copy lacks m, the crop cannot be replayed, so image n replays slot
  ``(s + i) mod K`` for the smallest ``i >= 0`` whose partner the copy holds (the same rule in
  both backends and in ``docs/label-store.md``).

No torch, no FFCV.
"""
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from ..core.errors import MissingImagesError, StoreMismatchError
from ..sources.keys import EXAMPLES, Join, join
from ..sources.pixels import reframed

ALLOW_MISSING = "pass --allow-missing (allow_missing=True in the API)"


@dataclass(frozen=True)
class CopyJoin:
    """Which item of a copy each store row replays, and what the copy could not give.

    Attributes
    ----------
    copy_index : numpy.ndarray
        ``(N,)`` int64, per store row: the copy's item replayed for it, -1 where none is
        (missing, reframed or unreplayable).
    item : numpy.ndarray
        ``(N,)`` int64, per store row: the copy's item holding its image usably, -1 where
        none does; unlike ``copy_index`` it keeps unreplayable rows, whose pixels still serve
        as other crops' mixing partners.
    keys : keys.Join or None
        The key join; None for a copy joined by position (the store's own data set).
    reframed, unreplayable : int
        Store rows the copy holds but cannot replay (see the module docstring).
    usable_slots : numpy.ndarray or None
        ``(N, K)`` bool under a mixing recipe with missing images: whether slot k of row n has
        its partner image in the copy; None where every slot does.
    exact : numpy.ndarray or None
        ``(N,)`` bool per store row: the copy's bytes hash to the store's digest; None where
        it is known per item only (read as it is decoded).
    examples : dict
        A few keys of reframed and unreplayable rows.
    """

    copy_index: np.ndarray
    item: np.ndarray
    keys: Optional[Join] = None
    reframed: int = 0
    unreplayable: int = 0
    usable_slots: Optional[np.ndarray] = None
    exact: Optional[np.ndarray] = None
    examples: dict = field(default_factory=dict)

    @classmethod
    def by_position(cls, num_rows: int, exact: bool) -> "CopyJoin":
        """The store's own data set, row n at item n (an unkeyed store's pixel source)."""
        rows = np.arange(num_rows, dtype=np.int64)
        return cls(rows, rows, exact=np.full(num_rows, bool(exact)))

    @property
    def num_rows(self) -> int:
        return len(self.copy_index)

    @property
    def rows(self) -> np.ndarray:
        """The store rows replayed, in increasing order."""
        return np.flatnonzero(self.copy_index >= 0)

    @property
    def used(self) -> int:
        return int(np.count_nonzero(self.copy_index >= 0))

    @property
    def skipped(self) -> int:
        """Store rows not replayed: missing, reframed or unreplayable."""
        return self.num_rows - self.used

    @property
    def matched(self) -> int:
        return self.num_rows if self.keys is None else self.keys.matched

    @property
    def missing(self) -> int:
        return 0 if self.keys is None else self.keys.missing

    def copy_count(self, what: str) -> int:
        """``extra``, ``ambiguous`` or ``duplicates`` items of the copy (0 by position)."""
        return 0 if self.keys is None else getattr(self.keys, what)

    def slots(self, rows, slots) -> np.ndarray:
        """The slots store rows ``rows`` replay where the epoch chose ``slots``: the same, or,
        under a mixing recipe whose partner the copy lacks, the next slot (mod K) whose partner
        it holds (:func:`replayable_slot`)."""
        return replayable_slot(slots, rows, self.usable_slots)

    def counts(self) -> dict:
        """Every count, for a run's config and reports (``exact``: rows known exact, where
        known up front)."""
        counts = {"store_images": self.num_rows, "matched": self.matched,
                  "missing": self.missing, "extra": self.copy_count("extra"),
                  "ambiguous": self.copy_count("ambiguous"),
                  "duplicates": self.copy_count("duplicates"), "reframed": self.reframed,
                  "unreplayable": self.unreplayable, "used": self.used, "skipped": self.skipped}
        if self.exact is not None:
            exact = int(np.count_nonzero(self.exact[self.rows]))
            counts.update(exact=exact, approximate=self.used - exact)
        return counts

    def findings(self) -> list:
        """One line per finding, as :meth:`.keys.Join.findings`, with the rows the copy holds
        but cannot replay and, where known, how many are exact."""
        lines = self.keys.findings() if self.keys is not None else \
            [f"matched: {self.num_rows:,} of {self.num_rows:,} store images (by position)"]
        for name, count, what in (
                ("reframed", self.reframed, "store images whose copy is rotated, cropped or "
                 "padded (skipped)"),
                ("unreplayable", self.unreplayable, "store images whose every slot mixes with a "
                 "missing partner (skipped)")):
            if count:
                names = ", ".join(repr(k) for k in self.examples.get(name, ()))
                lines.append(f"{name}: {count:,} {what}" + (f", e.g. {names}" if names else ""))
        counts = self.counts()
        if "exact" in counts:
            lines.append(f"exact: {counts['exact']:,} of {self.used:,} used images (the bytes "
                         f"the refinery decoded); approximate: {counts['approximate']:,}")
        return lines


def join_copy(store, copy_keys, *, location: str, labels=None, classes=None, frames=None,
              digests=None, recipe=None, allow_missing: bool = False) -> CopyJoin:
    """Join a copy with a keyed store, check its classes, and refuse what it cannot give.

    Parameters
    ----------
    store : LabelStore
        A keyed store (``store.keyed``).
    copy_keys : sequence of str
        The copy's keys, item by item (:meth:`.sources.ImageSource.keys`).
    location : str
        The copy, for messages.
    labels, classes : optional
        The copy's class of each item and their names, where it has them: compared with the
        store's (by name where named, else as a one-to-one renumbering); the store's are the
        truth.
    frames : numpy.ndarray, optional
        ``(N_copy, 2)`` each item's height and width, where known without decoding (a
        ``.beton``): reframed images are then found here; elsewhere as they are decoded.
    digests : numpy.ndarray, optional
        ``(N_copy, 32)`` SHA-256 of each item's bytes, where known up front: each row's exact
        verdict.
    recipe : plan.recipe.PlanAugment, optional
        The store's recipe on its crops: a mixing one needs each crop's partner image.
    allow_missing : bool
        Skip the rows the copy cannot give instead of refusing the copy.

    Raises
    ------
    StoreMismatchError
        No key of the copy names a store image, or a matched image has another class.
    MissingImagesError
        The copy cannot give every store row and ``allow_missing`` is False.
    """
    store_keys = store.read_keys()
    joined = join(store_keys, copy_keys)
    if joined.matched == 0:
        raise StoreMismatchError(
            f"{location}: none of its {len(copy_keys):,} images is one {store.location} labels "
            f"(copy key {_first(copy_keys)!r}, store key {store_keys[0]!r}); pass a copy of the "
            "data set the store was made from, keeping its file names or keys")
    if labels is not None:
        check_classes(store, joined, np.asarray(labels), classes, store_keys, location)
    present = joined.rows >= 0
    framed_out = _reframed_rows(store, joined, present, frames)
    present &= ~framed_out
    usable = replayable_slots(recipe, present)
    lone = present & ~usable.any(1) if usable is not None else np.zeros_like(present)
    copy_index = np.where(present & ~lone, joined.rows, -1)
    exact = None
    if digests is not None:
        exact = _exact_rows(store, joined.rows, present, np.asarray(digests, np.uint8))
    result = CopyJoin(copy_index, np.where(present, joined.rows, -1), joined,
                      int(framed_out.sum()), int(lone.sum()), usable, exact,
                      {"reframed": _names(store_keys, framed_out),
                       "unreplayable": _names(store_keys, lone)})
    if result.skipped and not allow_missing:
        _refuse_other_classes(store, present, classes, location)
        raise MissingImagesError(missing_message(result, location, store.location))
    return result


def _refuse_other_classes(store, present: np.ndarray, classes, location: str):
    """A copy lacking every image of some store classes while naming classes the store lacks
    is another data set (or a renamed class), not a copy with images lost: say so, rather
    than offer --allow-missing first."""
    if classes is None:
        return
    held = set(np.asarray(store.classes, dtype=object)[np.unique(store.read_labels()[present])])
    lacking = [c for c in store.classes if c not in held]
    extra = [c for c in classes if c not in set(store.classes)]
    if lacking and extra:
        raise StoreMismatchError(
            f"{location}: data set mismatch in 'classes': it names {_listed(extra)}, which "
            f"{store.location} does not, and holds no image of {_listed(lacking)}; pass a copy "
            "of the data set the store was made from (--allow-missing uses only the classes "
            "both hold)")


def _listed(names) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5:,} more" if len(names) > 5 else "")


def join_beton(store, dataset, *, recipe=None, allow_missing: bool = False) -> CopyJoin:
    """How a ``.beton`` (an ``ImageDataset``) lines up with ``store`` for the FFCV backend: by
    key where both name their images (frames from its metadata, exact from its bytes' digests);
    else by position, the store's own ``.beton``, checked by fingerprint (an unkeyed store, or
    a ``.beton`` written without names)."""
    if not (store.keyed and beton_names_images(dataset)):
        store.check_matches(dataset.fingerprint())
        return CopyJoin.by_position(store.layout.num_images, exact=True)
    from ..sources import BetonSource
    source = BetonSource(dataset.path)
    own = dataset.fingerprint()["image_bytes_sha256"] == store.dataset.image_bytes_sha256
    joined = join_copy(store, source.keys(), location=str(dataset.path), labels=source.labels(),
                       classes=source.classes, frames=source.sizes,
                       digests=None if own else source.digests(), recipe=recipe,
                       allow_missing=allow_missing)
    if not own:
        return joined
    # the very bytes of the store's .beton, image for image: exact where row n is item n
    same = joined.copy_index == np.arange(joined.num_rows)
    return replace(joined, exact=same)


def beton_names_images(dataset) -> bool:
    """Whether a ``.beton``'s sidecar names its images (keys, or the files it was written
    from), as :class:`.sources.BetonSource` reads them."""
    from ..sources.beton import KEYS_FIELD
    return dataset.meta.get(KEYS_FIELD) is not None or bool(dataset.meta.get("files"))


def missing_message(joined: CopyJoin, location: str, store_location: str) -> str:
    """The one line refusing a copy that lacks store images: counts, a few names, the fix."""
    parts = []
    if joined.missing:
        names = ", ".join(repr(k) for k in joined.keys.examples.get("missing", ()))
        parts.append(f"lacks {joined.missing:,} of the {joined.num_rows:,} images "
                     f"{store_location} labels (e.g. {names})")
    if joined.reframed:
        parts.append(f"holds {joined.reframed:,} rotated, cropped or padded (e.g. "
                     f"{', '.join(map(repr, joined.examples['reframed']))})")
    if joined.unreplayable:
        parts.append(f"lacks the mixing partners of every slot of {joined.unreplayable:,}")
    return (f"{location}: {'; '.join(parts)}; {ALLOW_MISSING} to use the {joined.used:,} it "
            "can give, or restore the rest")


def reframed_message(where: str, stored, actual) -> str:
    """The one line refusing an image whose copy is rotated, cropped or padded, found as it is
    decoded (readers that know frames up front count such images instead)."""
    (h, w), (h2, w2) = (int(v) for v in stored), (int(v) for v in actual)
    return (f"{where}: {w2}x{h2} pixels, not the stored {w}x{h} rescaled (rotated, cropped or "
            "padded), so no stored box fits it; replace it with the original image, or remove "
            f"it from the copy and {ALLOW_MISSING} (`refine check-copy` lists all such images)")


def check_classes(store, joined: Join, labels, classes, store_keys, location: str):
    """Refuse a copy whose matched images have other classes than the store records: by name
    where the copy names its classes (it may number them otherwise), else as a one-to-one
    renumbering (each copy number one store class and back)."""
    rows = np.flatnonzero(joined.rows >= 0)
    ours = store.read_labels()[rows]
    theirs = labels[joined.rows[rows]]
    if classes is not None:
        names = np.asarray(store.classes, dtype=object)
        bad = names[ours] != np.asarray(classes, dtype=object)[theirs]
    else:
        bad = _not_one_to_one(theirs, ours)
    if bad.any():
        n = int(rows[np.argmax(bad)])
        copy_class = classes[labels[joined.rows[n]]] if classes is not None else \
            f"number {labels[joined.rows[n]]}"
        raise StoreMismatchError(
            f"{location}: {int(bad.sum()):,} images have other classes than in "
            f"{store.location}, e.g. {store_keys[n]!r} is {copy_class!r} there and "
            f"{store.classes[store.read_labels()[n]]!r} in the store; pass a copy of the data "
            "set the store was made from (classes are compared by name)")


def _not_one_to_one(theirs: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """Items whose copy class number shares a store class with another number, or the
    reverse: a renumbering maps each number to one class."""
    bad = np.zeros(len(theirs), bool)
    for a, b in ((theirs, ours), (ours, theirs)):
        pairs = np.unique(np.stack([a, b], -1), axis=0)
        values, counts = np.unique(pairs[:, 0], return_counts=True)
        bad |= np.isin(a, values[counts > 1])
    return bad


def replayable_slots(recipe, present: np.ndarray) -> Optional[np.ndarray]:
    """``(N, K)`` bool: whether crop (n, k)'s mixing partner image is ``present``; None where
    the recipe does not mix or every image is present (every slot replayable)."""
    if recipe is None or not recipe.recipe.mixes or present.all():
        return None
    N, K = recipe.num_images, recipe.crops_per_image
    images = np.arange(N)
    usable = np.empty((N, K), bool)
    for k in range(K):  # one column at a time: N x K draws at once would be GBs at ImageNet
        partners, _ = recipe.partners(images, np.full(N, k))
        usable[:, k] = present[partners]
    return usable


def replayable_slot(slots, rows, usable: Optional[np.ndarray]) -> np.ndarray:
    """``slots`` of store rows ``rows``, each moved to the first slot ``(s + i) mod K``,
    ``i >= 0``, that ``usable`` allows (unchanged where ``usable`` is None). A row no slot of
    which is usable keeps its slot; it is never replayed (:attr:`CopyJoin.unreplayable`)."""
    slots = np.asarray(slots, np.int64)
    if usable is None:
        return slots
    K = usable.shape[1]
    candidates = (slots.reshape(-1, 1) + np.arange(K)) % K
    allowed = usable[np.asarray(rows).reshape(-1, 1), candidates]
    first = candidates[np.arange(len(candidates)), allowed.argmax(1)]
    return first.reshape(slots.shape)


def _reframed_rows(store, joined: Join, present: np.ndarray, frames) -> np.ndarray:
    out = np.zeros(len(present), bool)
    if frames is None:
        return out
    stored = store.read_image_sizes()
    rows = np.flatnonzero(present)
    out[rows] = reframed(stored[rows], np.asarray(frames)[joined.rows[rows]])
    return out


def _exact_rows(store, copy_of_row, present, digests) -> np.ndarray:
    """Rows whose copy bytes hash to the store's digest (False where the store records none)."""
    recorded = store.read_image_digests()
    exact = np.zeros(len(present), bool)
    if recorded is None:
        return exact
    rows = np.flatnonzero(present)
    exact[rows] = (digests[copy_of_row[rows]] == recorded[rows]).all(1)
    return exact


def _names(keys, mask) -> list:
    return [keys[n] for n in np.flatnonzero(mask)[:EXAMPLES]]


def _first(keys):
    return keys[0] if len(keys) else None
