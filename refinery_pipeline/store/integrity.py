"""Whether a label store is still what was written: the checks behind ``refine verify`` and
every read.

:class:`StoreIntegrity` is the part of :class:`.label_store.LabelStore` that finds damage and
edits: the layout against the arrays (:meth:`~StoreIntegrity.layout_problems`), the sealed
attributes and per-image arrays against their digests (:meth:`~StoreIntegrity.content_problems`),
and each written chunk against its checksums (:meth:`~StoreIntegrity.chunk_problems`, the one
chunk check). Each problem is one line naming the array, the chunk's key and the fix.

The read path calls these checks and these checks read the store; both are methods of one
object, so neither module imports the other's class.
"""
import itertools
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..core.errors import StoreCorruptError, first_line, storage_io_errors
from ..core.object_storage import is_remote
from ..plan.crop_plan import sample_boxes, sample_flips
from .encoding import array_checksum, attributes_digest, values_sha256
from .schema import (ATTRIBUTES_DIGEST, CHECKSUMS, DONE_FLAGS, IMAGE_DIGESTS, IMAGE_KEYS,
                     IMAGE_SIZES, LABELS, RESTORE, SEALED_ARRAYS, SEALED_FROM_FORMAT, _layout_text,
                     _short)


class StoreIntegrity:
    """The integrity checks of a store, each problem one line with its fix.

    A mixin of :class:`.label_store.LabelStore`, which supplies ``group``, ``location``,
    ``layout``, ``attrs`` and ``_intact``; it reads through :class:`.reading.StoreReads`.
    """

    def chunk_problems(self, c: int, arrays: dict = None, recorded: np.ndarray = None) -> list:
        """What is wrong with written chunk ``c``: the one check behind ``refine verify`` and
        verified reads.

        Parameters
        ----------
        c : int
            Chunk index.
        arrays : dict, optional
            Checksummed array name -> the chunk's rows, already read; by default every
            checksummed array's chunk is read (and decoded) here.
        recorded : numpy.ndarray, optional
            ``(arrays, 32)`` digests recorded for the chunk; read here by default.

        Returns
        -------
        list of str
            One line per array that cannot be decoded or whose decoded values differ from its
            recorded SHA-256, naming the chunk, the array, its key and the fix.
        """
        recorded = self.recorded_checksums()[c] if recorded is None else recorded
        if not recorded.any():
            return [f"chunk {c}: its checksums (key {self.chunk_key(CHECKSUMS, c)}) are missing; "
                    f"{self._fix(CHECKSUMS, c)}"]
        shapes, problems = self.layout.shapes(), []
        for name in self.layout.array_names if arrays is None else arrays:
            key = self.chunk_key(name, c)
            try:
                values = self.read_chunk(name, c) if arrays is None else arrays[name]
            except storage_io_errors():
                raise
            except Exception as exc:  # any codec's or zip's complaint about the bytes
                problems.append(self._decode_problem(name, c, exc))
                continue
            digest = array_checksum(name, shapes[name][1], values)
            if not np.array_equal(digest, recorded[self.layout.array_names.index(name)]):
                what = ("is missing (read as zeros, which do not match its checksum)"
                        if self._key_missing(key) else "does not match its checksum")
                problems.append(f"chunk {c}: {name} (key {key}) {what}; {self._fix(name, c)}")
        return problems

    def layout_problems(self) -> list:
        """The layout attribute against the arrays' shapes, dtypes and chunks and against the
        other attributes (cheap: metadata only). Any problem here makes every chunk read
        meaningless, so callers stop at these."""
        problems = []
        for name, (shape, dtype, chunks) in self._expected_arrays().items():
            try:
                array = self._array(name)
            except StoreCorruptError as exc:
                problems.append(exc.problem)
                continue
            found = (tuple(array.shape), str(array.dtype), tuple(array.chunks))
            if found != (shape, dtype, chunks):
                problems.append(f"array {name} is {found[1]} of shape {found[0]} in chunks of "
                                f"{found[2]}, but the layout attribute "
                                f"({_layout_text(self.layout)}) implies {dtype} of shape {shape} "
                                f"in chunks of {chunks}; the attributes or the array were "
                                f"edited; {RESTORE}")
        return problems + self._attribute_consistency_problems()

    def content_problems(self) -> list:
        """Everything beyond the chunks' checksums: the attribute digest, ``labels`` and
        ``image_sizes`` against their recorded SHA-256, a zip's entry names, and (stores without
        a digest) a sample of boxes redrawn from the plan. Reads no chunk of the crop arrays
        but that sample."""
        problems = []
        for check in (self._digest_problems, self._labels_problems, self._image_sizes_problems,
                      self._zip_entry_problems, self._plan_problems):
            try:
                problems += check()
            except StoreCorruptError as exc:
                problems.append(exc.problem)
        return problems

    def require_intact(self):
        """Raise :class:`StoreCorruptError` for the first layout or content problem (what every
        reader checks on opening a store; the chunks are checked as they are read). Once passed,
        it is not repeated for this object, whose attributes were read once at opening."""
        if self._intact:
            return
        problems = self.layout_problems()
        for problem in problems or self.content_problems():
            raise self._corrupt(problem)
        self._intact = True

    def _undecodable(self, name: str) -> list:
        """A problem for each chunk of array ``name`` that cannot be decoded, or, for a
        checksummed array's written chunk, decodes to values other than its digest: a codec fed
        damaged bytes (a truncated Blosc frame) may fail on one read and return garbage on the
        next, and the chunk must be named either way."""
        array, problems = self.group[name], []
        step = array.chunks[0]
        checked = self.done_chunks() if name in self.layout.array_names else None
        for i in range(-(-array.shape[0] // step)):
            try:
                values = array[i * step:(i + 1) * step]
            except storage_io_errors():
                raise
            except Exception as exc:
                problems.append(self._decode_problem(name, i, exc))
                continue
            if checked is not None and checked[i]:
                problems += self.chunk_problems(i, {name: values})
        return problems

    def _decode_problem(self, name: str, c: int, exc: Exception) -> str:
        return (f"chunk {c}: {name} (key {self.chunk_key(name, c)}) cannot be decoded "
                f"({first_line(exc, typed=True)}); {self._fix(name, c)}")

    def _require_chunks_intact(self, pieces, checks=None):
        """``pieces``: (chunk, {name: its rows}); raise for the first written chunk whose
        checksummed arrays differ from their digests (``checks``: :meth:`chunk_checks`).
        Chunks are hashed on several threads (hashlib releases the GIL): at ImageNet size
        hashing is most of the check's cost."""
        recorded, done = checks if checks is not None else self.chunk_checks()
        work = [(int(c), {n: v for n, v in arrays.items() if n in self.layout.array_names})
                for c, arrays in pieces if done[c]]
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            found = pool.map(lambda item: self.chunk_problems(*item, recorded[item[0]]),
                             [(c, checked) for c, checked in work if checked])
            for problem in (p for problems in found for p in problems):  # lowest chunk first
                raise self._corrupt(problem)

    def _fix(self, name: str, c: int) -> str:
        """How to repair chunk ``c`` of array ``name``."""
        if self.packed:
            return "restore the zip, or pack it again from a store directory `refine verify` passes"
        if name in self.layout.array_names + (CHECKSUMS, DONE_FLAGS):
            return (f"restore the file, or delete {self.chunk_key(DONE_FLAGS, c)} and rerun the "
                    f"same `refine precompute` command to recompute chunk {c}")
        return RESTORE

    def _corrupt(self, problem: str) -> StoreCorruptError:
        """The one-line error for ``problem`` (kept bare on ``.problem`` for verify's list)."""
        error = StoreCorruptError(f"{self.location}: {problem} (`refine verify {self.location}` "
                                  "lists all damage)")
        error.problem = problem
        return error

    def _key_missing(self, key: str) -> bool:
        """True when chunk ``key`` has no file in a directory or zip (zarr reads it as zeros)."""
        if is_remote(self.location):
            return False
        if self.packed:
            return key not in self._zip_names()
        return not (Path(self.location) / key).is_file()

    def _zip_names(self) -> list:
        with zipfile.ZipFile(self.location) as z:
            return z.namelist()

    def _expected_arrays(self) -> dict:
        """Every array the layout implies: name -> (shape, dtype, chunks)."""
        lay = self.layout
        N, C, A = lay.num_images, lay.chunk_size, len(lay.array_names)
        expected = {name: (shape, dtype, (C,) + shape[1:])
                    for name, (shape, dtype) in lay.shapes().items()}
        expected[LABELS] = ((N,), "uint16", (C,))
        if self.format_version >= 2:
            expected[IMAGE_SIZES] = ((N, 2), "uint16", (C, 2))
        for name in (IMAGE_KEYS, IMAGE_DIGESTS):
            if SEALED_ARRAYS[name] in self.attrs:  # the width is the array's own (keys: longest)
                width = 32 if name == IMAGE_DIGESTS else self._array(name).shape[-1]
                expected[name] = ((N, width), "uint8", (C, width))
        expected[CHECKSUMS] = ((lay.num_chunks, A, 32), "uint8", (1, A, 32))
        expected[DONE_FLAGS] = ((lay.num_chunks,), "uint8", (1,))
        return expected

    def _attribute_consistency_problems(self) -> list:
        """The typed attribute views parse, and their counts agree with the layout's."""
        problems = []
        for key in ("plan", "refinery", "dataset", "batching"):
            try:
                getattr(self, key)
            except (KeyError, TypeError, ValueError, AttributeError):
                problems.append(f"the {key} attribute is malformed ({_short(self.attrs.get(key))})"
                                f"; {RESTORE}")
        if problems:
            return problems
        lay = self.layout
        claims = [("plan.crops_per_image", self.plan.crops_per_image, "crops_per_image",
                   lay.crops_per_image),
                  ("dataset.num_images", self.dataset.num_images, "num_images", lay.num_images)]
        for where, value, key, ours in claims:
            if value != ours:
                problems.append(f"the layout attribute says {key} {ours}, but {where} is {value};"
                                f" the attributes were edited; {RESTORE}")
        if lay.top_k > len(self.classes):
            problems.append(f"the layout attribute says top_k {lay.top_k}, more than the "
                            f"{len(self.classes)} classes of dataset.classes; {RESTORE}")
        return problems

    def _digest_problems(self) -> list:
        recorded = self.attrs.get(ATTRIBUTES_DIGEST)
        if recorded is None and self.format_version >= SEALED_FROM_FORMAT:
            return [f"the attribute {ATTRIBUTES_DIGEST}, which every format-"
                    f"{SEALED_FROM_FORMAT}+ store records, is missing: the attributes in "
                    f"zarr.json were edited after creation; {RESTORE}"]
        if recorded is None or recorded == attributes_digest(self.attrs):
            return []
        return [f"the attributes in zarr.json were edited after creation (their SHA-256 differs "
                f"from {ATTRIBUTES_DIGEST}); {RESTORE}"]

    def _labels_problems(self) -> list:
        """``labels`` against ``dataset.labels_sha256`` (SHA-256 of the int64 labels). Format-1
        stores are left out: their fingerprints may predate the stored array."""
        recorded = self.attrs["dataset"].get("labels_sha256")
        if self.format_version < 2 or recorded is None:
            return []
        if values_sha256(self._read(LABELS).astype(np.int64)) == recorded:
            return []
        return [f"array {LABELS} does not match dataset.labels_sha256 (its values were changed or "
                f"its files deleted); {RESTORE}"]

    def _image_sizes_problems(self) -> list:
        """Each per-image array written at creation (sizes; keys and digests, format 5) against
        the SHA-256 of its values recorded in the attributes."""
        problems = []
        for name, attribute in SEALED_ARRAYS.items():
            recorded = self.attrs.get(attribute)
            if recorded is None or values_sha256(self._read(name)) == recorded:
                continue
            problems.append(f"array {name} does not match {attribute} (its values were changed "
                            f"or its files deleted); {RESTORE}")
        return problems

    def _zip_entry_problems(self) -> list:
        """A packed store holds exactly its keys: no extra entries, none twice, none whose name
        could escape a folder it is unpacked into."""
        if not self.packed or is_remote(self.location):
            return []
        keys = self._all_keys()
        folders = {k.rsplit("/", i)[0] + "/" for k in keys for i in range(1, k.count("/") + 1)}
        fix = "pack it again from a store directory `refine verify` passes"
        problems, seen = [], set()
        for name in self._zip_names():
            parts = name.replace("\\", "/").split("/")
            if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                problems.append(f"zip entry {name!r} has an unsafe name (absolute or with '..'); "
                                f"{fix}")
            elif name in seen:
                problems.append(f"zip entry {name!r} appears twice; {fix}")
            elif name not in keys and name not in folders:
                problems.append(f"zip entry {name!r} is not part of the label store; {fix}")
            seen.add(name)
        return problems

    def _all_keys(self) -> set:
        """Every key a complete store of this layout can hold: metadata and chunk files."""
        keys = {"zarr.json"}
        for name in self._expected_arrays():
            array = self.group[name]
            keys.add(f"{name}/zarr.json")
            grid = [range(-(-n // c)) for n, c in zip(array.shape, array.chunks)]
            keys.update(f"{name}/c/" + "/".join(map(str, i)) for i in itertools.product(*grid))
        return keys

    def _plan_problems(self, samples: int = 16) -> list:
        """Stores without an attribute digest (format 2 from before it) can still show an
        edited plan: the boxes and flips of a few written images, redrawn from ``plan`` and
        ``image_sizes``, must equal the stored ones. Format 1 has no sizes: skipped."""
        if ATTRIBUTES_DIGEST in self.attrs or IMAGE_SIZES not in self.group:
            return []
        written = np.flatnonzero(self.done_images())
        if not len(written):
            return []
        ids = np.unique(written[np.linspace(0, len(written) - 1, samples).astype(np.int64)])
        sizes = self._read(IMAGE_SIZES, ids).astype(np.int64)
        stored = self.read_images(ids, ("boxes", "flips"))
        if (np.array_equal(sample_boxes(self.plan, ids, sizes[:, 0], sizes[:, 1]), stored["boxes"])
                and np.array_equal(sample_flips(self.plan, ids), stored["flips"])):
            return []
        return [f"the stored boxes and flips are not the ones the plan attribute draws "
                f"({_short(self.attrs['plan'])}): the plan was edited; {RESTORE}"]

