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
* Blosc/zstd with the shuffle that suits each array (~18 B per crop at top-5) using only codecs
  from the v3 spec, so any Zarr v3 reader can open a store;
* the group's ``zarr.json`` has no timestamps, so two runs that compute the same labels write
  byte-identical stores.
"""
import hashlib
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np

from .crop_plan import CropPlan
from .errors import IncompleteStoreError, StoreError, StoreMismatchError, StoreNotFoundError

FORMAT_NAME = "refinery-label-store"
# 2: an ``image_sizes`` array (each image's stored height and width) and ``dataset.source`` (the
# ImageFolder tree a store's images came from, checkable without the .beton). 1 still reads.
FORMAT_VERSION = 2
CROP_ARRAYS = ("boxes", "flips", "topk_indices", "topk_probs")
STATIC_ARRAYS = ("static_indices", "static_probs")
LABELS, IMAGE_SIZES = "labels", "image_sizes"  # whole per-image arrays written at creation
CHECKSUMS, DONE_FLAGS = "chunk_sha256", "chunk_done"  # per chunk: digests, then the done flag
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

    def empty_chunk(self, c: int) -> "CropRecords":
        """Zeroed records for chunk ``c``, filled by precompute loader batch by loader batch."""
        n = len(self.chunk_range(c))
        return CropRecords(**{name: np.zeros((n,) + shape[1:], dtype)
                              for name, (shape, dtype) in self.shapes().items()})


@dataclass
class CropRecords:
    """Stored records of some images, one row per image, in the store's dtypes.

    Attributes
    ----------
    boxes : numpy.ndarray
        ``(n, K, 4)`` uint16 crop boxes ``(y, x, h, w)`` in the image's stored pixel frame.
    flips : numpy.ndarray
        ``(n, K)`` uint8, 1 where the crop is mirrored left-right after resizing.
    topk_indices : numpy.ndarray
        ``(n, K, k)`` uint16 class indices, most probable first.
    topk_probs : numpy.ndarray
        ``(n, K, k)`` float16 probabilities of those classes.
    static_indices, static_probs : numpy.ndarray or None
        ``(n, k)`` soft-static label of each whole image (stores made with ``--soft-static``).
    """

    boxes: np.ndarray
    flips: np.ndarray
    topk_indices: np.ndarray
    topk_probs: np.ndarray
    static_indices: Optional[np.ndarray] = None
    static_probs: Optional[np.ndarray] = None

    def arrays(self) -> dict:
        """Array name -> values, for the arrays these records hold."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    def slot(self, slots) -> "CropRecords":
        """The records of one slot per image: ``slots`` is an int or an ``(n,)`` array; the
        per-crop arrays lose their slot axis (``boxes`` becomes ``(n, 4)``, ...)."""
        rows = np.arange(len(self.flips))
        pick = lambda a: a[rows, slots]
        return CropRecords(pick(self.boxes), pick(self.flips), pick(self.topk_indices),
                           pick(self.topk_probs), self.static_indices, self.static_probs)


