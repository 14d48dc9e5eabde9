"""Image keys and the join of a label store's images with any copy of its data set.

A store addresses each image by a key, not by its position, so a copy in another order, another
layout or with images lost still finds its labels. A key is a normalized relative path:
``n01440764/n01440764_10026`` for a tree, WebDataset's ``__key__``, a HF table's file-name
column. :func:`join` pairs a store's keys with a copy's: exactly where they are equal, else by
the trailing path components of the store key (a flat copy holds ``n01440764_10026``), but only
where that suffix names one store image. It never guesses: a suffix shared by several store
images, or a store image claimed by several copy items, matches nothing and is counted.

Pure Python and numpy (no torch, no FFCV), fast enough for ImageNet-21k's 14M keys: one dict
look-up per key, and suffixes indexed only for the copy keys that did not match exactly.
"""
import re
import unicodedata
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from ..core.errors import ArgumentError
from .dataset import IMAGE_EXTENSIONS

EXAMPLES = 5  # names shown for each kind of finding

# One or more image extensions ending a key, after at least one other character of its name.
_EXTENSION_TAIL = re.compile(
    r"(?<=[^/])(?:%s)+$" % "|".join(re.escape(e) for e in IMAGE_EXTENSIONS), re.IGNORECASE)
# The same, on many keys joined by line breaks: one pass over 14M keys instead of 14M calls. It
# starts with a literal dot, which the regex engine finds fast (the look-behind above would be
# tried at every character).
_LAST_EXTENSION = re.compile(
    r"\.(?:%s)(?=\n|\Z)" % "|".join(re.escape(e[1:]) for e in IMAGE_EXTENSIONS), re.IGNORECASE)
# Keys joined by line breaks, with one more at each end, that only the careful path cleans:
# backslashes, empty or "." components (and names starting with a dot, to be safe), leading or
# trailing separators, empty keys, characters no key may hold.
_UNCLEAN = ("\\", "//", "\n/", "/\n", "\n.", "/.", "\n\n", "\0", "\r")
_FORBIDDEN = ("\0", "\n", "\r")  # NUL pads keys in a store; line breaks separate them in lists


def normalize_key(text) -> str:
    """The key of an image named ``text`` (a path, or a key already).

    POSIX separators; no leading ``./`` or ``/``, no empty or ``.`` components; trailing image
    extensions (any of ``dataset.IMAGE_EXTENSIONS``, any case) removed, so ``x.jpg.png`` gives
    ``x`` (WebDataset's ``__key__`` ends at the first dot) and a re-encoded copy (``x.png`` ->
    ``x.jpg``) keeps its key; Unicode in NFC (a name copied through macOS's NFD file names keeps
    its key). Idempotent.

    Parameters
    ----------
    text : str or os.PathLike
        A file path (relative to the data set's root) or a key.

    Returns
    -------
    str
        The key: non-empty, without NUL or line-break characters.

    Raises
    ------
    ArgumentError
        ``text`` is not a string or path, names no image (empty, only separators), or holds a
        NUL or line break (stores pad keys with NUL; lists separate them by lines).
    """
    text = _as_text(text)
    if any(c in text for c in _FORBIDDEN):
        raise ArgumentError(f"key {text!r}: holds a NUL or line-break character; rename the "
                            "file or return another key")
    key, previous = _clean_components(text.replace("\\", "/")), None
    while key != previous:  # "a/x.jpg/..jpg" -> "a/x.jpg/." -> "a/x.jpg" -> "a/x"
        previous, key = key, _clean_components(_EXTENSION_TAIL.sub("", key))
    key = unicodedata.normalize("NFC", key)
    if not key:
        raise ArgumentError(f"key {text!r}: names no image (empty, or only separators); give "
                            "every image a file name or key")
    return key


