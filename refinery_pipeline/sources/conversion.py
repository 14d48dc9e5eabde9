"""How a source's images become a ``.beton``'s samples: their own bytes, or pixels re-encoded.

A JPEG passes through unchanged (``BetonOptions.jpeg == "passthrough"``, the default of new
conversions) when FFCV's decoder reads it exactly as refinery reads the original
(:func:`.pixels.decode_exactly`: colour space Gray, YCbCr or RGB, decoded without a warning) and
its longer side is within ``max_resolution``. FFCV's ``imdecode`` of a file's own bytes equals
``simplejpeg`` with the fast DCT byte for byte (8,000 real files; every chroma subsampling,
baseline and progressive, grey), so the original files and every byte-identical copy of them
(shards, tables, a flat copy) give exactly the pixels the refinery labelled. Anything else
(other formats, CMYK, larger than the cap, damaged JPEGs, and every image with ``reencode``,
how ``.beton`` files were written before) is decoded by the one pixel rule of :mod:`.pixels`
(PIL), resized and encoded as FFCV's own ``RGBImageField`` does: the bytes of old conversions.

FFCV's writer processes ask :class:`BetonSamples` for each sample. A sample that cannot be read
is logged, never raised (a writer process that raises leaves FFCV's main process waiting
forever), and each sample's SHA-256 is written as it is made, by the writer processes in
parallel: the per-image digests a label store records (``image_digests``).
"""
import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..core.errors import DataSetError, first_line
from .pixels import decode_exactly, image_file_size, jpeg_frame, open_image_bytes, rgb_of_array

JPEG_MODES = ("passthrough", "reencode")
JPG, RAW = 0, 1  # FFCV's IMAGE_MODES: the sample is a JPEG file, or H x W x 3 raw pixels
UNKNOWN_LABEL = -1  # the label field of an image whose source has no labels (a flat folder)
DIGEST_BYTES = 32


@dataclass(frozen=True)
class StoredImage:
    """One ``.beton`` image sample as FFCV stores it: its mode, its frame and its bytes.
    ``unchanged``: the bytes are the source's own (passed through)."""

    mode: int
    height: int
    width: int
    data: np.ndarray  # uint8, one dimension
    unchanged: bool = False


PLACEHOLDER = StoredImage(RAW, 1, 1, np.zeros(3, np.uint8))  # stands in for a failed sample


def stored_image(item, options, what="image") -> StoredImage:
    """The sample of ``item``, a source's encoded bytes or decoded pixels, under ``options``
    (:class:`.dataset.BetonOptions`); ``what`` names it in errors."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        frame = passthrough_frame(data, options, what)
        if frame is not None:
            return StoredImage(JPG, *frame, np.frombuffer(data, np.uint8), unchanged=True)
        item = open_image_bytes(data, what)
    return encoded_pixels(rgb_of_array(item, what), options)


def passthrough_frame(data: bytes, options, what="image"):
    """``(height, width)`` when ``data`` is stored unchanged under ``options``, else None."""
    if options.jpeg != "passthrough" or options.write_mode != "jpg":
        return None
    frame = jpeg_frame(data)
    if frame is None or (options.max_resolution and max(frame) > options.max_resolution):
        return None
    return frame if decode_exactly(data, what) is not None else None


def encoded_pixels(image: np.ndarray, options) -> StoredImage:
    """``(H, W, 3)`` uint8 pixels resized and encoded exactly as FFCV's ``RGBImageField``
    encodes them (longer side capped with ``INTER_AREA``, sizes floored; OpenCV's JPEG at
    ``jpeg_quality``, or raw)."""
    from ffcv.fields.rgb_image import encode_jpeg, resizer
    image = resizer(np.ascontiguousarray(image), options.max_resolution or None)
    height, width = image.shape[:2]
    if options.write_mode == "raw":
        return StoredImage(RAW, height, width, np.ascontiguousarray(image).reshape(-1))
    return StoredImage(JPG, height, width, encode_jpeg(image, options.jpeg_quality))


def store_sample(destination, sample: StoredImage, malloc):
    """FFCV field ``encode``: write a prepared :class:`StoredImage` as its image field does."""
    destination["mode"] = sample.mode
    destination["height"], destination["width"] = sample.height, sample.width
    destination["data_ptr"], storage = malloc(len(sample.data))
    storage[:] = sample.data


def image_field():
    """FFCV's ``RGBImageField`` storing prepared samples (:func:`store_sample`).

    The instance's ``encode`` is replaced rather than the class subclassed: FFCV names a
    field's type in the file by its exact class (``type(field)``), and writes a subclass as an
    unknown field that no reader decodes."""
    from ffcv.fields import RGBImageField
    field = RGBImageField()
    field.encode = store_sample
    return field


class BetonSamples:
    """What FFCV's writer asks for: sample ``i`` of the ``.beton`` is item ``order[i]`` of
    ``source``, as ``(StoredImage, label)``.

    ``source`` is an :class:`.sources.ImageSource` (its encoded bytes, or its decoded images
    where it has no bytes) or an indexable of ``(image, label)`` pairs (``ArraySource``).
    Each sample's SHA-256, and whether it passed through, go to row ``i`` of the ``(N, 33)``
    uint8 file ``scratch`` (made by the caller), written by whichever process made the sample.
    An item that cannot be read, or whose sample exceeds ``page_size``, is appended to
    ``error_log`` and replaced by a placeholder; once ``failure_log`` exists (a page write
    failed) every sample is a placeholder, so the writer processes run out quickly.
    """

    def __init__(self, source, order, options, page_size=None, scratch=None, error_log=None,
                 failure_log=None):
        self.source, self.order, self.options = source, np.asarray(order), options
        self.page_size, self.scratch = page_size, scratch
        self.error_log, self.failure_log = error_log, failure_log
        self.labels = item_labels(source)
        self._rows = None

    def __len__(self):
        return len(self.order)

    def __getstate__(self):
        return dict(self.__dict__, _rows=None)  # each process maps the scratch file itself

    def prepare(self, n: int) -> StoredImage:
        """Source item ``n``'s sample; raises :class:`DataSetError` naming the item."""
        what = describe_item(self.source, n)
        sample = stored_image(read_item(self.source, n), self.options, what)
        if self.page_size is not None and len(sample.data) > self.page_size:
            fix = ("--jpeg reencode (its metadata is then left out)" if sample.unchanged
                   else "a smaller --max-resolution")
            raise DataSetError(f"{what}: an image of {sample.height}x{sample.width} stores as "
                               f"{len(sample.data):,} bytes, more than the .beton's "
                               f"{self.page_size:,}-byte page; convert with {fix}")
        return sample

    def __getitem__(self, i):
        n = int(self.order[i])
        if self.failure_log is not None and os.path.exists(self.failure_log):
            return PLACEHOLDER, UNKNOWN_LABEL
        try:
            sample = self.prepare(n)
        except Exception as exc:  # noqa: BLE001 - raising here would hang FFCV's writer
            self._log(unreadable_message(describe_item(self.source, n), exc))
            return PLACEHOLDER, int(self.labels[n])
        self._record(i, sample)
        return sample, int(self.labels[n])

    def _log(self, message: str):
        if self.error_log is None:
            raise DataSetError(message)
        with open(self.error_log, "a") as log:
            log.write(message.replace("\n", " ") + "\n")

    def _record(self, i: int, sample: StoredImage):
        if self.scratch is None:
            return
        if self._rows is None:
            self._rows = np.load(self.scratch, mmap_mode="r+")
        self._rows[i, :DIGEST_BYTES] = np.frombuffer(
            hashlib.sha256(sample.data).digest(), np.uint8)
        self._rows[i, DIGEST_BYTES] = sample.unchanged


