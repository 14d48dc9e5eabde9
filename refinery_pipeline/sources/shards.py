"""WebDataset tar shards, local or remote (``s3://``, ``http(s)://``), read by offset.

Each shard is indexed once from its tar headers (member names, offsets, sizes; the small ``cls``
members read on the way) and the index cached under the cache folder, keyed by the shard's path,
size and modification stamp; afterwards any item is one read of its image member's bytes
(``os.pread`` locally, an HTTP range request remotely). Samples follow WebDataset's conventions
(``webdataset.tariterators``): a member's key is its name up to the first dot of its base name,
consecutive members with one key form a sample, ``__*__`` members are skipped.
"""
import hashlib
import json
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..core.errors import ArgumentError, DataSetError, storage_error_message, storage_io_errors
from ..core.object_storage import is_remote, remote_filesystem, unreachable_message
from .base import ImageSource, as_labels
from .data_cache import default_cache_dir
from .dataset import IMAGE_EXTENSIONS

# WebDataset's own rules (tariterators.base_plus_ext, tar_file_iterator's skip_meta); a test
# compares them with the installed webdataset.
KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
SKIPPED_MEMBER = re.compile(r"__[^/]*__($|/)")
IMAGE_MEMBERS = tuple(dict.fromkeys(("jpg", "jpeg", "png", "webp",
                                     *(e[1:] for e in IMAGE_EXTENSIONS))))
LABEL_MEMBER = "cls"
COMPRESSED = (".gz", ".tgz", ".bz2", ".xz", ".zst")
INDEX_VERSION = 1  # bump when the cached index's layout changes
OPEN_SHARDS = 64  # local shards kept open per process


class WebDatasetSource(ImageSource):
    """WebDataset shards: local paths, brace patterns (``shards-{000..009}.tar``), a folder of
    ``.tar`` files, or ``s3://`` / ``http(s)://`` URLs (through fsspec, with the bounded
    timeouts of :mod:`refinery_pipeline.core.object_storage`).

    The key of a sample is its ``__key__``; its image is the first of the members ``jpg``,
    ``jpeg``, ``png``, ``webp``, ... it has (or ``image_ext``); its label the integer in its
    ``cls`` member, where every sample has one (named by ``classes``).
    """

    kind = "webdataset"
    key_rule = "WebDataset __key__ (member name up to the first dot of its base name)"

    def __init__(self, shards, image_ext=None, classes=None, cache_dir=None):
        single = isinstance(shards, (str, os.PathLike))
        self.spec = _absolute(shards) if single else [_absolute(s) for s in shards]
        self.shards = expand_shards(self.spec)
        self.image_exts = _image_exts(image_ext)
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        location = (self.spec if single or len(self.shards) == 1
                    else f"{self.shards[0]} (+{len(self.shards) - 1} shards)")
        samples = [_resolved(self.shards[s], _shard_index(self.shards[s], cache), self.image_exts)
                   for s in range(len(self.shards))]
        self.shard_of = np.concatenate([np.full(len(k), s, np.int32)
                                        for s, (k, _, _, _) in enumerate(samples)])
        self.first_of_shard = np.cumsum([0] + [len(k) for k, _, _, _ in samples[:-1]])
        self.offsets = np.concatenate([o for _, o, _, _ in samples])
        self.sizes = np.concatenate([n for _, _, n, _ in samples])
        self._labels = _labels([c for _, _, _, c in samples], classes, str(location))
        self._files, self._fs = OrderedDict(), None
        super().__init__(location, (k for keys, _, _, _ in samples for k in keys), classes)

    def __getstate__(self):
        return dict(self.__dict__, _files=OrderedDict(), _fs=None)  # opened again per process

    def labels(self):
        return self._labels

    def describe(self, i: int) -> str:
        shard = self.shard_of[i]
        return f"{self.shards[shard]} sample {i - self.first_of_shard[shard]}"

    def encoded(self, i: int) -> bytes:
        shard = self.shards[self.shard_of[i]]
        start, size = int(self.offsets[i]), int(self.sizes[i])
        try:
            if is_remote(shard):
                return self._filesystem().cat_file(shard, start=start, end=start + size)
            return os.pread(self._open(int(self.shard_of[i])), size, start)
        except storage_io_errors() as exc:
            raise DataSetError(_read_error(shard, exc)) from None

    def iter_encoded(self, indices=None):
        """Remote shards are read as streams, one open file per run of items from one shard
        (ascending indices read each shard front to back); local ones item by item."""
        order = range(len(self)) if indices is None else indices
        if not any(is_remote(s) for s in self.shards):
            yield from super().iter_encoded(order)
            return
        current, stream = None, None
        try:
            for i in order:
                i = int(i)
                if self.shard_of[i] != current:
                    if stream is not None:
                        stream.close()
                    current = self.shard_of[i]
                    stream = self._filesystem().open(self.shards[current], "rb")
                stream.seek(int(self.offsets[i]))
                yield stream.read(int(self.sizes[i]))
        except storage_io_errors() as exc:
            raise DataSetError(_read_error(self.shards[current], exc)) from None
        finally:
            if stream is not None:
                stream.close()

    def _record_details(self) -> dict:
        return {"shards": self.spec, "num_shards": len(self.shards)}

    def stamp(self) -> list:
        """Each shard's path, size and modification time (ETag remotely)."""
        return [_stamp(shard) for shard in self.shards]

    def _open(self, shard: int) -> int:
        """A descriptor of local shard ``shard``, from a small per-process cache."""
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= OPEN_SHARDS:
            os.close(self._files.popitem(last=False)[1])
        self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._files[shard]

    def _filesystem(self):
        """fsspec's filesystem, made in this process: one inherited through ``fork`` holds
        its parent's event loop and connections, which do not work in the child."""
        if self._fs is None or self._fs[1] != os.getpid():
            self._fs = (remote_filesystem(self.shards[0])[0], os.getpid())
        return self._fs[0]


