"""refinery: offline Label Refinery labels, stored once and replayed by any training loop.

The public API is what this module exports (``__all__``); every submodule is private and may
change without notice. See ``docs/api.md``.

>>> import refinery_pipeline as refinery
>>> store = refinery.open_store("labels.zarr")                  # doctest: +SKIP
>>> data = refinery.StoreCropDataset(store, "imagenet/train")   # doctest: +SKIP
"""
__version__ = "0.3.0"

import importlib
from typing import TYPE_CHECKING

from .core.ffcv_import import install

install()  # FFCV's import without its 3 s typed-dict compile, in every process (see there)
del install

if TYPE_CHECKING:  # what static tools (IDEs, the docs' API reference) read; _HOMES at run time
    from .loaders.crop_batch import NOT_STORED, CropBatch, SparseLabels
    from .plan.crop_plan import SLOT_POLICIES, CropPlan, slot_of
    from .labelling.check_copy import check_copy, CopyReport
    from .loaders.copies import CopyJoin
    from .core.errors import (ArgumentError, CheckpointError, DataSetError, IncompleteStoreError,
                              MissingImagesError, RefineryError, RefineryWarning,
                              StoreCorruptError, StoreError, StoreMismatchError, StoreNotFoundError)
    from .store.label_store import LabelStore
    from .store.schema import (FORMAT_VERSION, REST_POLICIES, Batching, CropRecords, DatasetInfo,
                               RefineryInfo, StoreLayout)
    from .training.losses import (LOSSES, get_loss, kl_divergence, l2_on_probabilities, reverse_kl,
                                  soft_cross_entropy)
    from .loaders.stream import StoreCrops
    from .training.targets import visual_category_table
    from .loaders.torch_data import CropCollate, StoreCropDataset
    from .loaders.pixel_readers import BetonImages, FolderImages, MappedImages
    from .loaders.stored_crops import CropSample
    from .loaders.dense_targets import dense_targets
    from .training.wordnet import wordnet_category_table

# Where each public name lives. Names load on first use (PEP 562), so importing a torch-free
# part (the crop plan, the store, the errors) does not load torch, FFCV or numba.
_HOMES = {
    "loaders.crop_batch": ("NOT_STORED", "CropBatch", "SparseLabels"),
    "plan.crop_plan": ("SLOT_POLICIES", "CropPlan", "slot_of"),
    "labelling.check_copy": ("CopyReport", "check_copy"),
    "loaders.copies": ("CopyJoin",),
    "core.errors": ("ArgumentError", "CheckpointError", "DataSetError", "IncompleteStoreError",
                    "RefineryError", "RefineryWarning", "StoreCorruptError", "StoreError",
                    "StoreMismatchError", "StoreNotFoundError", "MissingImagesError"),
    "store.label_store": ("LabelStore",),
    "store.schema": ("FORMAT_VERSION", "Batching", "CropRecords", "DatasetInfo", "RefineryInfo",
                     "StoreLayout", "REST_POLICIES"),
    "training.losses": ("LOSSES", "get_loss", "kl_divergence", "l2_on_probabilities",
                        "reverse_kl", "soft_cross_entropy"),
    "loaders.stream": ("StoreCrops",),
    "training.targets": ("visual_category_table",),
    "loaders.torch_data": ("CropCollate", "StoreCropDataset"),
    "loaders.pixel_readers": ("BetonImages", "FolderImages", "MappedImages"),
    "loaders.stored_crops": ("CropSample",),
    "loaders.dense_targets": ("dense_targets",),
    "training.wordnet": ("wordnet_category_table",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    """A public name, imported from its module the first time it is asked for."""
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME_OF))


def open_store(location) -> "LabelStore":
    """Open a label store for reading.

    Parameters
    ----------
    location : str or os.PathLike
        A store directory, a ``.zip`` made by ``refine pack`` (read in place), or an fsspec
        URL (``s3://bucket/labels.zarr``; needs ``refinery[remote]``).

    Returns
    -------
    LabelStore
        Typed views: ``plan`` (:class:`CropPlan`), ``refinery`` (:class:`RefineryInfo`),
        ``dataset`` (:class:`DatasetInfo`), ``batching`` (:class:`Batching`), ``layout``
        (:class:`StoreLayout`); records: ``read_crops(images=None)`` (:class:`CropRecords`),
        ``read_labels()``, ``read_image_sizes()``.

    Raises
    ------
    StoreNotFoundError
        Nothing is stored there.
    StoreError
        Not a label store, or one of a newer format than this version reads.
    StoreCorruptError
        The store was edited or damaged since it was written: its layout, attributes (plan,
        recipe, refinery, ...), ``labels`` or ``image_sizes`` fail the checks ``refine verify``
        and ``refine train`` run (chunks are checked as they are read).
    ArgumentError
        ``location`` is no path or URL.
    """
    from .store.label_store import LabelStore
    return LabelStore.open(location)


