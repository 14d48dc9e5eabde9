"""Creating a label store, and the claim that lets several processes create one at once.

:class:`StoreCreation` is the part of :class:`.label_store.LabelStore` that makes a store: a
local store is built under a temporary name and renamed into place (a kill mid-creation leaves
nothing half-made); an object store, which has no rename, is created by the one process holding
the creation marker (:func:`.remote_storage.creation_marker`) while the others wait for it to be
sealed. The last creation step writes the attribute digest (:func:`.encoding.seal_attributes`),
so a store without it is not yet a store.
"""
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..core.errors import StoreError, StoreNotFoundError
from ..core.object_storage import is_remote, remote_filesystem
from .encoding import _checked_digests, _codecs, encode_keys, seal_attributes
from .remote_storage import (CREATION_MARKER_SECONDS, CREATION_WAIT_SECONDS, creation_marker,
                             remote_store)
from .schema import (ATTRIBUTES_DIGEST, CHECKSUMS, DONE_FLAGS, FORMAT_NAME, FORMAT_VERSION,
                     IMAGE_DIGESTS, IMAGE_KEYS, IMAGE_SIZES, LABELS, StoreLayout, _check_layout)

if TYPE_CHECKING:
    from .label_store import LabelStore


class StoreCreation:
    """How a store comes to exist: :meth:`create`, and :meth:`open_to_extend` for a rerun.

    A mixin of :class:`.label_store.LabelStore`, which supplies :meth:`open`.
    """

    @classmethod
    def create(cls, location, layout: StoreLayout, attrs: dict, labels=None,
               image_sizes=None, keys=None, digests=None) -> "LabelStore":
        """Create an empty store; ``attrs`` carries plan, refinery, data set and versions.

        ``labels`` (the data set's ground truth) is written whole at creation, so a store alone
        can report how often the refinery agrees with the image labels; so are ``image_sizes``
        ``(N, 2)`` (height, width as stored), the frame the boxes are drawn in, so a reader of
        the original files can tell when their sizes differ; and, format 5, each image's
        ``keys`` (normalized names, :mod:`.keys`) and ``digests`` ``(N, 32)`` (SHA-256 of the
        encoded bytes its pixels were decoded from), so a copy of the data set in another order
        or form is joined by name and each image told exact or approximate. A local store is built
        under a temporary name and renamed into place, so a kill mid-creation leaves no
        half-made store behind, and any error removes the temporary directory.

        Several processes may create one store at once: the loser of the race gets the
        winner's store (locally, once renamed into place; on an object store, which has no
        rename, once the winner has finished creating it). The caller checks that store was made
        for its run, as it checks one it resumes.
        """
        _check_layout(location, layout)
        keys = None if keys is None else encode_keys(location, keys, layout.num_images)
        digests = None if digests is None else _checked_digests(location, digests,
                                                                layout.num_images)
        if is_remote(location):  # object stores have no rename: objects appear whole or not
            return cls._create_remote(location, layout, attrs, labels, image_sizes, keys,
                                      digests)
        location = Path(location)
        building = location.with_name(f".{location.name}.creating-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        try:
            cls._create_at(building, layout, attrs, labels, image_sizes, keys, digests)
            os.rename(building, location)
        except BaseException as exc:
            shutil.rmtree(building, ignore_errors=True)
            if not (isinstance(exc, OSError) and location.exists()):
                raise  # else another process created it first: use theirs
        return cls.open(location, mode="r+")

    @classmethod
    def _create_remote(cls, location, *contents) -> "LabelStore":
        """Create the store at the URL ``location``, or join the one another process creates.

        One creator at a time holds the creation marker, which names its owner and expires
        (:func:`.remote_storage.creation_marker`); the others wait for the store to be sealed
        (its attribute digest, the last creation step, written). A creator that died leaves its
        marker until it expires and whatever objects it had written: the next holder clears
        those remains and creates the store afresh, so no state ever needs deleting by hand.
        """
        marker = creation_marker(location)
        wait = CREATION_MARKER_SECONDS + CREATION_WAIT_SECONDS
        deadline = time.monotonic() + wait
        while True:
            store = cls._sealed(location)
            if store is not None:
                return store
            if marker.claim():
                try:
                    if cls._sealed(location) is None:  # none finished since we looked
                        cls._clear_creation_remains(location)
                        cls._create_at(location, *contents)
                finally:
                    marker.release()
                return cls.open(location, mode="r+")
            if time.monotonic() > deadline:
                raise StoreError(f"{location}: another process began creating a store here and "
                                 f"has not finished after {wait:.0f} s; rerun when it has, or "
                                 "write to another location")
            time.sleep(0.2)

    @classmethod
    def open_to_extend(cls, location) -> Optional["LabelStore"]:
        """The store at ``location`` opened to write chunks (``mode="r+"``), or None where there
        is none to extend yet: nothing there, or, on an object store, a creation not sealed
        (begun elsewhere, or left by a creator that died): :meth:`create` then waits for it, or
        takes it over."""
        try:
            store = cls.open(location, mode="r+")
        except StoreNotFoundError:
            return None
        except StoreError:
            if is_remote(location) and creation_marker(location).exists():
                return None
            raise
        if is_remote(location) and ATTRIBUTES_DIGEST not in store.attrs:
            return None
        return store

    @classmethod
    def _sealed(cls, location) -> Optional["LabelStore"]:
        """The store at ``location`` once its creation has finished, else None."""
        try:
            store = cls.open(location, mode="r+")
        except StoreError:
            return None  # not yet a whole store
        return store if ATTRIBUTES_DIGEST in store.attrs else None

    @classmethod
    def _clear_creation_remains(cls, location):
        """Remove what a creator that died left at the URL ``location``: a group without
        attributes yet, or a label store never sealed. Anything else there (another program's
        data) is left alone and refused."""
        fs, path = remote_filesystem(location)
        root = path.rstrip("/")
        try:
            attributes = json.loads(fs.cat_file(f"{root}/zarr.json")).get("attributes", {})
        except FileNotFoundError:
            attributes = {}
        if attributes.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise StoreError(f"{location}: holds other data than a label store; choose another "
                             "location")
        if fs.exists(root):
            fs.rm(root, recursive=True)
            fs.invalidate_cache()

    @classmethod
    def _create_at(cls, location, layout: StoreLayout, attrs: dict, labels=None,
                   image_sizes=None, keys=None, digests=None):
        import zarr  # loaded by the first store made or opened, not by importing the package
        target = remote_store(location) if is_remote(location) else str(location)
        group = zarr.open_group(target, mode="w-", zarr_format=3)
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
        for name, values in ((IMAGE_KEYS, keys), (IMAGE_DIGESTS, digests)):
            if values is not None:
                width = values.shape[1]
                group.create_array(name, shape=values.shape, dtype="uint8", fill_value=0,
                                   chunks=(chunk, width), **_codecs(name))[:] = values
        group.create_array(CHECKSUMS, shape=(layout.num_chunks, len(layout.array_names), 32),
                           dtype="uint8", chunks=(1, len(layout.array_names), 32), fill_value=0,
                           compressors=None)
        group.create_array(DONE_FLAGS, shape=(layout.num_chunks,), dtype="uint8", chunks=(1,),
                           fill_value=0, compressors=None)
        group.attrs.update(seal_attributes(group))  # last: the digests cover all of the above
