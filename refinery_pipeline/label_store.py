"""The label store: a Zarr v3 group holding, per (image, slot), the crop box, the flip and the
refinery's sparse top-k label. Format spec: ``docs/label-store.md``.

Choices, each from measurements in ``shared/notes/zarr-store.md``:

* chunked along images only, ~1 MB objects; every chunk is written whole by exactly one process;
* progress lives in a ``chunk_done`` uint8 array (one uncompressed chunk per flag), set only after
  a chunk's data is written: attribute updates rewrite all of ``zarr.json`` and lose races;
* Blosc/zstd with the shuffle that suits each array (~18 B per crop at top-5) using only codecs
  from the v3 spec, so any Zarr v3 reader can open a store;
* the group's ``zarr.json`` has no timestamps, so two runs that compute the same labels write
  byte-identical stores.
"""
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import IncompleteStoreError, StoreError, StoreMismatchError, StoreNotFoundError

FORMAT_NAME = "refinery-label-store"
FORMAT_VERSION = 1
CROP_ARRAYS = ("boxes", "flips", "topk_indices", "topk_probs")
# Classes stored per crop. On imagenette-96 (10 classes, GPU parity sweep) students on top-5
# labels trailed the online refinery by 1.15 points at K = 40; storing all 10 closed the gap to
# 0.06 (benchmarks/results/parity_gpu_top10.md; docs/design.md, choosing K and top-k).
DEFAULT_TOP_K = 10


def default_chunk_size(crops_per_image: int) -> int:
    """Images per chunk: the power of two nearest 200,000 crops (~1 MB compressed objects)."""
    return int(2 ** np.clip(np.round(np.log2(200_000 / max(1, crops_per_image))), 4, 20))


def _codecs(name: str) -> dict:
    from zarr.codecs import BloscCodec, TransposeCodec
    blosc = lambda shuffle: BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)
    if name == "boxes":  # (N, K, 4): put each coordinate's values side by side before shuffling
        return {"filters": [TransposeCodec(order=(2, 0, 1))], "compressors": [blosc("shuffle")]}
    if name in ("topk_indices", "static_indices", "flips"):
        return {"compressors": [blosc("bitshuffle")]}
    return {"compressors": [blosc("shuffle")]}


