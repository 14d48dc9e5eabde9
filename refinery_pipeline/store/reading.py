"""Reading a label store: its arrays, whole or by image, with each chunk checked as it is read.

:class:`StoreReads` is the part of :class:`.label_store.LabelStore` that reads. Whole arrays are
loaded in one pass, so remote latency never reaches training; a verified read checks what it
read against each chunk's recorded checksums (:class:`.integrity.StoreIntegrity`), and bytes a
codec rejects are reported as the chunk and key behind them, never as zeros or noise.
"""
from typing import Optional

import numpy as np

from ..core.errors import StoreError, first_line, storage_io_errors
from ..core.validators import flag, index_array, refuse
from .encoding import decode_keys
from .schema import (CHECKSUMS, CROP_ARRAYS, DONE_FLAGS, IMAGE_DIGESTS, IMAGE_KEYS, IMAGE_SIZES,
                     LABELS, RESTORE, STATIC_ARRAYS, CropRecords)


class StoreReads:
    """The reads of a store: crops, static labels, ground truth, sizes, keys, digests, progress.

    A mixin of :class:`.label_store.LabelStore`, which supplies ``group``, ``location``,
    ``layout`` and ``attrs``; the checks it runs are :class:`.integrity.StoreIntegrity`'s.
    """

    @property
    def packed(self) -> bool:
        """A zip made by ``refine pack``: read in place, repaired only by replacing it."""
        return self.location.endswith(".zip")

    def recorded_checksums(self) -> np.ndarray:
        """``(num_chunks, arrays, 32)`` uint8 SHA-256 digests written with each chunk."""
        return self._read(CHECKSUMS)

    def chunk_key(self, name: str, c: int) -> str:
        """The key (file path in a directory store) of chunk ``c`` of array ``name``."""
        return f"{name}/c/{c}" + "/0" * (len(self.group[name].shape) - 1)

    def read_chunk(self, name: str, c: int) -> np.ndarray:
        """Array ``name``'s rows of chunk ``c``, decoded (raises whatever the codec raises)."""
        rows = self.layout.chunk_range(c)
        return self.group[name][rows.start:rows.stop]

    def done_chunks(self) -> np.ndarray:
        """One bool per chunk: written and recorded as done (what a rerun skips)."""
        return self._read(DONE_FLAGS).astype(bool)

    def chunk_done(self, c: int) -> bool:
        """Chunk ``c``'s done flag alone (one small read, even on an object store)."""
        return bool(self._read(DONE_FLAGS, slice(c, c + 1))[0])

    @property
    def complete(self) -> bool:
        return bool(self.done_chunks().all())

    def done_images(self) -> np.ndarray:
        """Boolean mask over images whose chunk has been written."""
        return np.repeat(self.done_chunks(), self.layout.chunk_size)[:self.layout.num_images]

    def read(self, names=CROP_ARRAYS, verify: bool = False) -> dict:
        """Load whole arrays into memory (one pass; remote latency never reaches training).

        ``verify`` checks every written chunk of the checksummed arrays among ``names`` against
        ``chunk_sha256`` and raises :class:`StoreCorruptError` naming the first that differs.
        """
        arrays = {name: self._read(name) for name in names}
        if verify:
            self._require_chunks_intact((c, {name: values[self._rows(c)]
                                             for name, values in arrays.items()})
                                        for c in range(self.layout.num_chunks))
        return arrays

    def read_images(self, images: np.ndarray, names=CROP_ARRAYS, verify: bool = False) -> dict:
        """The rows of ``images`` only: reads just the chunks that hold them (``verify``: each of
        those chunks whole, checked as in :meth:`read`)."""
        images = np.asarray(images, dtype=np.int64)
        if not len(images):
            return {name: np.zeros((0,) + self.group[name].shape[1:], self.group[name].dtype)
                    for name in names}
        if not verify:
            return {name: self._read(name, images) for name in names}
        chunks = np.unique(images // self.layout.chunk_size)
        parts = [{name: self._read(name, self._rows(c)) for name in names} for c in chunks]
        self._require_chunks_intact(zip(chunks, parts))
        starts = np.cumsum([0] + [len(self._rows_range(c)) for c in chunks])
        where = starts[np.searchsorted(chunks, images // self.layout.chunk_size)]
        where = where + images % self.layout.chunk_size
        return {name: np.concatenate([p[name] for p in parts])[where] for name in names}

    def chunk_checks(self) -> tuple:
        """``(recorded digests (num_chunks, arrays, 32), done flags (num_chunks,))``: what a
        checked read compares chunks with, read once by a caller reading many spans."""
        return self.recorded_checksums(), self.done_chunks()

    def read_chunk_span(self, chunks: range, names, verify: bool = True, checks=None) -> dict:
        """Arrays ``names``' rows of the consecutive chunks ``chunks``, one read per array;
        with ``verify``, each written chunk among them checked against its checksums
        (``checks``: :meth:`chunk_checks`, read here by default), as :meth:`read` checks."""
        start = self._rows_range(chunks.start).start
        stop = self._rows_range(chunks.stop - 1).stop
        arrays = {name: self._read(name, slice(start, stop)) for name in names}
        if verify:
            local = lambda c: slice(self._rows(c).start - start, self._rows(c).stop - start)
            self._require_chunks_intact(((c, {name: values[local(c)] for name, values in
                                              arrays.items()}) for c in chunks), checks)
        return arrays

    def read_crops(self, images=None, static: bool = False, verify: bool = True) -> CropRecords:
        """The crop records of every image, or of some.

        Parameters
        ----------
        images : array_like of int, optional
            Image indices (rows of the store, ``0 ... N - 1``, any order, repeats allowed): reads
            just the chunks that hold them. None (default): every image, whole arrays in one
            pass.
        static : bool
            Add the soft-static labels, which the store must have.
        verify : bool
            Default True: the store passes :meth:`require_intact` (once per opened store) and
            what is read matches its chunks' checksums, so a damaged or edited store raises
            :class:`StoreCorruptError` instead of reaching training as zeros or noise.

        Returns
        -------
        CropRecords
        """
        rows = None if images is None else self._image_rows(images)
        names = CROP_ARRAYS + (STATIC_ARRAYS if flag("static", static) else ())
        if static:
            self._require_static()
        if flag("verify", verify):
            self.require_intact()
        arrays = (self.read(names, verify) if rows is None
                  else self.read_images(rows, names, verify))
        return CropRecords(**arrays)

    def read_static(self, verify: bool = True) -> tuple:
        """Every image's soft-static label alone, ``(indices (N, k) uint16, probabilities
        (N, k) float16)``: K times smaller than the crops' labels, which training with static
        labels does not need. Checked as :meth:`read_crops` checks (``verify``)."""
        self._require_static()
        if flag("verify", verify):
            self.require_intact()
        arrays = self.read(STATIC_ARRAYS, verify)
        return arrays["static_indices"], arrays["static_probs"]

    def _require_static(self):
        if not self.layout.soft_static:
            raise StoreError(f"{self.location}: store has no soft-static labels; recompute it "
                             "with `refine precompute --soft-static`")

    def read_labels(self, images=None) -> np.ndarray:
        """Ground-truth class of every image (or of the image indices ``images``), int64, from a
        store that passes :meth:`require_intact` (which checks them against their digest)."""
        rows = None if images is None else self._image_rows(images)
        self.require_intact()
        values = self.read((LABELS,)) if rows is None else self.read_images(rows, (LABELS,))
        return values[LABELS].astype(np.int64)

    def _image_rows(self, images) -> np.ndarray:
        """``images`` as int64 row indices, refused unless a 1-d array of rows that exist."""
        rows = index_array("images", images, self.layout.num_images)
        if rows.ndim != 1:
            raise refuse("images", images, f"must be one row of image indices (got {rows.ndim} "
                         "dimensions)", "pass a 1-d array, e.g. np.array([0, 5])")
        return rows

    def read_image_sizes(self) -> Optional[np.ndarray]:
        """``(N, 2)`` int64 height and width of each image as stored, the frame of its boxes;
        None for a format-1 store (which did not record them)."""
        if IMAGE_SIZES not in self.group:
            return None
        return self._read(IMAGE_SIZES).astype(np.int64)

    @property
    def keyed(self) -> bool:
        """Whether the store names its images (format 5, made from files with names): a copy
        of its data set is then joined by key, in any order or form."""
        return IMAGE_KEYS in self.group

    def read_keys(self, images=None) -> Optional[list]:
        """Each image's key (or those of rows ``images``), as :func:`.keys.normalize_key` made
        it; None when the store names no images (format < 5, or a ``.beton`` without names)."""
        if not self.keyed:
            return None
        rows = None if images is None else self._image_rows(images)
        values = self._read(IMAGE_KEYS) if rows is None else self._read(IMAGE_KEYS, rows)
        return decode_keys(values)

    def read_image_digests(self, images=None) -> Optional[np.ndarray]:
        """``(N, 32)`` uint8: SHA-256 of the encoded bytes each image's labelled pixels were
        decoded from (a copy with these bytes gives exactly those pixels); None before format
        5."""
        if IMAGE_DIGESTS not in self.group:
            return None
        rows = None if images is None else self._image_rows(images)
        return self._read(IMAGE_DIGESTS) if rows is None else self._read(IMAGE_DIGESTS, rows)

    def _rows_range(self, c: int) -> range:
        return self.layout.chunk_range(int(c))

    def _rows(self, c: int) -> slice:
        rows = self._rows_range(c)
        return slice(rows.start, rows.stop)

    def _read(self, name: str, selection=slice(None)) -> np.ndarray:
        """Array ``name`` at ``selection`` (a slice, or row indices). Bytes a codec or the zip
        reader rejects raise :class:`StoreCorruptError` naming the chunk and its key."""
        array = self._array(name)
        try:
            return array[selection] if isinstance(selection, slice) else array.oindex[selection]
        except storage_io_errors():
            raise
        except Exception as exc:  # find the chunk behind it: reading failed somewhere inside
            for problem in self._undecodable(name):
                raise self._corrupt(problem) from None
            raise self._corrupt(f"array {name} cannot be read ({first_line(exc, typed=True)}); "
                                f"{RESTORE}") from None

    def _array(self, name: str):
        """The zarr array ``name``; a missing or unreadable ``zarr.json`` is named."""
        try:
            return self.group[name]
        except KeyError:
            raise self._corrupt(f"array {name} is missing; {RESTORE}") from None
        except storage_io_errors():
            raise
        except Exception as exc:
            raise self._corrupt(f"the metadata of array {name} (key {name}/zarr.json) cannot be "
                                f"read ({first_line(exc, typed=True)}); {RESTORE}") from None
