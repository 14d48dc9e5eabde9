"""Any map-style data set, keyed by a user's function of the index."""
import numpy as np

from ..core.errors import ArgumentError, DataSetError
from .base import ImageSource, as_labels, decode_image
from .pixels import rgb_of_any


class MappedSource(ImageSource):
    """A map-style data set (``len`` and ``[i]``) whose items are an image or an
    ``(image, label, ...)`` tuple, keyed by ``key_fn(i)``.

    Images may be PIL images, ``(H, W, 3)`` uint8 arrays, ``(3, H, W)`` uint8 tensors or encoded
    bytes; they are decoded pixels, so this source has :meth:`image` only. Labels come from the
    data set's ``targets`` and classes from its ``classes`` (or ``classes=``), where present;
    no item is read to find them.
    """

    kind = "mapped"
    key_rule = "the user's key function of the item index"
    has_bytes = False

    def __init__(self, dataset, key_fn=None, classes=None):
        if not callable(key_fn):
            raise ArgumentError("key_fn: a map-style data set has no keys of its own; pass "
                                "key_fn=lambda i: <the image's file name or id>")
        self.dataset = dataset
        location = f"{type(dataset).__module__}.{type(dataset).__name__}"
        classes = classes if classes is not None else getattr(dataset, "classes", None)
        targets = getattr(dataset, "targets", None)
        self._labels = None if targets is None else as_labels(targets, classes, location)
        super().__init__(location, (_called(key_fn, i) for i in range(len(dataset))), classes)

    def labels(self):
        return self._labels

    def image(self, i: int) -> np.ndarray:
        """Item ``i``'s image by the pixel mode rule (:func:`refinery_pipeline.sources.pixels.rgb_of_any`:
        PIL images of any mode, ``(H, W[, C])`` arrays, ``([C, ]H, W)`` tensors); encoded bytes
        are decoded as files are."""
        item = self.dataset[int(i)]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_image(bytes(image), self.describe(i))
        return rgb_of_any(image, self.describe(i))

    def describe(self, i: int) -> str:
        return f"{self.location} item {i}"


def _called(key_fn, i: int):
    try:
        return key_fn(i)
    except Exception as exc:  # the user's function: report where it failed
        raise DataSetError(f"key_fn({i}) failed ({type(exc).__name__}: {exc}); make the key "
                           "function accept every index of the data set") from None
