"""The label store's schema: what a store holds, named once. Format spec: ``docs/label-store.md``.

The format version, the array names (:data:`CROP_ARRAYS`, :data:`LABELS`, :data:`CHECKSUMS`,
...), the attributes sealed at creation, the defaults (top-k, rest policy, probability bits,
chunk size), and the typed views of a store's attributes (:class:`StoreLayout`,
:class:`CropRecords`, :class:`Batching`, :class:`RefineryInfo`, :class:`DatasetInfo`) with the
checks that a layout can describe arrays. Every other module reads and writes a store through
:class:`.label_store.LabelStore` and :class:`CropRecords`, never by array name.

Free of torch and zarr (numpy only), so the CLI, the spec-only tools and anything that only
describes a store import it without loading either. Choices, each from measurements in
``shared/notes/zarr-store.md``:

* chunked along images only, ~1 MB objects (:func:`default_chunk_size`); every chunk is written
  whole by exactly one process;
* probabilities rounded to multiples of 2^-11 (still float16, :func:`round_probabilities`),
  which leaves nothing further from the refinery's value than float16 does at p >= 0.5 and
  takes ~18 B per crop at top-10 of 200 classes instead of ~26 (label_bytes_cpu.md).
"""
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np

from ..core.errors import StoreCorruptError, StoreError

FORMAT_NAME = "refinery-label-store"
# 2: an ``image_sizes`` array (each image's stored height and width) and ``dataset.source`` (the
# ImageFolder tree a store's images came from, checkable without the .beton). 1 still reads.
# 3: probabilities rounded to multiples of 2^-layout.prob_bits (still plain float16: a reader
# does nothing new) and codecs chosen for many classes (benchmarks/results/label_bytes_cpu.md).
# 1 and 2 still read: their probabilities are unrounded float16 (prob_bits 0).
# Also new in 3: the optional ``refinery.selected_outputs`` (an ImageNet-1k refinery's outputs
# that label a subset of its classes).
# 4: ``plan.augment``, a training recipe (RandAugment, erasing, mixup, ...) applied before the
# refinery labelled each crop, every parameter drawn from the plan (refinery_pipeline.plan.augment),
# and ensemble refineries (``refinery.members``). 1 to 3 still read: they have neither.
# 5: each image's key (``image_keys``) and the SHA-256 of its encoded bytes (``image_digests``),
# so a copy of the data set in any order, form or subset is joined by name and told exact or
# approximate (refinery_pipeline.sources.keys, .sources). 1 to 4 still read: they join by position.
FORMAT_VERSION = 5
"""The label store format this version writes (``docs/label-store.md``); it reads 1 to 5."""
CROP_ARRAYS = ("boxes", "flips", "topk_indices", "topk_probs")
STATIC_ARRAYS = ("static_indices", "static_probs")
PROB_ARRAYS = ("topk_probs", "static_probs")  # float16, rounded to the layout's prob_bits
LABELS, IMAGE_SIZES = "labels", "image_sizes"  # whole per-image arrays written at creation
IMAGE_KEYS, IMAGE_DIGESTS = "image_keys", "image_digests"  # format 5, also written at creation
CHECKSUMS, DONE_FLAGS = "chunk_sha256", "chunk_done"  # per chunk: digests, then the done flag
# Written once at creation: the SHA-256 of ``image_sizes``, then a digest of every attribute
# written at creation (which covers the first); ``complete`` comes later, so it is left out.
IMAGE_SIZES_DIGEST, ATTRIBUTES_DIGEST = "image_sizes_sha256", "attributes_sha256"
# Every per-image array written whole at creation (but ``labels``, which ``dataset.labels_sha256``
# covers) -> the attribute holding the SHA-256 of its values. Keys and digests are optional (a
# ``.beton`` not written by refine names no files); an array is expected iff its digest is there.
SEALED_ARRAYS = {IMAGE_SIZES: IMAGE_SIZES_DIGEST, IMAGE_KEYS: "image_keys_sha256",
                 IMAGE_DIGESTS: "image_digests_sha256"}
