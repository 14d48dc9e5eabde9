"""Image pixels as refinery reads them: every file and array as ``(H, W, 3)`` uint8 RGB by one rule,
and a stored crop cut without FFCV, the same pixels as the FFCV replay from the same bytes.

The one rule (:func:`rgb_of_image`, :func:`rgb_of_array`), used by the ``.beton`` conversion, the
original-file (tree) path and mapped data sets alike, so all three agree:

* 8-bit PIL modes (1, L, LA, P with or without transparency, PA, RGB, RGBA, CMYK, YCbCr, ...)
  are PIL's ``convert("RGB")``, exactly as torchvision's ``ImageFolder`` loader reads them;
  alpha and palette transparency are dropped, not composited (torchvision's rule);
* 16-bit samples (PIL ``I;16``, ``I;16B``, ``I;16L``, uint16 arrays) keep their high byte,
  ``v >> 8``: the rule PIL already applies to 16-bit RGB PNGs, so a 16-bit grey and a 16-bit
  colour file of the same scene agree (``convert("RGB")`` would clip a 16-bit grey to white);
* 32-bit integer images (PIL ``I``, how 16-bit grey files open elsewhere) are 16-bit samples
  clipped to ``[0, 65535]``, then as above;
* floating point (PIL ``F``, float arrays, float tensors) is torchvision's ``[0, 1]`` scale:
  ``floor(clip(v, 0, 1) * 255 + 0.5)``, NaN as 0;
* grey becomes three equal channels; a second channel (grey + alpha) or fourth (RGBA) is dropped;
* multi-frame files (GIF, APNG, TIFF pages) give their first frame.

Anything else (other dtypes, shapes) is refused in one line naming the image and the fix.

Image size: an image above :func:`max_image_pixels` (PIL's decompression-bomb limit) is refused in
one line naming the file; PIL's warning at half that size is not shown, because decode buffers
are per decoding thread, not per sample (``docs/design.md``, bounded memory).

Exact crops: FFCV decodes JPEGs with libjpeg-turbo's fast integer DCT and default (fancy) chroma
upsampling, crops the box, resizes it with OpenCV ``INTER_AREA`` (also when it upsamples) and
mirrors the result. ``simplejpeg`` (its own libjpeg-turbo) with ``fastdct=True,
fastupsample=False`` and ``cv2.resize`` reproduce that byte for byte; PIL, ``cv2.imdecode`` and
torchvision's decoders differ by up to 8 levels, and PIL/torchvision resizing by up to 99
(``shared/notes/exact-pixels.md``).

This module imports neither FFCV nor torch.
"""
import io
import re
import warnings
from pathlib import Path

import numpy as np

from ..core.errors import DataSetError, first_line

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ARRAY_FIX = ("give uint8 (0..255), uint16 (0..65535), bool, or float in [0, 1] pixels, "
             "(H, W), (H, W, 1..4) or, for tensors, (1..4, H, W)")


def max_image_pixels() -> int:
    """The largest image refinery reads, in pixels: PIL's decompression-bomb limit,
    ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970 by default; e.g. 16,000 x 11,000). Raise
    ``PIL.Image.MAX_IMAGE_PIXELS`` for files you trust; None there means no limit."""
    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def check_image_size(path, width: int, height: int):
    """Refuse an image above :func:`max_image_pixels` before it is decoded."""
    limit = max_image_pixels()
    if limit is not None and width * height > limit:
        raise DataSetError(_too_large(path, f"{width}x{height} is {width * height:,} pixels"))


def _too_large(path, size: str) -> str:
    return (f"{path}: too large to read ({size}, above the limit of {max_image_pixels():,}: "
            "PIL's decompression-bomb guard); downscale the file, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust it")


def _pil_size(message: str) -> str:
    """The pixel count PIL's DecompressionBombError names, as we write numbers."""
    found = re.search(r"\((\d+) pixels\)", message)
    return f"{int(found.group(1)):,} pixels" if found else message


