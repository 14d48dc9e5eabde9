"""``refine precompute --engine ray``: the store's chunks labelled by a pool of Ray actors.

The driver (the ``refine`` process) creates or reopens the store exactly as the local engine
does, then hands each unfinished chunk to an actor. Each actor loads the refinery (or ensemble)
once, with the data set's loader, and labels whole chunks with :class:`.precompute.
ChunkLabeller`, the local engine's own code, so the store is byte-identical to a local or
torchrun precompute of the same plan. An actor writes its chunk itself (data, checksums, then
the done flag) to the store, a local path, a shared file system or an object store, under the
same chunk claims as the local engine's processes (:class:`.precompute.ChunkClaims`), so two
drivers on one store never write a chunk twice.

Faults: an actor process that dies is restarted by Ray and its chunk retried there (up to
``max_retries`` times each); an actor that stays lost leaves the pool and its chunk goes to
another. An error raised by the labelling or the write (a store that cannot be written, a
corrupt image) is not retried: it stops the run with its own message. A killed driver takes its
actors with it; rerunning the command finishes the chunks not yet flagged done.

Elastic: the pool asks for ``actors`` actors; each starts labelling as soon as Ray places it, so
actors waiting for resources (an autoscaling cluster adding nodes) join the run when they come
up, and actors lost with their node leave it.
"""
import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional

