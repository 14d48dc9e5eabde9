"""Label stores as shared artifacts: reproducible zip packing, full verification, and the record
of a verification that lets training skip re-checking the same bytes."""
import errno
import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import RefineryWarning, StoreCorruptError, StoreError
from ..core.object_storage import is_remote
from .label_store import LabelStore

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same store packs to the same bytes


def pack_store(store_dir, out_zip) -> int:
    """Pack a complete, verified store directory into one zip (stored, sorted keys, fixed
    timestamps). Returns the zip's size in bytes.

    Refuses a store ``refine verify`` fails (naming the first problem) and an output path that
    exists. Written to a temporary name and linked into place, so a crash never leaves a torn
    zip and a file that appears meanwhile is never overwritten. Zarr reads the result in place
    (``refine train --labels X.zip``).
    """
    root, out = Path(store_dir), Path(out_zip)
    store = LabelStore.open(root, check=False)  # verify_store below names every problem
    store.require_complete()
    _refuse_existing(out)
    if out.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"{out}: the zip would be written inside the store it packs; choose a "
                         "path outside it")
    report = verify_store(root)
    if not report.ok:
        raise StoreCorruptError(f"{root}: {report.problems[0]}; not packed (`refine verify "
                                f"{root}` lists all {len(report.problems)} problem(s))")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".partial"))
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            for path in files:
                info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=ZIP_EPOCH)
                info.external_attr = 0o644 << 16
                z.writestr(info, path.read_bytes())
        _link_new(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out.stat().st_size


def _refuse_existing(out: Path):
    if out.exists() or out.is_symlink():
        raise StoreError(f"{out}: already exists; remove it or choose another name")


def _link_new(tmp: Path, out: Path):
    """Give ``tmp`` the name ``out`` only if no file has it (a hard link fails on an existing
    name, where a rename would replace it); file systems without hard links get a rename after
    one more check."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        _refuse_existing(out)
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        _refuse_existing(out)
        os.replace(tmp, out)


@dataclass
class VerifyReport:
    location: str
    chunks: int
    verified: int = 0
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(location, dataset=None) -> VerifyReport:
    """Check every array of a store: the layout against the arrays, the attributes against
    their digest, ``labels`` and ``image_sizes`` against their recorded SHA-256, a zip's entry
    names, every written chunk against its checksums (and the data set's fingerprint).

    Each problem names what is wrong and how to fix it, e.g.
    ``chunk 3: topk_probs (key topk_probs/c/3/0/0) does not match its checksum; ...``.
    """
    store = LabelStore.open(location, check=False)  # to list every problem, not the first
    report = VerifyReport(str(location), store.layout.num_chunks)
    if dataset is not None:
        try:
            store.check_matches(dataset.fingerprint())
        except StoreError as exc:
            report.problems.append(str(exc).split(": ", 1)[1])
    layout = store.layout_problems()
    report.problems += layout
    if layout:  # chunks are located through the layout: reading them would mean nothing
        return report
    report.problems += store.content_problems()
    try:
        done, recorded = store.done_chunks(), store.recorded_checksums()
    except StoreCorruptError as exc:
        report.problems.append(exc.problem)
        return report
    for c in range(store.layout.num_chunks):
        if not done[c]:
            report.problems.append(f"chunk {c}: never written (rerun `refine precompute`)")
            continue
        report.problems += store.chunk_problems(c, recorded=recorded[c])
        report.verified += 1
    return report


# ----------------------------------------------------------------------------- verified stamps
# `refine verify` records, outside the store (whose bytes stay reproducible), a cheap identity
# of the bytes it passed; `refine train --skip-store-check` accepts only a store whose identity
# still matches that record.

def store_identity(location):
    """A cheap identity of a store's bytes as they are now, or None where there is none.

    A directory: every file's relative path, size and ``mtime_ns``; a zip: its size and
    ``mtime_ns``; an object store: every object's key, size and ETag (None when the listing
    gives no ETags, e.g. over HTTP). Hex SHA-256 of those entries.
    """
    if is_remote(location):
        entries = _object_entries(str(location))
        if entries is None:
            return None
    else:
        path = Path(location)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        entries = [(p.relative_to(path).as_posix(), *_size_and_mtime(p)) for p in files]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _size_and_mtime(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _object_entries(url: str):
    import fsspec
    try:
        fs, root = fsspec.core.url_to_fs(url)
        fs.invalidate_cache(root)  # a listing cached earlier in this process may be stale
        found = fs.find(root, detail=True)
    except NotImplementedError:  # e.g. HTTP cannot list
        return None
    entries = [(key[len(root):], info.get("size"), info.get("ETag") or info.get("etag"))
               for key, info in sorted(found.items())]
    return entries if entries and all(e[2] for e in entries) else None


def record_verified(location, identity, cache_dir=None):
    """After a successful verify: record ``identity`` (taken before verifying) for
    ``location`` if the store's bytes still have it. A cache that cannot be written costs only
    the skip, so it warns rather than failing the verification."""
    if identity is None or store_identity(location) != identity:
        return
    stamp = _stamp_path(location, cache_dir)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(stamp.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"location": _resolved(location), "identity": identity}))
        os.replace(tmp, stamp)
    except OSError as exc:
        warnings.warn(f"{stamp.parent}: cannot record the verification ({exc.strerror or exc}); "
                      "`refine train --skip-store-check` will not accept this store",
                      RefineryWarning, stacklevel=2)


def require_verified(location, cache_dir=None):
    """Raise :class:`StoreError` unless ``refine verify`` passed these very bytes."""
    identity = store_identity(location)
    if identity is None:
        raise StoreError(f"{location}: --skip-store-check needs an identity of the store's bytes, "
                         "which this store's server does not list (no ETags); drop the flag")
    try:
        recorded = json.loads(_stamp_path(location, cache_dir).read_text())
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("identity") != identity or recorded.get("location") != _resolved(location):
        raise StoreError(f"{location}: --skip-store-check needs a passing `refine verify "
                         f"{location}` of these very bytes, and none is recorded (or the store "
                         "changed since); run it first, or drop the flag")


def _resolved(location) -> str:
    return str(location) if is_remote(location) else str(Path(location).resolve())


def _stamp_path(location, cache_dir=None) -> Path:
    from ..sources.data_cache import default_cache_dir
    key = hashlib.sha256(_resolved(location).encode()).hexdigest()[:32]
    return Path(cache_dir or default_cache_dir()) / "verified" / f"{key}.json"