def replay_loader(store, data, batch_size: int, num_workers: int = 2, **kwargs):
    """The FFCV backend: a loader of the store's crops with their labels (needs ``ffcv``).

    See :func:`refinery_pipeline.loaders.replay.replay_loader` for the parameters; it yields the same
    :class:`CropBatch` es, with the same slot (and ``mix``) per ``(epoch, n)``, as
    :class:`StoreCropDataset` under a ``DataLoader`` with :class:`CropCollate`.

    FFCV reuses its batch buffers: a tensor of a batch is overwritten a few batches later, so
    keep a copy (``batch.images[i].clone()``) of anything kept beyond the step.
    """
    from .loaders.replay import replay_loader as _replay_loader
    return _replay_loader(store, data, batch_size, num_workers, **kwargs)


def beton_path(data, cache_dir=None, *, split: str = "train", store=None,
               max_resolution: int = None, num_workers: int = 2):
    """Where a data set's exact pixel source is: the ``.beton`` every command decodes.

    An ImageFolder tree is converted once into a cache under a hashed name; this converts it if
    needed and returns that file, the one to pass to :class:`BetonImages` (byte-exact crops) or to
    share. A ``.beton`` is returned as it is.

    Parameters
    ----------
    data : str or os.PathLike
        An ImageFolder tree (``DATA/<split>/<class>/*`` or ``DATA/<class>/*``) or a ``.beton``.
    cache_dir : str or os.PathLike, optional
        The conversion cache (``--cache-dir``); default ``$REFINERY_CACHE``, else
        ``~/.cache/refinery``.
    split : {"train", "val"}
        Which split of a tree with ``train/`` and ``val/``.
    store : LabelStore or str, optional
        Convert as this store's labels were made (its recorded ``--max-resolution``), so the
        file is the one it was labelled from.
    max_resolution : int, optional
        Cap each image's longer side (``--max-resolution``); 0 keeps the sizes.
    num_workers : int
        Processes converting the tree.

    Returns
    -------
    pathlib.Path
        The ``.beton`` (its sidecar ``<file>.meta.json`` lists the tree's files in stored order).

    Raises
    ------
    DataSetError
        Not a tree or ``.beton``, an unreadable image, or a ``max_resolution`` other than the
        store's.
    """
    from .sources.dataset import conversion_options
    from .sources.data_cache import SPLITS, open_dataset
    from .core.validators import one_of, optional_whole_number, path_like, whole_number
    path_like("data", data, ".beton or ImageFolder tree")
    if cache_dir is not None:
        path_like("cache_dir", cache_dir, "cache directory")
    one_of("split", split, SPLITS)
    optional_whole_number("max_resolution", max_resolution, 0, "pass a longer-side cap in "
                          "pixels, 0 to keep the sizes, or None")
    whole_number("num_workers", num_workers, 1, "pass 1 or more converting processes")
    from .store.label_store import LabelStore
    source = None
    if store is not None:
        source = (store if isinstance(store, LabelStore) else LabelStore.open(store)).dataset.source
    options = conversion_options(source, max_resolution)
    return open_dataset(data, split, cache_dir, options, num_workers).path


__all__ = [
    "open_store", "LabelStore", "StoreLayout", "CropPlan", "RefineryInfo", "DatasetInfo",
    "Batching", "CropRecords", "FORMAT_VERSION",
    "slot_of", "SLOT_POLICIES", "dense_targets", "REST_POLICIES",
    "visual_category_table", "wordnet_category_table",
    "get_loss", "LOSSES", "kl_divergence", "soft_cross_entropy", "reverse_kl",
    "l2_on_probabilities",
    "CropBatch", "SparseLabels", "NOT_STORED",
    "StoreCropDataset", "CropCollate", "CropSample", "BetonImages", "FolderImages",
    "MappedImages", "replay_loader", "beton_path", "CopyJoin", "check_copy", "CopyReport",
    "StoreCrops",
    "RefineryError", "RefineryWarning", "StoreError", "StoreNotFoundError",
    "StoreMismatchError", "IncompleteStoreError", "StoreCorruptError", "DataSetError",
    "CheckpointError", "ArgumentError", "MissingImagesError",
]
