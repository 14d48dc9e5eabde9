"""How a label store's values become bytes, and the digests that vouch for them (format spec:
``docs/label-store.md``).

* Codecs (:func:`_codecs`): Blosc/zstd with the shuffle that suits each array, using only codecs
  from the Zarr v3 spec, so any Zarr v3 reader can open a store (measured in
  ``benchmarks/results/label_bytes_cpu.md``).
* Digests: each chunk's arrays are hashed as *decoded* values (:func:`chunk_checksums`), so a
  checksum stays valid across codec versions; the arrays written whole at creation and the
  creation-time attributes are sealed by SHA-256 (:func:`seal_attributes`), so an edit of any
  of them is told from the store's own bytes.
* Image keys and digests (format 5) as fixed-width uint8 arrays (:func:`encode_keys`).

numpy and hashlib only; zarr is imported where a codec or a stored group is needed.
"""
import hashlib
import json

import numpy as np

from ..core.errors import StoreError
from .schema import (ATTRIBUTES_DIGEST, IMAGE_DIGESTS, SEALED_ARRAYS, UNSEALED_ATTRIBUTES,
                     CropRecords, StoreLayout)


def _codecs(name: str) -> dict:
    from zarr.codecs import BloscCodec, TransposeCodec
    blosc = lambda shuffle: BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)
    if name == "boxes":  # (N, K, 4): put each coordinate's values side by side before shuffling
        return {"filters": [TransposeCodec(order=(2, 0, 1))], "compressors": [blosc("shuffle")]}
    if name == "flips":  # one bit of information per byte
        return {"compressors": [blosc("bitshuffle")]}
    if name == IMAGE_DIGESTS:  # SHA-256 values: incompressible by design
        return {"compressors": None}
    # Class indices too (format 3; bitshuffle before): byte shuffle keeps each index's low byte
    # whole, so the classes an image's crops share repeat as bytes for zstd to match: at top-10
    # of 200 classes 7.4 bytes per crop instead of 10.0; transposing slots or ranks side by side,
    # and higher levels (write speed /3 and more), were measured and gave less
    # (benchmarks/results/label_bytes_cpu.md).
    return {"compressors": [blosc("shuffle")]}


def chunk_checksums(layout: StoreLayout, arrays) -> np.ndarray:
    """SHA-256 of each array's *decoded* values in a chunk, ``(arrays, 32)`` uint8.

    Hashing values rather than compressed bytes keeps checksums valid across codec versions.
    """
    if isinstance(arrays, CropRecords):
        arrays = arrays.arrays()
    return np.stack([array_checksum(name, dtype, arrays[name])
                     for name, (_, dtype) in layout.shapes().items()])


def array_checksum(name: str, dtype, values) -> np.ndarray:
    """SHA-256 of one array's decoded values in one chunk, ``(32,)`` uint8: the text
    ``"{name}|{dtype.str}|{shape}|"``, then the values' C-order bytes (``docs/label-store.md``)."""
    values = np.ascontiguousarray(values, dtype=dtype)
    h = hashlib.sha256(f"{name}|{values.dtype.str}|{values.shape}|".encode())
    h.update(memoryview(values.reshape(-1)).cast("B"))  # hashed in place, no copy
    return np.frombuffer(h.digest(), np.uint8)


def values_sha256(values: np.ndarray) -> str:
    """Hex SHA-256 of an array's C-order bytes (as ``dataset.labels_sha256`` is computed)."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def attributes_digest(attrs: dict) -> str:
    """Hex SHA-256 of the creation-time attributes: the UTF-8 of their JSON with sorted keys,
    ``(",", ":")`` separators and ASCII escapes, leaving out :data:`UNSEALED_ATTRIBUTES`.

    The chunks' checksums do not cover the attributes; this does, so an edited temperature,
    seed or layout is told from the store's own bytes.
    """
    sealed = {key: value for key, value in attrs.items() if key not in UNSEALED_ATTRIBUTES}
    text = json.dumps(sealed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_attributes(group) -> dict:
    """The digests a new store records once every array exists: ``image_sizes_sha256`` over
    the stored sizes, then ``attributes_sha256`` over all attributes, that one included. Both
    are computed from the store as written (its ``zarr.json`` read back), not from what was
    meant to be written."""
    import zarr
    stored = zarr.open_group(group.store, path=group.path, mode="r", zarr_format=3)
    sealed = {attribute: values_sha256(stored[name][:])
              for name, attribute in SEALED_ARRAYS.items() if name in stored}
    return {**sealed, ATTRIBUTES_DIGEST: attributes_digest({**stored.attrs, **sealed})}


def encode_keys(location, keys, num_images: int) -> np.ndarray:
    """``keys`` as the ``image_keys`` array: ``(N, L)`` uint8, each key's UTF-8 zero-padded to
    the longest (``L``). Keys are normalized (:func:`.keys.normalize_key`) and must be unique:
    a store joins copies by them."""
    from ..sources.keys import normalize_keys
    keys = normalize_keys(list(keys))
    if len(keys) != num_images:
        raise StoreError(f"{location}: {len(keys)} image keys for {num_images} images; give one "
                         "key per image")
    seen, repeated = set(), []
    for key in keys:
        if key in seen:
            repeated.append(key)
        seen.add(key)
    if repeated:
        raise StoreError(f"{location}: {len(repeated)} image keys appear twice (e.g. "
                         f"{repeated[0]!r}); give every image its own name")
    encoded = [key.encode("utf-8") for key in keys]
    table = np.zeros((num_images, max(1, max(map(len, encoded), default=1))), np.uint8)
    for row, key in zip(table, encoded):
        row[:len(key)] = np.frombuffer(key, np.uint8)
    return table


def decode_keys(table: np.ndarray) -> list:
    """The keys of an ``image_keys`` array: each row's bytes up to its first NUL, as UTF-8."""
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in np.asarray(table, np.uint8)]


def _checked_digests(location, digests, num_images: int) -> np.ndarray:
    values = np.ascontiguousarray(digests, dtype=np.uint8)
    if values.shape != (num_images, 32):
        raise StoreError(f"{location}: image digests of shape {values.shape}, not "
                         f"({num_images}, 32); give one SHA-256 per image")
    return values