from ..core.errors import ArgumentError, RefineryError, RefineryWarning
from ..core.progress import progress_bar
from ..store.label_store import LabelStore
from ..store.schema import DEFAULT_PROB_BITS, DEFAULT_TOP_K
from ..store.remote_storage import owner_id
from .chunk_labeller import ChunkLabeller
from .precompute import (ChunkClaims, PrecomputeSummary, check_labelled, check_options,
                         open_or_create_store)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs.

    Attributes
    ----------
    address : str or None
        An existing cluster (``ray://host:10001``, ``host:6379`` or ``auto``); None starts a
        local one for this run.
    actors : int
        Pool size: how many actors label at once.
    gpus_per_actor, cpus_per_actor : float
        Ray resources each actor reserves (a GPU per actor labels on that GPU; CPUs also set
        its decoding threads).
    max_retries : int
        Restarts of a dead actor, and retries of its chunk, before the chunk goes to another
        actor; a chunk is given up (the run fails) after that many actors lost it.
    """

    address: Optional[str] = None
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    max_retries: int = 3

    def check(self):
        """Refuse a pool that cannot run, before anything is created."""
        for name, value, least in (("--ray-actors", self.actors, 1),
                                   ("--ray-cpus-per-actor", self.cpus_per_actor, 0),
                                   ("--ray-gpus-per-actor", self.gpus_per_actor, 0),
                                   ("max_retries", self.max_retries, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
                raise ArgumentError(f"{name} must be a number >= {least} (got {value!r}); "
                                    f"pass one")


class ChunkActor:
    """One member of the pool: the refinery and the loader, loaded once (with its first chunk);
    whole chunks labelled and written on request.

    What it loads travels with each request as a reference (``setup``, a one-item list, so Ray
    passes the reference, not the object): an actor Ray restarts after a crash starts empty and
    loads again from the request it retries.
    """

    def __init__(self):
        self.store = None

    def ready(self) -> int:
        return os.getpid()

    def label(self, c: int, setup: list) -> int:
        """Label and write chunk ``c``; the crops labelled (0: another process holds it or
        finished it)."""
        if self.store is None:
            import ray
            self._load(**ray.get(setup[0]))
        if not self.claims.claim_unfinished(c, self.store):
            return 0
        try:
            self.store.write_chunk(c, self.label_chunk(c))
        finally:
            self.claims.release(c)
        return len(self.store.layout.chunk_range(c)) * self.store.layout.crops_per_image

    def _load(self, data, location, refinery, plan, chunks, num_workers: int, owner: str):
        import ray
        import torch

        from ..sources.dataset import ImageDataset
        dataset = ImageDataset(data)  # the .beton at the driver's path (a shared file system)
        if ray.get_gpu_ids() and torch.cuda.is_available():
            refinery = refinery.to("cuda")  # Ray set CUDA_VISIBLE_DEVICES to this actor's GPU
        elif refinery.device.type != "cpu":
            refinery = refinery.to("cpu")
        store = LabelStore.open(location, mode="r+")
        self.claims = ChunkClaims(location, owner)  # the driver's run: one chunk per actor
        self.label_chunk = ChunkLabeller(dataset, store.layout, store.batching, refinery, plan,
                                         chunks, num_workers)
        self.store = store  # last: loaded


def precompute_on_ray(dataset, location, refinery, plan, top_k: int = DEFAULT_TOP_K,
                      crop_batch: int = 512, chunk_size: int = None, num_workers: int = 2,
                      progress: bool = True, soft_static: bool = False, only_chunks=None,
                      prob_bits: int = DEFAULT_PROB_BITS,
                      ray_options: RayOptions = RayOptions()) -> PrecomputeSummary:
    """:func:`.precompute.precompute` on a pool of Ray actors (see the module docstring); the
    same arguments and store, plus ``ray_options``."""
    ray_options.check()
    check_options(location, plan, top_k, crop_batch, chunk_size)  # before anything is created
    check_labelled(dataset)
    top_k = min(top_k, len(dataset.classes))
    started = time.perf_counter()
    with ray_session(ray_options):  # a pool the cluster cannot hold is refused before writing
        store = open_or_create_store(location, dataset, refinery, plan, top_k, crop_batch,
                                     chunk_size, soft_static, prob_bits)
        done = store.done_chunks()
        wanted = range(store.layout.num_chunks) if only_chunks is None else only_chunks
        todo = [c for c in wanted if not done[c]]
        summary = PrecomputeSummary(chunks_skipped=int(done.sum()))
        if todo:
            ChunkPool(dataset, store, refinery, plan, todo, num_workers, ray_options,
                      progress, summary).run()
    summary.seconds = time.perf_counter() - started
    store = LabelStore.open(location, mode="r+")  # flags the actors wrote
    store.finalize()
    summary.store_bytes = store.nbytes_on_disk()
    total = store.layout.num_images * store.layout.crops_per_image
    summary.bytes_per_crop = summary.store_bytes / total if summary.store_bytes else 0.0
    return summary


@contextlib.contextmanager
def ray_session(options: RayOptions):
    """Connect to ``options.address`` (or start a local cluster) unless this process already
    is connected, and disconnect on leaving only what it connected."""
    import ray
    owned = not ray.is_initialized()
    if owned:
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)  # no INFO lines around the progress bar
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise RefineryError(f"--ray-address {options.address or '(a local cluster)'}: "
                                f"cannot connect to Ray ({_last_line(str(exc))}); start the "
                                "cluster (`ray start --head`) or fix the address") from None
    try:
        _check_fits(options, local=options.address is None)
        yield
    finally:
        if owned:
            ray.shutdown()


def _check_fits(options: RayOptions, local: bool):
    """An actor larger than a local cluster would wait for ever: refused in one line. On an
    existing cluster nodes may yet join (an autoscaler): a warning says the pool waits."""
    import ray
    resources = ray.cluster_resources()
    for name, want, option in (("CPU", options.cpus_per_actor, "--ray-cpus-per-actor"),
                               ("GPU", options.gpus_per_actor, "--ray-gpus-per-actor")):
        if want > resources.get(name, 0):
            message = (f"{option} {want:g}: the Ray cluster has {resources.get(name, 0):g} "
                       f"{name}s in all")
            if local:
                raise RefineryError(f"{message}; ask for fewer per actor or give "
                                    "--ray-address of a cluster that has them")
            warnings.warn(f"{message}; the actors wait until nodes that have them join",
                          RefineryWarning)


# How often a chunk that another process holds is offered again, until it is done (by them) or
# their claim lapses (a holder that died): the run ends with every chunk done.
RECLAIM_SECONDS = 5.0


class ChunkPool:
    """The driver's side: start the actors, give each a chunk as it becomes free, count and
    show progress; re-queue the chunks of actors lost for good, and offer again, later, those
    another process holds."""

    def __init__(self, dataset, store, refinery, plan, chunks, num_workers, options: RayOptions,
                 progress: bool, summary: PrecomputeSummary):
        import ray
        self.options, self.summary, self.store = options, summary, store
        self.queue, self.later, self.chunks_done = list(chunks), [], 0  # later: (when, chunk)
        self.losses = {c: 0 for c in chunks}  # how many actors lost each chunk for good
        lay = store.layout
        self.crops_of = {c: len(lay.chunk_range(c)) * lay.crops_per_image for c in chunks}
        remote = ray.remote(num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor,
                            max_restarts=options.max_retries,
                            max_task_retries=options.max_retries)(ChunkActor)
        # owner: a restarted actor takes back the claims of the one it replaces
        self.setup = [ray.put({"data": str(dataset.path), "location": str(store.location),
                               "refinery": refinery, "plan": plan, "chunks": list(chunks),
                               "num_workers": num_workers, "owner": owner_id()})]
        self.actors = [remote.remote() for _ in range(min(options.actors, len(chunks)))]
        self.bar = progress_bar(total=sum(self.crops_of.values()), enabled=progress,
                                unit="crop", unit_scale=True, smoothing=0.05,
                                desc=f"labelling crops ({len(chunks)} chunks, Ray)")

    def run(self):
        import ray
        pending = {a.ready.remote(): (a, None) for a in self.actors}  # future -> (actor, chunk)
        idle, started = [], time.perf_counter()
        try:
            # until every chunk is done: actors still waiting for resources are not waited for
            while self.queue or self.later or any(c is not None for _, c in pending.values()):
                self._dispatch(idle, pending)
                if not pending:  # every live actor is idle: chunks held elsewhere remain
                    if not idle:
                        raise RefineryError(f"every Ray actor was lost with "
                                            f"{len(self.queue) + len(self.later)} chunks left; "
                                            "see the actors' logs, then rerun to finish the "
                                            "store")
                    time.sleep(max(0.0, min(when for when, _ in self.later) - time.monotonic()))
                    continue
                ready, _ = ray.wait(list(pending), num_returns=1,
                                    timeout=RECLAIM_SECONDS if self.later else None)
                for future in ready:
                    self._collect(future, pending.pop(future), idle, started)
        finally:
            self.bar.close()
            for actor in self.actors:
                ray.kill(actor)

    def _dispatch(self, idle: list, pending: dict):
        """Chunks due again join the queue; idle actors take the queue's first chunks."""
        now = time.monotonic()
        self.queue += [c for when, c in self.later if when <= now]
        self.later = [(when, c) for when, c in self.later if when > now]
        while self.queue and idle:
            actor, c = idle.pop(), self.queue.pop(0)
            pending[actor.label.remote(c, self.setup)] = (actor, c)

    def _collect(self, future, work: tuple, idle: list, started: float):
        """One answer: an actor ready, a chunk labelled or held elsewhere, or an actor lost."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        actor, chunk = work
        try:
            crops = ray.get(future)
        except RayTaskError as exc:  # the labelling or the write failed: not retried
            raise _cause(exc) from None
        except RayActorError:  # lost for good (restarts spent, node gone): re-queue its chunk
            self.actors.remove(actor)
            self._lost(chunk)
            return
        idle.append(actor)
        if chunk is None:
            return
        if not crops and not self.store.chunk_done(chunk):  # held elsewhere, not done yet
            self.later.append((time.monotonic() + RECLAIM_SECONDS, chunk))
            return
        self._finished(chunk, crops, started)

    def _finished(self, c: int, crops: int, started: float):
        if crops:
            self.summary.crops += crops
            self.summary.chunks_written += 1
            if not self.summary.warmup_crops:  # the first chunk carries every actor's start-up
                self.summary.warmup_crops = crops
                self.summary.warmup_seconds = time.perf_counter() - started
        else:  # another process wrote it
            self.summary.chunks_claimed_elsewhere += 1
            self.bar.total -= self.crops_of[c]
        self.chunks_done += 1
        self.bar.set_postfix_str(f"{self.chunks_done}/{len(self.crops_of)} chunks", refresh=False)
        self.bar.update(crops)

    def _lost(self, c):
        """An actor is gone for good; its chunk (if it had one) goes back to the queue."""
        if c is None:
            return  # it never started: the others carry on
        self.losses[c] += 1
        if self.losses[c] > self.options.max_retries:
            raise RefineryError(f"chunk {c}: {self.losses[c]} Ray actors died labelling it; see "
                                "the actors' logs (out of memory?), then rerun to finish the "
                                "store")
        self.queue.insert(0, c)


def _cause(exc) -> BaseException:
    """The exception an actor raised, as itself (a RefineryError or an OSError keeps its one-line
    message), not Ray's wrapper with the remote traceback."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else RefineryError(_last_line(str(exc)))


def _last_line(text: str) -> str:
    """A remote traceback's last line: the exception and its message."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