def normalize_keys(texts) -> list:
    """:func:`normalize_key` of each of ``texts``, as a list (the same result, in one pass over
    all keys where none needs more than its extension removed)."""
    texts = list(texts)
    try:
        blob = "\n".join(texts)
    except TypeError:  # paths among them
        texts = [_as_text(t) for t in texts]
        blob = "\n".join(texts)
    if not texts:
        return []
    if blob.count("\n") != len(texts) - 1 or _unclean(blob):
        return [normalize_key(t) for t in texts]
    # What is left can only lose extensions: a key emptied or cut to "x/" would have started
    # with "." or held "/." (both unclean), so no second check is needed.
    removed = 1
    while removed:  # "x.jpg.png": one extension per pass
        blob, removed = _LAST_EXTENSION.subn("", blob)
    if not blob.isascii():
        blob = unicodedata.normalize("NFC", blob)  # composes nothing across a line break
    return blob.split("\n")


def _unclean(blob: str) -> bool:
    padded = f"\n{blob}\n"
    return any(pattern in padded for pattern in _UNCLEAN)


def _clean_components(path: str) -> str:
    return "/".join(part for part in path.split("/") if part not in ("", "."))


def _as_text(text) -> str:
    if isinstance(text, str):
        return text
    if hasattr(text, "__fspath__"):
        return str(text.__fspath__())
    raise ArgumentError(f"key {text!r}: a key is a str or a path, not {type(text).__name__}; "
                        "return str from the key function")


# what happened to each copy item (Join.copy_status)
MATCHED, EXTRA, AMBIGUOUS, DUPLICATE = 0, 1, 2, 3
COPY_STATUS = ("matched", "extra", "ambiguous", "duplicate")


@dataclass(frozen=True)
class Join:
    """How a copy's items line up with a store's rows.

    Attributes
    ----------
    rows : numpy.ndarray
        ``(N_store,)`` int64: the copy's index of each store row, -1 where the copy lacks it.
    copy_rows : numpy.ndarray
        ``(N_copy,)`` int64, the inverse: the store row of each copy item, -1 for none.
    copy_status : numpy.ndarray
        ``(N_copy,)`` uint8: ``MATCHED``, ``EXTRA`` (the store has no such image),
        ``AMBIGUOUS`` (its key is the trailing part of several store keys: which one is
        unknown) or ``DUPLICATE`` (it and another copy item claim the same store row: which one
        is unknown). Only matched items have a store row.
    by_suffix : int
        Matched items whose key is a trailing part of the store key, not equal to it.
    examples : dict
        A few names for each finding: ``missing`` (store keys), ``extra``, ``ambiguous`` and
        ``duplicate`` (copy keys).
    """

    rows: np.ndarray
    copy_rows: np.ndarray
    copy_status: np.ndarray
    by_suffix: int = 0
    examples: dict = field(default_factory=dict)

    @property
    def matched(self) -> int:
        return int(np.count_nonzero(self.rows >= 0))

    @property
    def missing(self) -> int:
        """Store rows the copy lacks (including rows whose copy items are ambiguous or
        duplicated)."""
        return int(np.count_nonzero(self.rows < 0))

    @property
    def extra(self) -> int:
        return int(np.count_nonzero(self.copy_status == EXTRA))

    @property
    def ambiguous(self) -> int:
        return int(np.count_nonzero(self.copy_status == AMBIGUOUS))

    @property
    def duplicates(self) -> int:
        return int(np.count_nonzero(self.copy_status == DUPLICATE))

    @property
    def matched_rows(self) -> np.ndarray:
        """The store rows the copy holds, in increasing order."""
        return np.flatnonzero(self.rows >= 0)

    def findings(self) -> list:
        """One line per finding (``matched: ...``, ``missing: ...``), for reports and errors;
        counts of zero are left out, except ``matched``."""
        total = len(self.rows)
        lines = [f"matched: {self.matched:,} of {total:,} store images"
                 + (f" ({self.by_suffix:,} by a trailing part of their key)" if self.by_suffix
                    else "")]
        described = (("missing", self.missing, "store images the copy lacks"),
                     ("extra", self.extra, "copy items the store lacks (ignored)"),
                     ("ambiguous", self.ambiguous,
                      "copy items whose key ends several store keys (matched to none)"),
                     ("duplicate", self.duplicates,
                      "copy items claiming a store image another item claims (matched to none)"))
        for name, count, what in described:
            if count:
                names = ", ".join(repr(k) for k in self.examples.get(name, ()))
                lines.append(f"{name}: {count:,} {what}, e.g. {names}")
        return lines