@dataclass
class StoreLayout:
    num_images: int
    crops_per_image: int
    top_k: int
    chunk_size: int
    soft_static: bool = False  # also store the refinery's label of the whole (centred) image

    @property
    def num_chunks(self) -> int:
        return -(-self.num_images // self.chunk_size)

    def chunk_range(self, c: int) -> range:
        return range(c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_images))

    def shapes(self) -> dict:
        """Per-image arrays written chunk by chunk: name -> (shape, dtype)."""
        N, K, k = self.num_images, self.crops_per_image, self.top_k
        shapes = {"boxes": ((N, K, 4), "uint16"), "flips": ((N, K), "uint8"),
                  "topk_indices": ((N, K, k), "uint16"), "topk_probs": ((N, K, k), "float16")}
        if self.soft_static:
            shapes.update(static_indices=((N, k), "uint16"), static_probs=((N, k), "float16"))
        return shapes

    @property
    def array_names(self) -> tuple:
        return tuple(self.shapes())


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
        lay = attrs["layout"]
        self.layout = StoreLayout(**lay)

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def create(cls, location, layout: StoreLayout, attrs: dict, labels=None) -> "LabelStore":
        """Create an empty store; ``attrs`` carries plan, refinery, data set and versions.

        ``labels`` (the data set's ground truth) is written whole at creation, so a store alone
        can report how often the refinery agrees with the image labels. A local store is built
        under a temporary name and renamed into place, so a kill mid-creation leaves no
        half-made store behind.
        """
        if is_remote(location):  # object stores have no rename: objects appear whole or not
            cls._create_at(location, layout, attrs, labels)
            return cls.open(location, mode="r+")
        location = Path(location)
        building = location.with_name(f".{location.name}.creating-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        cls._create_at(building, layout, attrs, labels)
        try:
            os.rename(building, location)
        except OSError:
            if not location.exists():
                raise
            shutil.rmtree(building)  # another process created it first: use theirs
        return cls.open(location, mode="r+")

    @classmethod
    def _create_at(cls, location, layout: StoreLayout, attrs: dict, labels=None):
        import zarr
        group = zarr.open_group(str(location), mode="w-", zarr_format=3)
        group.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                            "layout": layout.__dict__, **attrs})
        chunk = layout.chunk_size
        for name, (shape, dtype) in layout.shapes().items():
            group.create_array(name, shape=shape, dtype=dtype, fill_value=0,
                               chunks=(chunk,) + shape[1:], **_codecs(name))
        gt = group.create_array("labels", shape=(layout.num_images,), dtype="uint16",
                                chunks=(chunk,), fill_value=0, **_codecs("labels"))
        if labels is not None:
            gt[:] = np.asarray(labels, dtype=np.uint16)
        group.create_array("chunk_sha256", shape=(layout.num_chunks, len(layout.array_names), 32),
                           dtype="uint8", chunks=(1, len(layout.array_names), 32), fill_value=0,
                           compressors=None)
        group.create_array("chunk_done", shape=(layout.num_chunks,), dtype="uint8", chunks=(1,),
                           fill_value=0, compressors=None)

    @classmethod
    def open(cls, location, mode: str = "r") -> "LabelStore":
        """Open a store directory, or a zip made by ``refine pack`` (read-only, in place)."""
        import zarr
        missing = StoreNotFoundError(f"{location}: no label store there; create one with "
                                     "`refine precompute`")
        if not is_remote(location) and not Path(location).exists():
            raise missing
        target = str(location)
        try:
            if target.endswith(".zip"):
                if mode != "r":
                    raise StoreError(f"{location}: a packed store is read-only; unpack it to "
                                     "extend it")
                target = zarr.storage.ZipStore(target, mode="r")
            group = zarr.open_group(target, mode=mode, zarr_format=3)
        except StoreError:
            raise
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise missing from None  # a URL with nothing behind it
        except Exception as exc:
            raise StoreError(f"{location}: cannot open as a Zarr v3 label store ({exc})") from None
        return cls(group, location)

    # ------------------------------------------------------------------ writing
    def write_chunk(self, c: int, arrays: dict):
        """Write chunk ``c``'s arrays and their checksums, *then* mark it done (the order is the
        guarantee: a flagged chunk is whole)."""
        rows = self.layout.chunk_range(c)
        for name in self.layout.array_names:
            self.group[name][rows.start:rows.stop] = arrays[name]
        self.group["chunk_sha256"][c] = chunk_checksums(self.layout, arrays)
        self.group["chunk_done"][c] = 1

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
    def done_chunks(self) -> np.ndarray:
        return self.group["chunk_done"][:].astype(bool)

    @property
    def complete(self) -> bool:
        return bool(self.done_chunks().all())

    def done_images(self) -> np.ndarray:
        """Boolean mask over images whose chunk has been written."""
        return np.repeat(self.done_chunks(), self.layout.chunk_size)[:self.layout.num_images]

    def read(self, names=CROP_ARRAYS) -> dict:
        """Load whole arrays into memory (one pass; remote latency never reaches training)."""
        return {name: self.group[name][:] for name in names}

    def read_images(self, images: np.ndarray, names=CROP_ARRAYS) -> dict:
        """The rows of ``images`` only: reads just the chunks that hold them."""
        return {name: self.group[name].oindex[np.asarray(images)] for name in names}

    def require_complete(self, allow_partial: bool = False):
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
                import fsspec
                fs, path = fsspec.core.url_to_fs(self.location)
                return int(fs.du(path))
            except Exception:  # e.g. HTTP cannot list
                return 0
        root = Path(self.location)
        if root.is_file():
            return root.stat().st_size
        if not root.is_dir():
            return 0
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def is_remote(location) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ...) rather than a local path."""
    return "://" in str(location)


def chunk_checksums(layout: StoreLayout, arrays: dict) -> np.ndarray:
    """SHA-256 of each array's *decoded* values in a chunk, ``(arrays, 32)`` uint8.

    Hashing values rather than compressed bytes keeps checksums valid across codec versions.
    """
    digests = []
    for name, (_, dtype) in layout.shapes().items():
        values = np.ascontiguousarray(arrays[name], dtype=dtype)
        h = hashlib.sha256(f"{name}|{values.dtype.str}|{values.shape}|".encode())
        h.update(values.tobytes())
        digests.append(np.frombuffer(h.digest(), np.uint8))
    return np.stack(digests)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