# Every store of this format or later was sealed at creation (the digest came within format 2),
# so one without ``attributes_sha256`` had it deleted, most likely to hide an edit.
SEALED_FROM_FORMAT = 3
# Modes a store opens in: reading, or reading and writing chunks (precompute's resume). zarr's
# "w" and "a" would create a new group over the store and lose it.
OPEN_MODES = ("r", "r+")
UNSEALED_ATTRIBUTES = ("complete", ATTRIBUTES_DIGEST)
RESTORE = "restore the store from where it came from, or recompute it with `refine precompute`"
# Classes stored per crop. On imagenette-96 (10 classes, GPU parity sweep) students on top-5
# labels trailed the online refinery by 1.15 points at K = 40; storing all 10 closed the gap to
# 0.06 (benchmarks/results/parity_gpu_top10.md; docs/design.md, choosing K and top-k).
DEFAULT_TOP_K = 10
# Where training puts the probability mass outside a crop's stored top-k (``losses.
# dense_from_sparse``): renormalize the top k, or spread it uniformly over the other classes.
# Defined here, torch-free, beside the top-k it completes, so the CLI can offer it.
REST_POLICIES = ("renormalize", "uniform")
"""Where a target puts the mass outside a crop's stored top-k (``--rest``): ``renormalize``
scales the top k to sum to 1 (the default), ``uniform`` spreads it over the other classes."""
DEFAULT_REST = "renormalize"
# Probabilities are stored as multiples of 2^-prob_bits. 11 is the finest step float16 holds for
# every p < 1, and its own rounding step at p >= 0.5: no stored value is further from the
# refinery's than float16 already allows there, while small probabilities stop carrying relative
# precision nobody trains on, which the codec then compresses away. 0: unrounded float16.
MAX_PROB_BITS = 11
DEFAULT_PROB_BITS = 11


# At most this many bytes of decoded values per chunk, all arrays together: precompute holds a
# chunk in memory and every rank writes whole chunks. ~8 MB at K = 40, top-10 (the 200k-crop
# rule alone); the cap binds only for wide labels (top-k of ~120 or more at K = 40).
CHUNK_VALUE_BYTES = 64 << 20


def default_chunk_size(crops_per_image: int, top_k: int = DEFAULT_TOP_K) -> int:
    """Images per chunk: the power of two nearest 200,000 crops (~1 MB compressed objects per
    array at top-10; 4,096 images, 313 chunks at ImageNet-1k, K = 40), lowered to a power of two
    whose decoded values fit :data:`CHUNK_VALUE_BYTES` when the labels are wide; 16 to 2^20."""
    crop_bytes = 4 * 2 + 1 + top_k * (2 + 2)  # boxes, flip, indices and probabilities per crop
    by_crops = np.round(np.log2(200_000 / max(1, crops_per_image)))
    by_bytes = np.floor(np.log2(CHUNK_VALUE_BYTES / (max(1, crops_per_image) * crop_bytes)))
    return int(2 ** np.clip(min(by_crops, by_bytes), 4, 20))


def round_probabilities(values, bits: int) -> np.ndarray:
    """``values`` as float16 multiples of ``2**-bits``, rounded to nearest (``bits`` 0: float16,
    unrounded).

    Parameters
    ----------
    values : array_like
        Probabilities in [0, 1] (float16 as the refinery returns them, or wider).
    bits : int
        0, or 1 ... :data:`MAX_PROB_BITS`: every multiple of ``2**-11`` in [0, 1] is exactly a
        float16, so the result needs no decoding; it keeps the order of ``values`` (rounding is
        monotonic), though neighbours may become equal.

    Returns
    -------
    numpy.ndarray
        float16, the shape of ``values``; the largest change is ``2**-(bits + 1)`` (plus
        float16's own rounding for ``bits`` 0).
    """
    values = np.asarray(values)
    if not bits:
        return values.astype(np.float16, copy=False)
    scale = float(2 ** bits)
    return (np.rint(values.astype(np.float32) * scale) / scale).astype(np.float16)