def rgb_of_image(image, what="image") -> np.ndarray:
    """A PIL image of any mode as ``(H, W, 3)`` uint8 RGB, by the module's rule (its docstring).

    ``what`` names the image in an error (a file path, ``image 3 of the data set``)."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        return rgb_of_array(np.asarray(image), what)
    if image.mode == "I":
        return rgb_of_array(np.clip(np.asarray(image), 0, 65535).astype(np.uint16), what)
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise DataSetError(f"{what}: PIL cannot convert mode {image.mode} to RGB ({exc}); "
                           "save the image as RGB or grayscale") from None


def rgb_of_array(array: np.ndarray, what="image") -> np.ndarray:
    """An ``(H, W)`` or ``(H, W, C)`` array (C 1 to 4: grey, grey + alpha, RGB, RGBA) as
    ``(H, W, 3)`` uint8 RGB, by the module's rule; other dtypes and shapes are refused."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (1, 2, 3, 4):
        array = array[..., :1] if array.shape[2] < 3 else array[..., :3]
    elif array.ndim != 2:
        raise DataSetError(f"{what}: pixels of shape {array.shape} are no image; {ARRAY_FIX}")
    pixels = _eight_bit(array, what)
    if pixels.ndim == 2 or pixels.shape[2] == 1:
        pixels = np.repeat(pixels.reshape(pixels.shape[:2] + (1,)), 3, axis=2)
    return np.ascontiguousarray(pixels)


def _eight_bit(array: np.ndarray, what) -> np.ndarray:
    """Samples of any supported dtype as uint8: the module's 16-bit and float rules."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "u" and size == 1:
        return array
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if kind == "u" and size == 2:
        return (array.astype(np.uint16) >> 8).astype(np.uint8)
    if kind == "f":
        scaled = np.floor(np.clip(np.nan_to_num(array.astype(np.float64)), 0, 1) * 255 + 0.5)
        return scaled.astype(np.uint8)
    raise DataSetError(f"{what}: pixels of dtype {array.dtype} have no agreed 8-bit scale; "
                       f"{ARRAY_FIX}")


def open_image_file(path) -> np.ndarray:
    """An image file's first frame as ``(H, W, 3)`` uint8 RGB through PIL and
    :func:`rgb_of_image`: how ``refine`` converts a tree, and how torchvision's ``ImageFolder``
    reads its 8-bit files. Files above :func:`max_image_pixels` are refused."""
    return _open_with_pil(path, path)


def open_image_bytes(data: bytes, what="image") -> np.ndarray:
    """Encoded image bytes held in memory (a shard member, a table cell) as
    :func:`open_image_file` reads a file of those bytes: the same pixels, the same limit."""
    return _open_with_pil(io.BytesIO(data), what)


def _open_with_pil(file, what) -> np.ndarray:
    from PIL import Image
    with warnings.catch_warnings():  # the limit is enforced below: PIL's half-way warning is noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(file) as image:
                image.seek(0)
                return rgb_of_image(image, what)
        except Image.DecompressionBombError as exc:
            raise DataSetError(_too_large(what, _pil_size(str(exc)))) from None


def image_file_size(path):
    """``(width, height)`` of an image file from its header (nothing decoded), or None when PIL
    cannot read it (the conversion then names the file)."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return image.size
        except Exception:  # noqa: BLE001 - reported when the file is converted
            return None


JPEG_MAGIC = b"\xff\xd8"
# Colour spaces libjpeg-turbo turns into RGB itself, as FFCV's decoder asks it to (CMYK and YCCK
# JPEGs it cannot convert: PIL reads those, by the rule above).
RGB_DECODABLE = ("Gray", "YCbCr", "RGB")


def decode_jpeg(data) -> np.ndarray:
    """Decode JPEG bytes to ``(H, W, 3)`` uint8 RGB exactly as FFCV's ``imdecode`` does."""
    import simplejpeg
    return simplejpeg.decode_jpeg(bytes(data) if not isinstance(data, bytes) else data,
                                  colorspace="RGB", fastdct=True, fastupsample=False)