def join(store_keys, copy_keys) -> Join:
    """Pair each store row with the copy item holding the same image.

    A copy key matches the store key equal to it; failing that, the store key whose last ``j``
    path components it equals (``j`` = its own number of components), provided no other store
    key ends the same way. Keys are compared after :func:`normalize_key`, so file names with
    extensions may be passed. Rules for conflicts (nothing is guessed):

    * a suffix shared by several store keys matches none of them (``ambiguous``);
    * a store row claimed by several copy items (the same key listed twice, or one item by
      its full key and another by a suffix) matches none of them (``duplicate``); the row is
      ``missing``.

    Parameters
    ----------
    store_keys : sequence of str
        The store's keys, one per row; unique.
    copy_keys : sequence of str
        The copy's keys, one per item, in the copy's order.

    Returns
    -------
    Join
        ``rows`` (copy index per store row, -1 missing), its inverse ``copy_rows``, the
        status of each copy item, counts and a few example names.

    Raises
    ------
    ArgumentError
        A key is not a string or names no image, or two store rows share a key.
    """
    store_keys, copy_keys = normalize_keys(store_keys), normalize_keys(copy_keys)
    index = _unique_index(store_keys)
    copy_rows = np.fromiter(map(index.get, copy_keys, repeat(-1)), np.int64, len(copy_keys))
    status = np.where(copy_rows >= 0, MATCHED, EXTRA).astype(np.uint8)
    by_suffix = _match_suffixes(store_keys, copy_keys, copy_rows, status)
    _refuse_shared_rows(copy_rows, status, len(store_keys))
    rows = np.full(len(store_keys), -1, np.int64)
    matched = np.flatnonzero(copy_rows >= 0)
    rows[copy_rows[matched]] = matched
    return Join(rows=rows, copy_rows=copy_rows, copy_status=status,
                by_suffix=int(np.count_nonzero(by_suffix & (copy_rows >= 0))),
                examples=_examples(store_keys, copy_keys, rows, status))


NO_ROW, AMBIGUOUS_ROW = -1, -2  # KeyIndex.row of a key naming no store image, or several


class KeyIndex:
    """A store's keys, looked up one copy key at a time by :func:`join`'s rule: equal, else
    the one store key whose last components it equals (a suffix several store keys end with
    matches none). For a stream of items whose keys are not known ahead (WebDataset shards read
    in order); a copy listed whole is joined by :func:`join`, which also finds duplicates.

    Suffixes are indexed on the first look-up of a key with that many components, once.
    """

    def __init__(self, store_keys):
        self.keys = normalize_keys(store_keys)
        self._index = _unique_index(self.keys)
        self._suffixes = {}  # number of components -> {suffix: store row or AMBIGUOUS_ROW}

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key) -> int:
        """The store row of copy key ``key`` (normalized here), ``NO_ROW`` (-1) when it names
        no store image, ``AMBIGUOUS_ROW`` (-2) when it ends several store keys."""
        key = normalize_key(key)
        row = self._index.get(key)
        if row is not None:
            return row
        depth = key.count("/") + 1
        if depth not in self._suffixes:
            self._suffixes[depth] = self._suffix_table(depth)
        return self._suffixes[depth].get(key, NO_ROW)

    def _suffix_table(self, depth: int) -> dict:
        """Each store key's last ``depth`` components -> its row (keys with more components
        only: a key of ``depth`` components would have matched whole)."""
        table = {}
        for row, key in enumerate(self.keys):
            parts = key.split("/")
            if len(parts) > depth:
                suffix = "/".join(parts[-depth:])
                table[suffix] = AMBIGUOUS_ROW if suffix in table else row
        return table


