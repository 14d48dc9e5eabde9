"""Claim: remote stores cost training only a short start-up, since arrays are read once.

Writes a synthetic store of realistic size (N images, K crops, top-5; labels drawn like a
confident refinery's), uploads it to an S3-compatible server on 127.0.0.1 (moto), and times
`LabelStore.read()`-equivalent whole-array reads from: the local directory, S3 through zarr's
FsspecStore (s3fs), and S3 through zarr's ObjectStore (obstore), interleaved over rounds.

  python benchmarks/store_read.py --images 100000 -K 10 --rounds 3 --tag store_read_cpu
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import markdown_table, write_results

from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import CROP_ARRAYS, StoreLayout
from refinery_pipeline.labelling.precompute import software_versions


def make_store(path: Path, images: int, K: int, chunk: int):
    layout = StoreLayout(images, K, 5, chunk)
    store = LabelStore.create(path, layout, {"plan": {}, "refinery": {}, "dataset": {},
                                             "batching": {}})
    rng = np.random.default_rng(0)
    for c in range(layout.num_chunks):
        n = len(layout.chunk_range(c))
        probs = np.sort(rng.dirichlet(np.full(100, 0.05), (n, K))[..., :5], axis=-1)[..., ::-1]
        store.write_chunk(c, {"boxes": rng.integers(0, 300, (n, K, 4)).astype(np.uint16),
                              "flips": rng.integers(0, 2, (n, K)).astype(np.uint8),
                              "topk_indices": rng.integers(0, 1000, (n, K, 5)).astype(np.uint16),
                              "topk_probs": probs.astype(np.float16)})
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def upload(local: Path, bucket: str, prefix: str):
    import boto3
    s3 = boto3.client("s3")
    for p in local.rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")


def read_all(group) -> float:
    start = time.perf_counter()
    for name in CROP_ARRAYS:
        group[name][:]
    group["chunk_done"][:]
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=100000)
    p.add_argument("-K", type=int, default=10)
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tag", default="store_read")
    args = p.parse_args()
    import zarr
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    import boto3
    boto3.client("s3").create_bucket(Bucket="bench")
    local = Path(tempfile.mkdtemp()) / "s.zarr"
    size = make_store(local, args.images, args.K, args.chunk_size)
    upload(local, "bench", "s.zarr")
    zarr.config.set({"async.concurrency": 64})
    openers = {
        "local directory": lambda: zarr.open_group(str(local), mode="r"),
        "S3, FsspecStore (s3fs)": lambda: zarr.open_group("s3://bench/s.zarr", mode="r"),
    }
    try:
        from obstore.store import S3Store
        openers["S3, ObjectStore (obstore)"] = lambda: zarr.open_group(
            zarr.storage.ObjectStore(S3Store("bench", prefix="s.zarr", endpoint=endpoint,
                                             region="us-east-1", access_key_id="test",
                                             secret_access_key="test",
                                             client_options={"allow_http": True}),
                                     read_only=True), mode="r")
    except ImportError:
        pass
    times = {name: [] for name in openers}
    for _ in range(args.rounds):
        for name, opener in openers.items():
            start = time.perf_counter()
            group = opener()
            read_all(group)
            times[name].append(time.perf_counter() - start)
    server.stop()
    local_time = statistics.median(times["local directory"])
    rows = [{"source": n, "median_seconds": statistics.median(t), "all": t,
             "relative_to_local": statistics.median(t) / local_time} for n, t in times.items()]
    result = {"args": vars(args), "store_bytes": size, "software": software_versions(),
              "rows": rows}
    lines = [f"# Reading a whole label store: `{args.tag}`", "",
             f"{args.images:,} images × K={args.K} × top-5 ({args.images * args.K:,} crops, "
             f"{size / 1e6:.1f} MB on disk, chunks of {args.chunk_size} images); moto S3 server on "
             f"127.0.0.1, zarr async concurrency 64; median of {args.rounds} interleaved rounds.",
             ""]
    lines += markdown_table(["source", "open + read all arrays (s)", "relative to local"],
                            [[r["source"], f"{r['median_seconds']:.2f}",
                              f"{r['relative_to_local']:.1f}×"] for r in rows])
    write_results(args.tag, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
