"""Cutting a stored crop without FFCV: the same pixels as the FFCV replay, from the same bytes.

FFCV decodes JPEGs with libjpeg-turbo's fast integer DCT and default (fancy) chroma upsampling,
crops the box, resizes it with OpenCV ``INTER_AREA`` (also when it upsamples) and mirrors the
result. ``simplejpeg`` (its own libjpeg-turbo) with ``fastdct=True, fastupsample=False`` and
``cv2.resize`` reproduce that byte for byte; PIL, ``cv2.imdecode`` and torchvision's decoders
differ by up to 8 levels, and PIL/torchvision resizing by up to 99 (``shared/notes/exact-pixels.md``).

This module imports neither FFCV nor torch.
"""
from pathlib import Path

import numpy as np

JPEG_SUFFIXES = (".jpg", ".jpeg")


def decode_jpeg(data) -> np.ndarray:
    """Decode JPEG bytes to ``(H, W, 3)`` uint8 RGB exactly as FFCV's ``imdecode`` does."""
    import simplejpeg
    return simplejpeg.decode_jpeg(bytes(data) if not isinstance(data, bytes) else data,
                                  colorspace="RGB", fastdct=True, fastupsample=False)


def read_image_file(path) -> np.ndarray:
    """An original image file as ``(H, W, 3)`` uint8 RGB: JPEGs through :func:`decode_jpeg`
    (libjpeg-turbo, fast), anything else (and JPEGs it cannot read, e.g. CMYK) through PIL,
    converted to RGB as ``refine`` converts trees."""
    path = Path(path)
    if path.suffix.lower() in JPEG_SUFFIXES:
        try:
            return decode_jpeg(path.read_bytes())
        except ValueError:
            pass  # CMYK, progressive oddities: PIL below handles them
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def cut_crop(image: np.ndarray, box, flip: bool, size: int) -> np.ndarray:
    """Rows ``y:y+h``, columns ``x:x+w`` of ``image``, resized to ``size x size`` with OpenCV
    ``INTER_AREA``, mirrored left-right if ``flip``: FFCV's replay, step for step."""
    import cv2
    y, x, h, w = (int(v) for v in box)
    crop = cv2.resize(np.ascontiguousarray(image[y:y + h, x:x + w]), (size, size),
                      interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(crop[:, ::-1]) if flip else crop


def box_in_frame(box, stored_size, actual_size) -> np.ndarray:
    """A box drawn in an image's stored frame ``(H, W)``, scaled to a frame of another size
    (original files of a ``.beton`` written with a capped resolution). Identity when equal."""
    (sh, sw), (ah, aw) = stored_size, actual_size
    if (sh, sw) == (ah, aw):
        return np.asarray(box)
    y, x, h, w = (float(v) for v in box)
    fy, fx = ah / sh, aw / sw
    y0, x0 = int(round(y * fy)), int(round(x * fx))
    return np.array([y0, x0, max(1, min(ah - y0, int(round(h * fy)))),
                     max(1, min(aw - x0, int(round(w * fx))))])
