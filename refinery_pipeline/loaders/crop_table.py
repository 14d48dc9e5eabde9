"""The crop table: the one array the FFCV pipeline and the crop sources share.

A crop table is an int32 array ``(N, S, 7)`` of ``(y, x, h, w, flip, slot, source)`` per image
and slot: ``slot`` is the stored slot the row replays, or ``NOT_STORED``; ``source`` is 0 for a
crop of the row's own image and m + 1 for a crop of image m, the partner a mixing recipe pairs
with. The image decoder (:class:`.ffcv_ops.PlannedCropDecoder`) cuts each row's boxes from it,
the label op (:class:`.ffcv_ops.WithIndexAndSlots`) copies their slots into each sample's batch
row, and a crop source (:mod:`.crop_sources`) rewrites it in place before every epoch:

* precompute uses the whole plan (``S = K``) and cuts all K crops from one decode of each image;
* training uses ``S = 1`` (``S = 2`` with a mixing recipe: the crop and its partner), with that
  epoch's crop per image (a replayed slot, or a fresh random box for ground-truth/online modes).

Nothing here imports FFCV, numba or torch.
"""
import numpy as np

TABLE_FIELDS = 7  # y, x, h, w, flip, slot, source (0: the row's image; m + 1: image m)
SOURCE = 6  # the field naming the image a row's crop is cut from


def crop_table(boxes: np.ndarray, flips: np.ndarray, slots: np.ndarray = None,
               sources: np.ndarray = None) -> np.ndarray:
    """Pack boxes ``(N, S, 4)``, flips ``(N, S)``, slots ``(N, S)`` (default: column s is
    slot s, i.e. all of an image's stored crops in order) and source images ``(N, S)``
    (default: each row's own) into a C-contiguous int32 table ``(N, S, 7)``."""
    if slots is None:
        slots = np.broadcast_to(np.arange(flips.shape[1]), flips.shape)
    source = np.zeros(flips.shape, np.int32) if sources is None else np.asarray(sources) + 1
    return np.ascontiguousarray(np.concatenate(
        [boxes.astype(np.int32), flips.astype(np.int32)[..., None],
         np.asarray(slots).astype(np.int32)[..., None], source.astype(np.int32)[..., None]],
        axis=-1))