def expand_shards(spec) -> list:
    """Shard paths or URLs from a brace pattern, a folder of ``.tar`` files, or a list of
    either; local shards must exist and be uncompressed tar files."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    shards = []
    for item in map(str, items):
        if not is_remote(item) and Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not found:
                raise DataSetError(f"{item}: holds no .tar shards; pass a folder of WebDataset "
                                   "shards or a brace pattern such as shards-{000..009}.tar")
            shards += found
        else:
            shards += _braces(item)
    if not shards:
        raise DataSetError(f"{spec}: names no shards; pass shard paths or a brace pattern")
    if len({is_remote(s) for s in shards}) > 1:
        raise DataSetError(f"{spec}: mixes local shards and URLs; pass one or the other (copy "
                           "the local shards up, or the remote ones down)")
    for shard in shards:
        if shard.lower().endswith(COMPRESSED):
            raise DataSetError(f"{shard}: a compressed shard cannot be read by offset; "
                               "decompress the shards (e.g. gunzip) and pass the .tar files")
        if not is_remote(shard) and not Path(shard).is_file():
            raise DataSetError(f"{shard}: no such shard; check the path or brace pattern")
    return shards


def _absolute(shard) -> str:
    """A local shard (or pattern) as an absolute path, a URL as it is."""
    return str(shard) if is_remote(shard) else str(Path(shard).absolute())


def _braces(pattern: str) -> list:
    if "{" not in pattern:
        return [pattern]
    try:
        from braceexpand import braceexpand  # installed with webdataset
    except ImportError:
        raise DataSetError(f"{pattern}: brace patterns need the webdataset extra; pip install "
                           "'refinery[webdataset]', or list the shards") from None
    return list(braceexpand(pattern))


def _image_exts(image_ext) -> tuple:
    if image_ext is None:
        return IMAGE_MEMBERS
    exts = (image_ext,) if isinstance(image_ext, str) else tuple(image_ext)
    if not exts or not all(isinstance(e, str) and e for e in exts):
        raise ArgumentError(f"image_ext={image_ext!r}: name the image member's extension, e.g. "
                            "'jpg' or ('jpg', 'png')")
    return tuple(e.lower().lstrip(".") for e in exts)


# ---------------------------------------------------------------------------------- the index

def _shard_index(shard: str, cache: Path) -> dict:
    """The members of ``shard`` (cached): per sample its key and ``cls`` text, per member its
    sample, extension, data offset and size."""
    stamp = _stamp(shard)
    path = cache / "webdataset-index" / (hashlib.sha256(
        json.dumps([INDEX_VERSION, shard, stamp]).encode()).hexdigest()[:24] + ".npz")
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                return {name: cached[name] for name in cached.files}
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt
    index = _scan(shard)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **index)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the shard is scanned again next time
    return index


def _stamp(shard: str) -> list:
    """What changes when a shard is rewritten: size and modification time (ETag remotely)."""
    try:
        if not is_remote(shard):
            st = os.stat(shard)
            return [str(Path(shard).resolve()), st.st_size, st.st_mtime_ns]
        fs, path = remote_filesystem(shard)
        info = fs.info(path)
        changed = next((str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime")
                        if info.get(k)), None)
        return [shard, info.get("size"), changed]
    except storage_io_errors() as exc:
        raise DataSetError(_read_error(shard, exc)) from None


def _scan(shard: str) -> dict:
    """Read ``shard``'s tar headers front to back (a remote shard as one stream)."""
    keys, labels, member_sample, exts, offsets, sizes = [], [], [], [], [], []
    try:
        with _open_stream(shard) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for info in tar:
                match = KEY_AND_EXTENSION.match(info.name)
                if not info.isreg() or SKIPPED_MEMBER.match(info.name) or not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not keys or keys[-1] != key:
                    keys.append(key)
                    labels.append("")
                if ext == LABEL_MEMBER:
                    labels[-1] = tar.extractfile(info).read().decode("utf-8", "replace").strip()
                member_sample.append(len(keys) - 1)
                exts.append(ext)
                offsets.append(info.offset_data)
                sizes.append(info.size)
                tar.members = []  # a shard of 10,000 samples need not keep its headers
    except tarfile.TarError as exc:
        raise DataSetError(f"{shard}: not a readable tar file ({exc}); pass WebDataset .tar "
                           "shards") from None
    except storage_io_errors() as exc:
        raise DataSetError(_read_error(shard, exc)) from None
    if not keys:
        raise DataSetError(f"{shard}: an empty shard (no samples); remove it from the shard "
                           "list or write it again")
    return {"keys": np.asarray(keys, dtype=str), "labels": np.asarray(labels, dtype=str),
            "member_sample": np.asarray(member_sample, np.int64),
            "exts": np.asarray(exts, dtype=str), "offsets": np.asarray(offsets, np.int64),
            "sizes": np.asarray(sizes, np.int64)}


