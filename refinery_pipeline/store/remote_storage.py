"""A label store on an object store (S3 and other fsspec URLs): zarr over the bounded client
of :mod:`..core.object_storage`, a packed store under a URL (``https://host/labels.zip``) read
in place, and the markers that stand in for a rename: object stores have none, so two
processes creating one store agree through a create-only marker object beside it, and
processes sharing a precompute claim chunks the same way.
"""
import json
import os
import threading
import time

from ..core.object_storage import env_setting, remote_filesystem


def remote_store(location, read_only: bool = False):
    """A zarr ``FsspecStore`` for the URL ``location`` (see :func:`remote_filesystem`); a
    ``.zip`` there (``refine pack``) is read in place, through fsspec's zip file system over the
    same bounded protocol."""
    from zarr.storage import FsspecStore
    if str(location).endswith(".zip"):
        fs, path = _remote_zip(location), ""
    else:
        fs, path = remote_filesystem(location, asynchronous=True)
    if not fs.async_impl:  # as zarr's own ``FsspecStore.from_url`` does (the zip's is not)
        from zarr.storage._fsspec import _make_async
        fs = _make_async(fs)
    return FsspecStore(fs=fs, path=path, read_only=read_only)


def _remote_zip(location):
    """fsspec's zip file system over the zip at the URL ``location``, opened through
    :func:`remote_filesystem`'s bounded client (opening reads the zip's directory, so a dead
    endpoint is reported here, within the bound)."""
    from fsspec.implementations.zip import ZipFileSystem
    fs, path = remote_filesystem(location)
    return ZipFileSystem(fo=fs.open(path, "rb"))


CREATION_WAIT_SECONDS = 120.0  # how long the loser of a creation race on an object store waits
CREATION_MARKER = ".refinery-creating"  # beside a remote store (not in it) while it is created
# A creator that dies leaves its marker behind; this long after its last renewal anyone may
# take the creation over (a live creator renews it, however long creating takes).
CREATION_MARKER_SECONDS = 60.0
# A chunk claim on an object store (``<store>.locks/<c>``): a writer that dies leaves it behind,
# and this long after its last renewal another may take the chunk.
CLAIM_SECONDS_ENV, DEFAULT_CLAIM_SECONDS = "REFINERY_CLAIM_SECONDS", 120.0


def owner_id() -> str:
    """This process, as a marker names its owner: host, process id and a random part (a process
    id is reused across hosts and restarts)."""
    import socket
    import uuid
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ExpiringMarker:
    """A create-only object (S3's conditional ``If-None-Match`` write) naming its owner and when
    it expires: one process at a time holds it, and a holder that dies (a killed creator, a
    preempted Ray actor) blocks the others only until the expiry, never for good. While held, a
    thread renews the expiry every third of ``seconds``, so the expiry bounds how long a dead
    holder blocks, not how long the work it guards may take.

    Taking over an expired marker deletes it and creates it again, conditionally: of several
    processes that saw it expire, one creates the new marker. (Two may still both believe they
    hold it if one deletes the other's fresh marker in between; what the markers guard is
    written deterministically, so that costs repeated work, never different bytes.) A backend
    without conditional writes lets every claimant through, as it always did.
    """

    def __init__(self, location, suffix: str, seconds: float, owner: str = None):
        self.fs, path = remote_filesystem(location)
        self.path, self.seconds = path.rstrip("/") + suffix, seconds
        self.owner = owner or owner_id()
        self._held = None  # the renewing thread's stop signal while this process holds it
        self._lock = threading.Lock()

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.seconds}).encode()

    def claim(self) -> bool:
        """True if this owner now holds the marker: it was absent, expired, or already ours (an
        owner shared by processes, as the actors of one Ray run share their driver's, takes
        back what a dead member of it held)."""
        for _ in range(2):  # once as it is, once more after removing an expired one
            try:
                self.fs.pipe_file(self.path, self._record(), mode="create")
                self._keep_renewed()
                return True
            except FileExistsError:
                holder = self.holder()
                if holder.get("owner") != self.owner and not self.expired(holder):
                    return False
                self.fs.rm_file(self.path)
            except (TypeError, NotImplementedError, ValueError):
                return True  # no create-only mode here
        return False

    def holder(self) -> dict:
        """The marker's ``{"owner", "expires"}``; ``{}`` when it is absent or unreadable (a
        marker of an older version held a process id only: it never expires on its own, and
        reads as expired)."""
        try:
            record = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"owner": None, "expires": 0.0}
        return record if isinstance(record, dict) else {"owner": None, "expires": 0.0}

    def expired(self, record: dict = None) -> bool:
        record = self.holder() if record is None else record
        return bool(record) and float(record.get("expires", 0.0)) < time.time()

    def exists(self) -> bool:
        return bool(self.holder())

    def _keep_renewed(self):
        self._held = threading.Event()
        threading.Thread(target=self._renew, args=(self._held,), daemon=True).start()

    def _renew(self, stop: threading.Event):
        while not stop.wait(self.seconds / 3):
            with self._lock:
                if stop.is_set():
                    return  # released meanwhile: never write the marker again
                try:
                    self.fs.pipe_file(self.path, self._record())
                except Exception:  # noqa: BLE001 - unrenewed, it expires like a dead holder's
                    return

    def release(self):
        """Stop renewing; remove the marker if this process holds it (never another's that
        took it over)."""
        with self._lock:
            if self._held is not None:
                self._held.set()
        if self.holder().get("owner") == self.owner:
            self.fs.rm_file(self.path)


def creation_marker(location) -> ExpiringMarker:
    """The marker (``<store>.refinery-creating``) that admits one creator of a remote store:
    interleaved writes of ``zarr.json`` by two creators could drop each other's attributes."""
    return ExpiringMarker(location, CREATION_MARKER, CREATION_MARKER_SECONDS)


def claim_seconds() -> float:
    """How long a chunk claim on an object store holds (:data:`CLAIM_SECONDS_ENV`)."""
    return env_setting(CLAIM_SECONDS_ENV, DEFAULT_CLAIM_SECONDS, float, "a number of seconds > 0")


def chunk_marker(location, c: int, owner: str = None) -> ExpiringMarker:
    """The claim on chunk ``c`` of the remote store at ``location`` (``<store>.locks/<c>``),
    for ``owner`` (default: this process alone)."""
    return ExpiringMarker(location, f".locks/{c}", claim_seconds(), owner)
