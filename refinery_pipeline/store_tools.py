"""Label stores as shared artifacts: reproducible zip packing and full verification."""
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import StoreError
from .label_store import LabelStore, chunk_checksums

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same store packs to the same bytes


def pack_store(store_dir, out_zip) -> int:
    """Pack a complete store directory into one zip (stored, sorted keys, fixed timestamps).

    Written to a temporary name and renamed, so a crash never leaves a torn zip. Zarr reads the
    result in place (``refine train --labels X.zip``). Returns the zip's size in bytes.
    """
    root, out = Path(store_dir), Path(out_zip)
    store = LabelStore.open(root)
    store.require_complete()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".partial"))
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            z.writestr(info, path.read_bytes())
    os.replace(tmp, out)
    return out.stat().st_size


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
    """Check every chunk against its recorded checksums (and the data set's fingerprint).

    Each problem names the chunk, the array and the chunk's key, e.g.
    ``chunk 3: topk_probs (key topk_probs/c/3/0/0) does not match its checksum``.
    """
    store = LabelStore.open(location)
    lay = store.layout
    report = VerifyReport(str(location), lay.num_chunks)
    if dataset is not None:
        try:
            store.check_matches(dataset.fingerprint())
        except StoreError as exc:
            report.problems.append(str(exc).split(": ", 1)[1])
    done = store.done_chunks()
    recorded = store.recorded_checksums()
    for c in range(lay.num_chunks):
        if not done[c]:
            report.problems.append(f"chunk {c}: never written (rerun `refine precompute`)")
            continue
        report.problems += _check_chunk(store, c, recorded[c])
        report.verified += 1
    return report


def _check_chunk(store: LabelStore, c: int, recorded: np.ndarray) -> list:
    lay = store.layout
    arrays, problems = {}, []
    for name in lay.array_names:
        key = store.chunk_key(name, c)
        try:
            arrays[name] = store.read_chunk(name, c)
        except Exception as exc:
            problems.append(f"chunk {c}: {name} (key {key}) cannot be decoded "
                            f"({type(exc).__name__}); recompute it or restore the file")
    if problems:
        return problems
    actual = chunk_checksums(lay, arrays)
    for i, name in enumerate(lay.array_names):
        if not np.array_equal(actual[i], recorded[i]):
            problems.append(f"chunk {c}: {name} (key {store.chunk_key(name, c)}) does not "
                            "match its checksum; recompute it or restore the file")
    return problems