@dataclass(frozen=True)
class Batching:
    """What fixes the composition of every refinery batch (recorded in the store: train-mode BN
    labels depend on it, so a resume or an audit must batch exactly the same way).

    Attributes
    ----------
    crop_batch : int
        Crops per refinery forward pass.
    images_per_batch : int
        Images per loader batch; a power of two dividing the chunk size.
    """

    crop_batch: int
    images_per_batch: int

    @classmethod
    def for_layout(cls, layout: StoreLayout, crop_batch: int) -> "Batching":
        target = max(1, min(crop_batch, 16384 // layout.crops_per_image, layout.chunk_size))
        return cls(crop_batch, 1 << (target.bit_length() - 1))


@dataclass(frozen=True)
class RefineryInfo:
    """The network that labelled a store.

    Attributes
    ----------
    arch : str
        Architecture name (torchvision's, or ``timm/<name>``).
    weights_sha256 : str
        SHA-256 of the weights file (for torchvision's pretrained weights, of the ``.pth``).
    bn_mode : str
        ``"train"`` (batch statistics, as in the paper) or ``"eval"`` (running statistics).
    temperature : float
        Softmax temperature: probabilities are ``softmax(logits / temperature)``.
    input_size : int
        Side of the square crops the refinery labelled (and students are shown).
    normalization : dict
        ``{"mean": [...], "std": [...]}`` per RGB channel in uint8 units.
    """

    arch: str
    weights_sha256: str
    bn_mode: str
    temperature: float
    input_size: int
    normalization: dict


@dataclass(frozen=True)
class DatasetInfo:
    """The images a store labels, as fingerprinted when it was written.

    Attributes
    ----------
    num_images : int
        Number of images N; image ``n`` is row ``n`` of every array.
    classes : list of str
        Class names in index order.
    image_bytes_sha256 : str
        SHA-256 over each image's encoded bytes in the ``.beton``, in sample order.
    labels_sha256 : str
        SHA-256 of the int64 ground-truth labels in sample order.
    source : dict or None
        The ImageFolder tree the ``.beton`` was converted from (format 2): ``files_sha256`` over
        the files' relative paths in store order, ``num_files`` and the ``order`` rule; None when
        the store was made from a ``.beton`` given directly, or by format 1.
    """

    num_images: int
    classes: list
    image_bytes_sha256: str
    labels_sha256: str
    source: Optional[dict] = None


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
               image_sizes=None) -> "LabelStore":
        """Create an empty store; ``attrs`` carries plan, refinery, data set and versions.

        ``labels`` (the data set's ground truth) is written whole at creation, so a store alone
        can report how often the refinery agrees with the image labels; so are ``image_sizes``
        ``(N, 2)`` (height, width as stored), the frame the boxes are drawn in, so a reader of
        the original files can tell when their sizes differ. A local store is built
        under a temporary name and renamed into place, so a kill mid-creation leaves no
        half-made store behind.
        """
        if is_remote(location):  # object stores have no rename: objects appear whole or not
            cls._create_at(location, layout, attrs, labels, image_sizes)
            return cls.open(location, mode="r+")
        location = Path(location)
        building = location.with_name(f".{location.name}.creating-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        cls._create_at(building, layout, attrs, labels, image_sizes)
        try:
            os.rename(building, location)
        except OSError:
            if not location.exists():
                raise
            shutil.rmtree(building)  # another process created it first: use theirs
        return cls.open(location, mode="r+")

    @classmethod
    def _create_at(cls, location, layout: StoreLayout, attrs: dict, labels=None,
                   image_sizes=None):
        import zarr
        group = zarr.open_group(str(location), mode="w-", zarr_format=3)
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
        group.create_array(CHECKSUMS, shape=(layout.num_chunks, len(layout.array_names), 32),
                           dtype="uint8", chunks=(1, len(layout.array_names), 32), fill_value=0,
                           compressors=None)
        group.create_array(DONE_FLAGS, shape=(layout.num_chunks,), dtype="uint8", chunks=(1,),
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
    def write_chunk(self, c: int, records: "CropRecords"):
        """Write chunk ``c``'s records and their checksums, *then* mark it done (the order is the
        guarantee: a flagged chunk is whole)."""
        arrays = records.arrays() if isinstance(records, CropRecords) else records
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
    def recorded_checksums(self) -> np.ndarray:
        """``(num_chunks, arrays, 32)`` uint8 SHA-256 digests written with each chunk."""
        return self.group[CHECKSUMS][:]

    def chunk_key(self, name: str, c: int) -> str:
        """The key (file path in a directory store) of chunk ``c`` of array ``name``."""
        return f"{name}/c/{c}" + "/0" * (len(self.group[name].shape) - 1)

    def read_chunk(self, name: str, c: int) -> np.ndarray:
        """Array ``name``'s rows of chunk ``c``, decoded (raises whatever the codec raises)."""
        rows = self.layout.chunk_range(c)
        return self.group[name][rows.start:rows.stop]

    def done_chunks(self) -> np.ndarray:
        return self.group[DONE_FLAGS][:].astype(bool)

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

    def read_crops(self, images=None, static: bool = False) -> CropRecords:
        """Every image's records (``images=None``: whole arrays in one pass), or those of the
        image indices ``images`` only (just the chunks that hold them). ``static`` adds the
        soft-static labels, which the store must have."""
        names = CROP_ARRAYS + (STATIC_ARRAYS if static else ())
        if static and not self.layout.soft_static:
            raise StoreError(f"{self.location}: store has no soft-static labels; recompute it "
                             "with `refine precompute --soft-static`")
        arrays = self.read(names) if images is None else self.read_images(images, names)
        return CropRecords(**arrays)

    def read_labels(self, images=None) -> np.ndarray:
        """Ground-truth class of every image (or of ``images``), int64."""
        values = self.read((LABELS,)) if images is None else self.read_images(images, (LABELS,))
        return values[LABELS].astype(np.int64)

    def read_image_sizes(self) -> Optional[np.ndarray]:
        """``(N, 2)`` int64 height and width of each image as stored, the frame of its boxes;
        None for a format-1 store (which did not record them)."""
        if IMAGE_SIZES not in self.group:
            return None
        return self.group[IMAGE_SIZES][:].astype(np.int64)

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


def chunk_checksums(layout: StoreLayout, arrays) -> np.ndarray:
    """SHA-256 of each array's *decoded* values in a chunk, ``(arrays, 32)`` uint8.

    Hashing values rather than compressed bytes keeps checksums valid across codec versions.
    """
    if isinstance(arrays, CropRecords):
        arrays = arrays.arrays()
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