def _open_stream(shard: str):
    if not is_remote(shard):
        return open(shard, "rb")
    fs, path = remote_filesystem(shard)
    return fs.open(path, "rb")


def _resolved(shard: str, index: dict, image_exts: tuple) -> tuple:
    """``(keys, offsets, sizes, cls texts)`` of each sample's image member."""
    keys = index["keys"]
    offsets, sizes = np.full(len(keys), -1, np.int64), np.zeros(len(keys), np.int64)
    for ext in reversed(image_exts):  # the first extension in the list wins
        members = np.flatnonzero(index["exts"] == ext)
        samples = index["member_sample"][members]
        offsets[samples], sizes[samples] = index["offsets"][members], index["sizes"][members]
    lacking = np.flatnonzero(offsets < 0)
    if len(lacking) == len(keys):
        found = ", ".join(sorted(set(index["exts"].tolist())))
        raise DataSetError(f"{shard}: holds no images (members: {found}); pass shards with "
                           f"image members, or name the image member with image_ext=")
    if len(lacking):
        members = index["exts"][index["member_sample"] == lacking[0]].tolist()
        raise DataSetError(f"{shard}: {len(lacking)} samples have no image member, e.g. "
                           f"{str(keys[lacking[0]])!r} (members: {', '.join(members)}); remove "
                           "them or name the image member with image_ext=")
    return keys.tolist(), offsets, sizes, index["labels"]


def _labels(texts_per_shard, classes, location: str):
    """Labels from the ``cls`` members: None where no sample has one."""
    texts = np.concatenate(texts_per_shard)
    present = texts != ""
    if not present.any():
        return None
    if not present.all():
        raise DataSetError(f"{location}: {int((~present).sum())} samples lack the {LABEL_MEMBER} "
                           f"member others have; give every sample its label, or none")
    try:
        values = [int(t) for t in texts.tolist()]
    except ValueError:
        bad = next(t for t in texts.tolist() if not t.lstrip("-").isdigit())
        raise DataSetError(f"{location}: a {LABEL_MEMBER} member holds {bad!r}, not a class "
                           "number; write class numbers there") from None
    return as_labels(values, classes, location)


def _read_error(shard: str, exc) -> str:
    """One line for a failed read: a shard that is not there, access refused, or (remotely)
    an endpoint that does not answer within the bounded timeouts."""
    if isinstance(exc, FileNotFoundError):
        return f"{shard}: no such shard; check the path, URL or brace pattern"
    if is_remote(shard) and not isinstance(exc, PermissionError):
        return unreachable_message(shard, exc)
    return storage_error_message(exc, shard)