def is_image_source(source) -> bool:
    """An :class:`.sources.ImageSource` (else an indexable of ``(image, label)`` pairs)."""
    from .base import ImageSource  # imported late: the sources import this package
    return isinstance(source, ImageSource)


def read_item(source, n: int):
    """Item ``n``'s encoded bytes where the source has them, else its decoded pixels."""
    if not is_image_source(source):  # (image, label) pairs
        return source[n][0]
    return source.encoded(n) if source.has_bytes else source.image(n)


def describe_item(source, n: int) -> str:
    return source.describe(n) if is_image_source(source) else f"image {n}"


def item_labels(source) -> np.ndarray:
    """Each item's label; :data:`UNKNOWN_LABEL` throughout for a source without labels."""
    labels = source.labels() if is_image_source(source) else source.labels
    if labels is None:
        return np.full(len(source), UNKNOWN_LABEL, np.int64)
    return np.asarray(labels, np.int64)


def unreadable_message(what, exc: Exception) -> str:
    """Ours (a :class:`DataSetError` names the item and the fix), or PIL's reason in one line."""
    if isinstance(exc, DataSetError):
        return str(exc)
    reason = first_line(exc)
    return f"{what}: cannot be read as an image ({reason}); delete or replace the file"


def largest_items(source) -> tuple:
    """``(n, nbytes)``: which item has the most pixels (None where that is not known without
    reading the images) and the largest encoded item's size (0 where not known): from file
    headers and sizes, shard indexes (the largest item stands in for the most pixels), a
    ``.beton``'s tables. The page holding the largest sample is sized from them
    (``beton_writer.page_size_of``); a sample that outgrows it anyway is named by
    :meth:`BetonSamples.prepare`."""
    from . import BetonSource, WebDatasetSource
    from .files import FileSource
    if hasattr(source, "largest_image"):  # (image, label) pairs
        return source.largest_image(), 0
    if isinstance(source, FileSource):
        pixels = [np.prod(image_file_size(f) or (0, 0)) for f in source.files]  # headers only
        return int(np.argmax(pixels)), max(os.path.getsize(f) for f in source.files)
    if isinstance(source, WebDatasetSource):
        return int(np.argmax(source.sizes)), int(source.sizes.max())
    if isinstance(source, BetonSource):
        return int(np.argmax(np.prod(source.sizes, axis=1))), int(source.nbytes.max())
    return None, 0