def jpeg_frame(data: bytes):
    """``(height, width)`` of JPEG bytes whose colour space (Gray, YCbCr or RGB, from the
    header alone) FFCV's decoder reads as RGB; None for anything else (not a JPEG, CMYK or
    YCCK, a header libjpeg-turbo cannot read)."""
    if data[:2] != JPEG_MAGIC:
        return None
    import simplejpeg
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width) if colorspace in RGB_DECODABLE else None


def decode_exactly(data: bytes, what="image"):
    """JPEG bytes decoded as FFCV decodes them (:func:`decode_jpeg`), or None where that is
    not how refinery reads them: not such a JPEG (:func:`jpeg_frame`), or one libjpeg-turbo
    reads only with a warning (a truncated or damaged file), which PIL reads instead. The
    ``.beton`` conversion stores exactly these images' bytes unchanged (``dataset.py``)."""
    frame = jpeg_frame(data)
    if frame is None:
        return None
    check_image_size(what, frame[1], frame[0])
    try:
        return decode_jpeg(data)
    except ValueError:  # libjpeg-turbo's warnings are errors here (simplejpeg's strict mode)
        return None


def decode_image(data: bytes, what="image") -> np.ndarray:
    """Encoded image bytes as ``(H, W, 3)`` uint8 RGB, by refinery's one rule for bytes:
    :func:`decode_exactly` where it applies (FFCV's exact decoder: the pixels a ``.beton``
    holding these bytes gives), anything else through PIL (:func:`open_image_bytes`). Bytes
    that are no image are a one-line :class:`DataSetError` naming ``what``."""
    pixels = decode_exactly(data, what)
    if pixels is not None:
        return pixels
    try:
        return open_image_bytes(data, what)
    except DataSetError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for foreign bytes
        reason = first_line(exc)
        raise DataSetError(f"{what}: cannot be read as an image ({reason}); delete or replace "
                           "it") from None


def read_image_file(path) -> np.ndarray:
    """An original image file as ``(H, W, 3)`` uint8 RGB by :func:`decode_image`: YCbCr and
    grey JPEGs through :func:`decode_jpeg` (libjpeg-turbo, fast; the pixels of the ``.beton``
    that holds the file's bytes), anything else (CMYK and YCCK JPEGs, other formats) through
    PIL, the rule ``refine`` converts trees by. Decided by the bytes, not the file name."""
    return decode_image(Path(path).read_bytes(), path)


def cut_crop(image: np.ndarray, box, flip: bool, size: int) -> np.ndarray:
    """Rows ``y:y+h``, columns ``x:x+w`` of ``image``, resized to ``size x size`` with OpenCV
    ``INTER_AREA``, mirrored left-right if ``flip``: FFCV's replay, step for step."""
    import cv2
    y, x, h, w = (int(v) for v in box)
    # OpenCV reads the box as a view (rows at the image's stride) and mirrors in one pass: the
    # contiguous copies numpy needs cost ~85 us of a 96 px crop's ~105 us
    crop = cv2.resize(image[y:y + h, x:x + w], (size, size), interpolation=cv2.INTER_AREA)
    return cv2.flip(crop, 1) if flip else crop


def box_in_frame(box, stored_size, actual_size) -> np.ndarray:
    """A box ``(y, x, h, w)`` drawn in an image's stored frame ``(H, W)``, rescaled to the frame
    ``(H', W')`` of a copy of another size (a resized copy; original files of a ``.beton``
    written with a capped resolution). Identity when equal. The rule (``docs/label-store.md``):
    ``fy = H'/H``, ``fx = W'/W``; ``y0 = round(y fy)``, ``x0 = round(x fx)``,
    ``h' = max(1, min(H' - y0, round(h fy)))``, ``w' = max(1, min(W' - x0, round(w fx)))``,
    rounding half to even (Python's ``round``, numpy's ``rint``)."""
    (sh, sw), (ah, aw) = stored_size, actual_size
    if (sh, sw) == (ah, aw):
        return np.asarray(box)
    return np.array(_rescaled(*(float(v) for v in box), ah / sh, aw / sw, ah, aw), np.int64)


