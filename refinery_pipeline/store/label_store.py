"""The label store: a Zarr v3 group holding, per (image, slot), the crop box, the flip and the
refinery's sparse top-k label. Format spec: ``docs/label-store.md``.

:class:`LabelStore` is the one way into a store. It is composed of one class per concern, each
in a module named after it, so every method keeps its name on the one object:

* :mod:`.schema`: what a store holds (array names, defaults, :class:`.schema.StoreLayout` and
  the other typed views of its attributes), torch- and zarr-free;
* :mod:`.encoding`: codecs and the digests that vouch for values and attributes;
* :mod:`.creation` (:class:`.creation.StoreCreation`): creating a store, alone or in a race;
* :mod:`.reading` (:class:`.reading.StoreReads`): reads, each chunk checked as it is read;
* :mod:`.integrity` (:class:`.integrity.StoreIntegrity`): the checks behind ``refine verify``;
* here: opening, the typed attributes, writing a chunk, completeness and matching.

Choices, each from measurements in ``shared/notes/zarr-store.md``:

* every chunk is written whole by exactly one process; progress lives in a ``chunk_done`` uint8
  array (one uncompressed chunk per flag), set only after a chunk's data and checksums are
  written (:meth:`LabelStore.write_chunk`): attribute updates rewrite all of ``zarr.json`` and
  lose races;
* the group's ``zarr.json`` has no timestamps, so two runs that compute the same labels write
  byte-identical stores.
"""
from pathlib import Path

from ..core.errors import (IncompleteStoreError, RefineryError, StoreError, StoreMismatchError,
                           StoreNotFoundError, storage_error_message, storage_io_errors)
from ..core.object_storage import (is_remote, network_failure, remote_filesystem,
                                   unreachable_message)
from ..core.validators import flag, one_of, path_like
from ..plan.crop_plan import CropPlan
from .creation import StoreCreation
from .encoding import chunk_checksums
from .integrity import StoreIntegrity
from .reading import StoreReads
from .remote_storage import remote_store
from .schema import (CHECKSUMS, DONE_FLAGS, FORMAT_NAME, FORMAT_VERSION, OPEN_MODES, Batching,
                     CropRecords, DatasetInfo, RefineryInfo, _parse_layout, _short)


class LabelStore(StoreCreation, StoreReads, StoreIntegrity):
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

    # ------------------------------------------------------------------ opening

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
        import zarr  # loaded by the first store made or opened, not by importing the package
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

    # ------------------------------------------------------------------ completeness and matching

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