@dataclass
class StoreLayout:
    """The shape of a store's per-image arrays and how they are chunked (``LabelStore.layout``).

    Attributes
    ----------
    num_images, crops_per_image, top_k : int
        N images, K crops per image, k classes per crop.
    chunk_size : int
        Images per chunk: the unit written, checksummed, claimed and resumed.
    soft_static : bool
        Whether the refinery's label of each whole (centred) image is stored too.
    prob_bits : int
        Probabilities are stored as multiples of 2^-prob_bits (0: unrounded).
    """

    num_images: int
    crops_per_image: int
    top_k: int
    chunk_size: int
    soft_static: bool = False  # also store the refinery's label of the whole (centred) image
    prob_bits: int = DEFAULT_PROB_BITS  # probabilities: multiples of 2^-prob_bits (0: unrounded)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_images // self.chunk_size)

    def chunk_range(self, c: int) -> range:
        """The images of chunk ``c`` (the last chunk may hold fewer)."""
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

    def rounded(self, arrays: dict) -> dict:
        """``arrays`` with the probability arrays rounded to ``prob_bits`` (what is stored)."""
        return {name: round_probabilities(values, self.prob_bits) if name in PROB_ARRAYS
                else values for name, values in arrays.items()}

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
        Images per loader batch. Loader batches never straddle chunks: each chunk is cut into
        batches of this many images from its first image, the last one possibly shorter
        (:meth:`units`).
    """

    crop_batch: int
    images_per_batch: int

    @classmethod
    def for_layout(cls, layout: StoreLayout, crop_batch: int) -> "Batching":
        """About ``crop_batch`` images (at most 16,384 crops) per loader batch, evened out over
        each chunk: a chunk of ``n`` images is cut into ``ceil(n / target)`` near-equal batches,
        so 50 images at a target of 32 give two batches of 25, not 32 + 18 (train-mode BN never
        sees a stray small batch). A power-of-two chunk size keeps the rule stores were made
        with before other sizes worked (batches of the largest power of two not above the
        target), so those stores resume and audit identically."""
        size = layout.chunk_size
        target = max(1, min(crop_batch, 16384 // layout.crops_per_image, size))
        if size & (size - 1) == 0:
            return cls(crop_batch, 1 << (target.bit_length() - 1))
        return cls(crop_batch, -(-size // -(-size // target)))

    def units(self, layout: StoreLayout, c: int) -> list:
        """Chunk ``c``'s loader batches as ``range``s of image ids: the unit a batch's crops are
        shuffled and labelled in, so a resume or an audit can rebuild any of them alone."""
        rows = layout.chunk_range(c)
        return [range(start, min(start + self.images_per_batch, rows.stop))
                for start in range(rows.start, rows.stop, self.images_per_batch)]


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
    selected_outputs : list of int or None
        Where the network predicts more classes than the store's (an ImageNet-1k refinery on
        an ImageNet-subset data set): the output that labelled each store class, class ``j``
        from output ``selected_outputs[j]``, probabilities ``softmax(logits[selected] /
        temperature)``. None (absent from the attribute) when output ``j`` is class ``j``.
    members : list of dict or None
        An ensemble's members (format 4), each a record like this one without ``members``, in
        the order given: labels are the mean of their probabilities. The ensemble's ``arch`` is
        then ``"ensemble"``, its ``weights_sha256`` the SHA-256 of the members' digests joined
        by commas, its ``normalization`` theirs where all share one (else None). None (absent
        from the attribute) for one refinery.
    """

    arch: str
    weights_sha256: str
    bn_mode: str
    temperature: float
    input_size: int
    normalization: dict
    selected_outputs: Optional[list] = None
    members: Optional[list] = None


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


def _check_layout(location, layout: StoreLayout):
    """Refuse a layout that cannot describe arrays before anything is written."""
    for name in ("num_images", "crops_per_image", "top_k", "chunk_size"):
        value = getattr(layout, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise StoreError(f"{location}: layout {name} must be a whole number >= 1 (got "
                             f"{value!r}); pass a positive {name}")
    bits = layout.prob_bits
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) \
            or not 0 <= bits <= MAX_PROB_BITS:
        raise StoreError(f"{location}: layout prob_bits must be a whole number in 0 ... "
                         f"{MAX_PROB_BITS} (got {bits!r}); pass e.g. {DEFAULT_PROB_BITS}")


def _layout_text(layout: StoreLayout) -> str:
    return ", ".join(f"{key} {value}" for key, value in layout.__dict__.items())


def _parse_layout(location, layout) -> StoreLayout:
    """The ``layout`` attribute as a :class:`StoreLayout`. Every array access is computed from
    it, so an edited one that cannot describe arrays is refused here, by name."""
    names = {f.name for f in fields(StoreLayout)}
    counts = names - {"soft_static", "prob_bits"}
    bits = layout.get("prob_bits", 0) if isinstance(layout, dict) else None  # absent: format < 3
    usable = (isinstance(layout, dict) and counts <= set(layout) <= names
              and all(type(layout[n]) is int and layout[n] >= 1 for n in counts)
              and type(layout.get("soft_static", False)) is bool
              and type(bits) is int and 0 <= bits <= MAX_PROB_BITS)
    if not usable:
        raise StoreCorruptError(f"{location}: the layout attribute is malformed ({_short(layout)}; "
                                "num_images, crops_per_image, top_k and chunk_size must be "
                                f"integers >= 1, prob_bits 0 ... {MAX_PROB_BITS}); {RESTORE}")
    return StoreLayout(**{**layout, "prob_bits": bits})


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