def boxes_in_frames(boxes, stored_sizes, actual_sizes) -> np.ndarray:
    """:func:`box_in_frame` of whole tables: boxes ``(N, ..., 4)`` of N images whose stored
    frames are ``stored_sizes`` ``(N, 2)`` and whose copies' frames are ``actual_sizes``
    ``(N, 2)``; int64, the same values box by box."""
    boxes = np.asarray(boxes)
    stored = np.asarray(stored_sizes, np.float64)
    actual = np.asarray(actual_sizes, np.float64)
    extra = (1,) * (boxes.ndim - 2)  # broadcast each image's frame over its boxes
    fy, fx = [(actual[:, a] / stored[:, a]).reshape((-1,) + extra) for a in (0, 1)]
    ah, aw = [actual[:, a].reshape((-1,) + extra) for a in (0, 1)]
    y, x, h, w = (boxes[..., i].astype(np.float64) for i in range(4))
    return np.stack(_rescaled(y, x, h, w, fy, fx, ah, aw), -1).astype(np.int64)


def _rescaled(y, x, h, w, fy, fx, ah, aw) -> tuple:
    """The rescaling rule on numbers or arrays alike (one definition for both forms)."""
    y0, x0 = np.rint(y * fy), np.rint(x * fx)
    return (y0, x0, np.maximum(1, np.minimum(ah - y0, np.rint(h * fy))),
            np.maximum(1, np.minimum(aw - x0, np.rint(w * fx))))


def reframed(stored_sizes, actual_sizes):
    """Whether a copy's frame ``(H', W')`` is no rescaling of the stored ``(H, W)`` (rotated,
    cropped or padded). The larger frame's shorter side, scaled into the smaller frame by the
    longer sides' ratio, misses the smaller frame's shorter side by more than one pixel.
    (Compared in the smaller frame, where the rounding of a rescale happened: a store capped at
    256 px of a 3000 x 2000 file holds 256 x 170, which scaled up misses 2000 by 8.) Boxes
    cannot be carried into such a frame; the image is unusable (counted, treated as missing).
    Sizes ``(2,)`` or ``(N, 2)``; a bool or ``(N,)``."""
    stored = np.asarray(stored_sizes, np.float64)
    actual = np.asarray(actual_sizes, np.float64)
    tall = stored[..., 0] >= stored[..., 1]  # sides named by the stored frame's orientation
    long_stored = np.where(tall, stored[..., 0], stored[..., 1])
    short_stored = np.where(tall, stored[..., 1], stored[..., 0])
    long_actual = np.where(tall, actual[..., 0], actual[..., 1])
    short_actual = np.where(tall, actual[..., 1], actual[..., 0])
    shrunk = long_actual <= long_stored  # the copy is the smaller frame
    predicted = np.where(shrunk, np.rint(short_stored * long_actual / long_stored),
                         np.rint(short_actual * long_stored / long_actual))
    return np.abs(predicted - np.where(shrunk, short_actual, short_stored)) > 1


def rgb_of_any(image, what="image") -> np.ndarray:
    """An image held in memory, by the module's rule: a PIL image of any mode, an ``(H, W[, C])``
    array, or a tensor in torchvision's ``([C, ]H, W)`` layout (C 1 to 4; recognised by its
    methods, so this module needs no torch); bfloat16 and half tensors as float32."""
    if hasattr(image, "convert"):  # PIL
        return rgb_of_image(image, what)
    if hasattr(image, "detach") and hasattr(image, "permute"):  # a torch tensor
        image = image.detach().cpu()
        if image.is_floating_point():
            image = image.float()
        if image.ndim == 3 and image.shape[0] in (1, 2, 3, 4):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    return rgb_of_array(image, what)