def _unique_index(store_keys) -> dict:
    index = dict(zip(store_keys, range(len(store_keys))))
    if len(index) < len(store_keys):
        twice = next(k for n, k in enumerate(store_keys) if index[k] != n)
        rows = [n for n, k in enumerate(store_keys) if k == twice][:2]
        raise ArgumentError(f"store_keys: {twice!r} is the key of rows {rows[0]} and {rows[1]}; "
                            "a store's keys are unique: pass the keys of one store")
    return index


def _match_suffixes(store_keys, copy_keys, copy_rows, status) -> np.ndarray:
    """Match the copy items left unmatched to the store keys they end (in place); returns
    which items were matched so. Only the depths that unmatched copy keys have are indexed,
    and only their values kept, so a copy that matches exactly costs nothing here."""
    by_suffix = np.zeros(len(copy_keys), bool)
    unmatched = np.flatnonzero(copy_rows < 0)
    unmatched_keys = [copy_keys[i] for i in unmatched.tolist()]
    slots = dict(zip(dict.fromkeys(unmatched_keys), range(len(unmatched_keys))))
    if not slots:
        return by_suffix
    hit_slots, hit_rows = _suffix_hits(store_keys, slots)
    owner = np.full(len(slots), -1, np.int64)  # slot -> store row; -2: several store rows
    owner[hit_slots] = hit_rows
    owner[np.bincount(hit_slots, minlength=len(slots)) > 1] = -2
    found = owner[np.fromiter(map(slots.__getitem__, unmatched_keys), np.int64, len(unmatched))]
    status[unmatched[found == -2]] = AMBIGUOUS
    hits = unmatched[found >= 0]
    copy_rows[hits], status[hits], by_suffix[hits] = found[found >= 0], MATCHED, True
    return by_suffix


def _suffix_hits(store_keys, slots) -> tuple:
    """``(slots, store rows)``: each suffix of a store key (its last ``j`` components) that is
    one of the wanted copy keys ``slots``. A store key shorter than ``j`` components is left
    whole by the pattern and cannot be wanted: a wanted key equals no store key."""
    blob = "\n".join(store_keys)
    hit_slots, hit_rows = [], []
    for depth in sorted({k.count("/") + 1 for k in slots}):
        # drop everything up to the separator followed by exactly depth-1 more separators
        tail = re.compile(r"^[^\n]*?/(?=(?:[^/\n]*/){%d}[^/\n]*$)" % (depth - 1), re.MULTILINE)
        suffixes = tail.sub("", blob).split("\n")
        found = np.fromiter(map(slots.get, suffixes, repeat(-1)), np.int64, len(suffixes))
        rows = np.flatnonzero(found >= 0)
        hit_slots.append(found[rows])
        hit_rows.append(rows)
    return np.concatenate(hit_slots), np.concatenate(hit_rows)


def _refuse_shared_rows(copy_rows, status, num_rows: int):
    """Unmatch every copy item whose store row another item also claims (in place)."""
    claimed = copy_rows[copy_rows >= 0]
    shared = np.bincount(claimed, minlength=num_rows) > 1
    if shared.any():
        clash = (copy_rows >= 0) & shared[np.maximum(copy_rows, 0)]
        copy_rows[clash], status[clash] = -1, DUPLICATE


def _examples(store_keys, copy_keys, rows, status) -> dict:
    examples = {"missing": [store_keys[n] for n in np.flatnonzero(rows < 0)[:EXAMPLES]]}
    for code in (EXTRA, AMBIGUOUS, DUPLICATE):
        picks = np.flatnonzero(status == code)[:EXAMPLES]
        examples[COPY_STATUS[code]] = [copy_keys[i] for i in picks]
    return examples
