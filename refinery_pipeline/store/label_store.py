"""The label store: a Zarr v3 group holding, per (image, slot), the crop box, the flip and the
refinery's sparse top-k label. Format spec: ``docs/label-store.md``.

This module owns the store's schema: the array names, shapes and dtypes, the typed views of its
attributes (:class:`StoreLayout`, :class:`.crop_plan.CropPlan`, :class:`RefineryInfo`,
:class:`DatasetInfo`, :class:`Batching`) and the compatibility checks. Every other module reads
and writes a store through :class:`LabelStore` and :class:`CropRecords`, never by array name.

Choices, each from measurements in ``shared/notes/zarr-store.md``:

* chunked along images only, ~1 MB objects; every chunk is written whole by exactly one process;
* progress lives in a ``chunk_done`` uint8 array (one uncompressed chunk per flag), set only after
  a chunk's data is written: attribute updates rewrite all of ``zarr.json`` and lose races;
* Blosc/zstd with the shuffle that suits each array using only codecs from the v3 spec, so any
  Zarr v3 reader can open a store; probabilities rounded to multiples of 2^-11 (still float16),
  which leaves nothing further from the refinery's value than float16 does at p >= 0.5 and
  takes ~18 B per crop at top-10 of 200 classes instead of ~26 (label_bytes_cpu.md);
* the group's ``zarr.json`` has no timestamps, so two runs that compute the same labels write
  byte-identical stores.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import (IncompleteStoreError, RefineryError, StoreCorruptError, StoreError,
                           StoreMismatchError, StoreNotFoundError, storage_error_message,
                           storage_io_errors)
from ..core.validators import flag, index_array, one_of, path_like, refuse
from ..plan.crop_plan import CropPlan
from .encoding import (_checked_digests, _codecs, array_checksum, attributes_digest,
                       chunk_checksums, decode_keys, encode_keys, seal_attributes, values_sha256)
from .remote_storage import (CREATION_MARKER_SECONDS, CREATION_WAIT_SECONDS, creation_marker,
                             is_remote, network_failure, remote_filesystem, remote_store,
                             unreachable_message)
from .schema import (ATTRIBUTES_DIGEST, CHECKSUMS, CROP_ARRAYS, DONE_FLAGS, FORMAT_NAME,
                     FORMAT_VERSION, IMAGE_DIGESTS, IMAGE_KEYS, IMAGE_SIZES, LABELS, OPEN_MODES,
                     RESTORE, SEALED_ARRAYS, SEALED_FROM_FORMAT, STATIC_ARRAYS, Batching,
                     CropRecords, DatasetInfo, RefineryInfo, StoreLayout, _check_layout,
                     _layout_text, _parse_layout, _short)


class LabelStore:
    """Create, fill, check and read a label store at a local path (or any zarr store-like)."""

    def __init__(self, group, location):
        self.group, self.location = group, str(location)
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{location}: not a refinery label store (no '{FORMAT_NAME}' format "
                             "attribute); pass a directory written by `refine precompute`")
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(f"{location}: label store format version {version} is newer than this "
                             f"refinery reads ({FORMAT_VERSION}); upgrade refinery")
        self.attrs = attrs
        self.layout = _parse_layout(location, attrs.get("layout"))
        self._intact = False  # require_intact passed on this object (its attributes are a copy)

    # ------------------------------------------------------------------ typed attributes
    @property
    def format_version(self) -> int:
        return int(self.attrs["format_version"])

    @property
    def plan(self) -> CropPlan:
        """How the boxes and flips were drawn."""
        return CropPlan.from_dict(self.attrs["plan"])

    @property
    def refinery(self) -> RefineryInfo:
        return RefineryInfo(**self.attrs["refinery"])

    @property
    def dataset(self) -> DatasetInfo:
        return DatasetInfo(**self.attrs["dataset"])

    @property
    def batching(self) -> Batching:
        return Batching(**self.attrs["batching"])

    @property
    def classes(self) -> list:
        return list(self.attrs["dataset"]["classes"])

    @property
    def num_classes(self) -> int:
        """C: the length of every dense target built from this store."""
        return len(self.attrs["dataset"]["classes"])

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def create(cls, location, layout: StoreLayout, attrs: dict, labels=None,
               image_sizes=None, keys=None, digests=None) -> "LabelStore":
        """Create an empty store; ``attrs`` carries plan, refinery, data set and versions.

        ``labels`` (the data set's ground truth) is written whole at creation, so a store alone
        can report how often the refinery agrees with the image labels; so are ``image_sizes``
        ``(N, 2)`` (height, width as stored), the frame the boxes are drawn in, so a reader of
        the original files can tell when their sizes differ; and, format 5, each image's
        ``keys`` (normalized names, :mod:`.keys`) and ``digests`` ``(N, 32)`` (SHA-256 of the
        encoded bytes its pixels were decoded from), so a copy of the data set in another order
        or form is joined by name and each image told exact or approximate. A local store is built
        under a temporary name and renamed into place, so a kill mid-creation leaves no
        half-made store behind, and any error removes the temporary directory.

        Several processes may create one store at once: the loser of the race gets the
        winner's store (locally, once renamed into place; on an object store, which has no
        rename, once the winner has finished creating it). The caller checks that store was made
        for its run, as it checks one it resumes.
        """
        _check_layout(location, layout)
        keys = None if keys is None else encode_keys(location, keys, layout.num_images)
        digests = None if digests is None else _checked_digests(location, digests,
                                                                layout.num_images)
        if is_remote(location):  # object stores have no rename: objects appear whole or not
            return cls._create_remote(location, layout, attrs, labels, image_sizes, keys,
                                      digests)
        location = Path(location)
        building = location.with_name(f".{location.name}.creating-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        try:
            cls._create_at(building, layout, attrs, labels, image_sizes, keys, digests)
            os.rename(building, location)
        except BaseException as exc:
            shutil.rmtree(building, ignore_errors=True)
            if not (isinstance(exc, OSError) and location.exists()):
                raise  # else another process created it first: use theirs
        return cls.open(location, mode="r+")

    @classmethod
    def _create_remote(cls, location, *contents) -> "LabelStore":
        """Create the store at the URL ``location``, or join the one another process creates.

        One creator at a time holds the creation marker, which names its owner and expires
        (:func:`.remote_storage.creation_marker`); the others wait for the store to be sealed
        (its attribute digest, the last creation step, written). A creator that died leaves its
        marker until it expires and whatever objects it had written: the next holder clears
        those remains and creates the store afresh, so no state ever needs deleting by hand.
        """
        import time
        marker = creation_marker(location)
        wait = CREATION_MARKER_SECONDS + CREATION_WAIT_SECONDS
        deadline = time.monotonic() + wait
        while True:
            store = cls._sealed(location)
            if store is not None:
                return store
            if marker.claim():
                try:
                    if cls._sealed(location) is None:  # none finished since we looked
                        cls._clear_creation_remains(location)
                        cls._create_at(location, *contents)
                finally:
                    marker.release()
                return cls.open(location, mode="r+")
            if time.monotonic() > deadline:
                raise StoreError(f"{location}: another process began creating a store here and "
                                 f"has not finished after {wait:.0f} s; rerun when it has, or "
                                 "write to another location")
            time.sleep(0.2)

    @classmethod
    def open_to_extend(cls, location) -> Optional["LabelStore"]:
        """The store at ``location`` opened to write chunks (``mode="r+"``), or None where there
        is none to extend yet: nothing there, or, on an object store, a creation not sealed
        (begun elsewhere, or left by a creator that died): :meth:`create` then waits for it, or
        takes it over."""
        try:
            store = cls.open(location, mode="r+")
        except StoreNotFoundError:
            return None
        except StoreError:
            if is_remote(location) and creation_marker(location).exists():
                return None
            raise
        if is_remote(location) and ATTRIBUTES_DIGEST not in store.attrs:
            return None
        return store

    @classmethod
    def _sealed(cls, location) -> Optional["LabelStore"]:
        """The store at ``location`` once its creation has finished, else None."""
        try:
            store = cls.open(location, mode="r+")
        except StoreError:
            return None  # not yet a whole store
        return store if ATTRIBUTES_DIGEST in store.attrs else None

    @classmethod
    def _clear_creation_remains(cls, location):
        """Remove what a creator that died left at the URL ``location``: a group without
        attributes yet, or a label store never sealed. Anything else there (another program's
        data) is left alone and refused."""
        fs, path = remote_filesystem(location)
        root = path.rstrip("/")
        try:
            attributes = json.loads(fs.cat_file(f"{root}/zarr.json")).get("attributes", {})
        except FileNotFoundError:
            attributes = {}
        if attributes.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise StoreError(f"{location}: holds other data than a label store; choose another "
                             "location")
        if fs.exists(root):
            fs.rm(root, recursive=True)
            fs.invalidate_cache()

    @classmethod
    def _create_at(cls, location, layout: StoreLayout, attrs: dict, labels=None,
                   image_sizes=None, keys=None, digests=None):
        import zarr
        target = remote_store(location) if is_remote(location) else str(location)
        group = zarr.open_group(target, mode="w-", zarr_format=3)
        group.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                            "layout": layout.__dict__, **attrs})
        chunk = layout.chunk_size
        for name, (shape, dtype) in layout.shapes().items():
            group.create_array(name, shape=shape, dtype=dtype, fill_value=0,
                               chunks=(chunk,) + shape[1:], **_codecs(name))
        gt = group.create_array(LABELS, shape=(layout.num_images,), dtype="uint16",
                                chunks=(chunk,), fill_value=0, **_codecs(LABELS))
        if labels is not None:
            gt[:] = np.asarray(labels, dtype=np.uint16)
        sizes = group.create_array(IMAGE_SIZES, shape=(layout.num_images, 2), dtype="uint16",
                                   chunks=(chunk, 2), fill_value=0, **_codecs(IMAGE_SIZES))
        if image_sizes is not None:
            sizes[:] = np.asarray(image_sizes, dtype=np.uint16)
        for name, values in ((IMAGE_KEYS, keys), (IMAGE_DIGESTS, digests)):
            if values is not None:
                width = values.shape[1]
                group.create_array(name, shape=values.shape, dtype="uint8", fill_value=0,
                                   chunks=(chunk, width), **_codecs(name))[:] = values
        group.create_array(CHECKSUMS, shape=(layout.num_chunks, len(layout.array_names), 32),
                           dtype="uint8", chunks=(1, len(layout.array_names), 32), fill_value=0,
                           compressors=None)
        group.create_array(DONE_FLAGS, shape=(layout.num_chunks,), dtype="uint8", chunks=(1,),
                           fill_value=0, compressors=None)
        group.attrs.update(seal_attributes(group))  # last: the digests cover all of the above

    @classmethod
    def open(cls, location, mode: str = "r", *, check: bool = True) -> "LabelStore":
        """Open a store directory, a zip made by ``refine pack`` (read-only, in place), or an
        fsspec URL.

        Parameters
        ----------
        location : str or os.PathLike
            Where the store is.
        mode : {"r", "r+"}
            ``"r"`` reads; ``"r+"`` also writes chunks (how precompute resumes a store).
        check : bool
            Reading (``mode="r"``): refuse a store whose layout, attributes, ``labels`` or
            ``image_sizes`` no longer match what was written (:meth:`require_intact`, the checks
            ``refine verify`` and ``refine train`` run; about 0.1 s at ImageNet size), so no way
            into the API reads an edited store; chunks are checked as they are read. False only
            for a tool that reports the damage itself (``refine verify``).

        Raises
        ------
        StoreNotFoundError
            Nothing is stored there.
        StoreError
            Not a label store, or one of a newer format than this version reads.
        StoreCorruptError
            ``check``: the store was damaged or edited since it was written.
        """
        import zarr
        path_like("location", location, "label store")
        one_of("mode", mode, OPEN_MODES)
        missing = StoreNotFoundError(f"{location}: no label store there; create one with "
                                     "`refine precompute`")
        if not is_remote(location) and not Path(location).exists():
            raise missing
        target = str(location)
        try:
            if target.endswith(".zip") and mode != "r":
                raise StoreError(f"{location}: a packed store is read-only; unpack it to "
                                 "extend it")
            if is_remote(target):  # a directory, or a packed zip read in place
                target = remote_store(target, read_only=mode == "r")
            elif target.endswith(".zip"):
                target = zarr.storage.ZipStore(target, mode="r")
            group = zarr.open_group(target, mode=mode, zarr_format=3)
        except RefineryError:
            raise
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            silent = network_failure(exc) if is_remote(location) else None
            if silent is not None:  # fsspec's HTTP says "not found" for a server that is silent
                raise StoreError(unreachable_message(location, silent)) from None
            raise missing from None  # a URL with nothing behind it
        except storage_io_errors() as exc:  # an endpoint that is down, a disk that is gone
            if is_remote(location):
                raise StoreError(unreachable_message(location, exc)) from None
            raise StoreError(storage_error_message(exc, location)) from None
        except Exception as exc:
            raise StoreError(f"{location}: cannot open as a Zarr v3 label store ({exc})") from None
        store = cls(group, location)
        if mode == "r" and flag("check", check):
            store.require_intact()
        return store

    # ------------------------------------------------------------------ writing
    def write_chunk(self, c: int, records: "CropRecords"):
        """Write chunk ``c``'s records and their checksums, *then* mark it done (the order is the
        guarantee: a flagged chunk is whole). Probabilities are rounded to the layout's
        ``prob_bits`` here, before hashing, so every writer stores (and checks) the same values."""
        arrays = records.arrays() if isinstance(records, CropRecords) else records
        arrays = self.layout.rounded(arrays)
        rows = self.layout.chunk_range(c)
        for name in self.layout.array_names:
            self.group[name][rows.start:rows.stop] = arrays[name]
        self.group[CHECKSUMS][c] = chunk_checksums(self.layout, arrays)
        self.group[DONE_FLAGS][c] = 1

    def finalize(self):
        """When every chunk is done: drop stale temporary files, record completeness.

        zarr's LocalStore writes ``<key>.<uuid>.partial`` and renames it; a killed writer leaves
        these behind. They are never valid data. Only a complete store is cleaned, because until
        then another process may be writing (and renaming) its own partial files.
        """
        if not self.done_chunks().all():
            return
        root = Path(self.location)
        if root.is_dir():
            for leftover in root.rglob("*.partial"):
                leftover.unlink(missing_ok=True)
        if not self.attrs.get("complete"):
            self.group.attrs["complete"] = True
            self.attrs["complete"] = True

    # ------------------------------------------------------------------ reading and checking
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

    # ------------------------------------------------------------------ checking, internals
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
            raise self._corrupt(f"array {name} cannot be read ({_reason(exc)}); "
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
                                f"read ({_reason(exc)}); {RESTORE}") from None

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
                f"({_reason(exc)}); {self._fix(name, c)}")

    def _require_chunks_intact(self, pieces, checks=None):
        """``pieces``: (chunk, {name: its rows}); raise for the first written chunk whose
        checksummed arrays differ from their digests (``checks``: :meth:`chunk_checks`).
        Chunks are hashed on several threads (hashlib releases the GIL): at ImageNet size
        hashing is most of the check's cost."""
        from concurrent.futures import ThreadPoolExecutor
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
        import zipfile
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
        import itertools
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
        from ..plan.crop_plan import sample_boxes, sample_flips
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

    def require_complete(self, allow_partial: bool = False):
        """Raise :class:`IncompleteStoreError` naming the chunks never written, unless
        ``allow_partial`` (``--allow-partial``: train on the chunks there are)."""
        done = self.done_chunks()
        if not done.all() and not allow_partial:
            raise IncompleteStoreError(
                f"{self.location}: {int((~done).sum())} of {len(done)} chunks were never written; "
                "rerun the same `refine precompute` command to finish it, or pass --allow-partial")

    def check_matches(self, fingerprint: dict = None, **expected):
        """Raise :class:`StoreMismatchError` naming the first attribute that differs."""
        if fingerprint is not None:
            ours = self.attrs.get("dataset", {})
            for key in ("classes", "num_images", "image_bytes_sha256", "labels_sha256"):
                if ours.get(key) != fingerprint.get(key):
                    raise StoreMismatchError(
                        f"{self.location}: data set mismatch in '{key}' (store: "
                        f"{_short(ours.get(key))}, data: {_short(fingerprint.get(key))}); this "
                        "store was made for other images; use the matching data or a new store")
        for key, value in expected.items():
            if self.attrs.get(key) != value:
                raise StoreMismatchError(
                    f"{self.location}: {key} mismatch (store: {_short(self.attrs.get(key))}, this "
                    f"run: {_short(value)}); use the store's settings or write a new store")

    def nbytes_on_disk(self) -> int:
        """Bytes of the store's files (directory, zip or objects under a URL; 0 if unknown)."""
        if is_remote(self.location):
            try:
                fs, path = remote_filesystem(self.location)
                return int(fs.du(path))
            except Exception:  # e.g. HTTP cannot list
                return 0
        root = Path(self.location)
        if root.is_file():
            return root.stat().st_size
        if not root.is_dir():
            return 0
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def open_for_reading(store) -> LabelStore:
    """``store`` (a :class:`LabelStore` or its location) ready to replay: it passes
    :meth:`LabelStore.require_intact` (a store opened with ``check=False`` or for writing is
    checked here) and every chunk is written. The one entry check of both loader backends."""
    if not isinstance(store, LabelStore):
        store = LabelStore.open(path_like("store", store, "label store"))
    store.require_intact()
    store.require_complete()
    return store


def _reason(exc: Exception) -> str:
    """``Type: first line of the message``, for a one-line error."""
    text = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {text[0]}" if text else "")
