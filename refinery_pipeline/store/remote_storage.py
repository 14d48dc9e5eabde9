"""Object stores (S3 and other fsspec URLs): bounded timeouts and retries, and one creator.

A dead endpoint must be reported in one line within seconds, not after the clients' defaults
(botocore: about 6 minutes of silence; aiohttp, under fsspec's HTTP: 5 minutes per request);
and object stores have no rename, so two processes creating one store agree through a
create-only marker object beside it.

Every protocol whose client takes a timeout gets the same bound, from the same environment
variables (:data:`BOUNDED_PROTOCOLS`); a packed store under a URL (``https://host/labels.zip``)
is read in place through fsspec's zip file system over that protocol.
"""
import json
import math
import os
import threading
import time

from ..core.errors import ArgumentError


def is_remote(location) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ...) rather than a local path."""
    return "://" in str(location)


# Object stores: how long one request may take and how often it is tried (botocore's attempts,
# and s3fs's own retries around them, each up to this count). A dead endpoint is then reported
# within about a minute, not after botocore's defaults (~6 minutes of silence); the environment
# overrides both, e.g. for a slow link.
TIMEOUT_ENV, ATTEMPTS_ENV = "REFINERY_STORAGE_TIMEOUT", "REFINERY_STORAGE_ATTEMPTS"
DEFAULT_TIMEOUT_SECONDS, DEFAULT_ATTEMPTS = 10.0, 2


def storage_limits() -> tuple:
    """``(seconds per request, attempts)`` from :data:`TIMEOUT_ENV` and :data:`ATTEMPTS_ENV`.

    Raises
    ------
    ArgumentError
        A variable that is not a positive number (a timeout of ``abc``, ``0`` or ``inf`` would
        otherwise fail inside a client, or never time out).
    """
    timeout = _setting(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS, float, "a number of seconds > 0")
    attempts = _setting(ATTEMPTS_ENV, DEFAULT_ATTEMPTS, int, "a whole number >= 1")
    return timeout, attempts


def _setting(name: str, default, kind, wanted: str):
    text = os.environ.get(name)
    if text in (None, ""):
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise ArgumentError(f"${name}={text}: not {wanted}; set it to {wanted} (default "
                            f"{default:g}) or unset it")
    return value


def unreachable_message(location, exc) -> str:
    """One line for an object store that does not answer (within the bounded timeouts)."""
    reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
    if isinstance(exc, TimeoutError):  # aiohttp's and the socket's say little more than this
        reason = f"no answer within {storage_limits()[0]:g} s: {reason}"
    endpoint = ("the endpoint URL (AWS_ENDPOINT_URL for S3)" if _protocol(location) in S3
                else "the URL")
    return (f"{location}: the storage endpoint does not answer ({reason}); check the connection "
            f"and {endpoint}, or raise {TIMEOUT_ENV} (seconds, default "
            f"{DEFAULT_TIMEOUT_SECONDS:.0f}) for a slow link, then rerun")


def network_failure(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s chain that says the endpoint did not answer (a timeout, a refused
    or dropped connection), or None. fsspec's HTTP reports any failure to reach a file as
    ``FileNotFoundError`` raised *from* the real error, so a silent server would otherwise read
    as a missing store."""
    try:
        from aiohttp import ClientConnectionError
    except ImportError:
        ClientConnectionError = ConnectionError
    for _ in range(16):  # the chain of causes, bounded against cycles
        if exc is None:
            return None
        if isinstance(exc, (TimeoutError, ConnectionError, ClientConnectionError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


S3, HTTP, GCS = ("s3", "s3a"), ("http", "https"), ("gs", "gcs")
# The protocols whose clients are given the bound; others run with their own defaults.
BOUNDED_PROTOCOLS = S3 + HTTP + GCS + ("ftp", "sftp", "ssh")


def _protocol(location) -> str:
    text = str(location)
    return text.split("://", 1)[0].lower() if "://" in text else "file"


def bounded_options(protocol: str, timeout: float, attempts: int) -> dict:
    """fsspec options that bound each request of ``protocol`` to ``timeout`` seconds (and, where
    the client retries by itself, to ``attempts`` tries): S3 through botocore's
    ``config_kwargs``; HTTP(S) and GCS through aiohttp's ``ClientTimeout`` (connecting, and
    each wait for bytes, so a large file that keeps arriving is not cut off); FTP and SFTP
    through their socket timeouts. Empty for other protocols."""
    if protocol in S3:
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                  "retries": {"max_attempts": attempts, "mode": "standard"}}}
    if protocol in HTTP + GCS:
        import aiohttp
        bound = aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout,
                                      sock_read=timeout)
        # gcsfs passes its own per-request timeout (None: none at all) over the session's
        return {"client_kwargs": {"timeout": bound}} if protocol in HTTP else {
            "session_kwargs": {"timeout": bound}, "requests_timeout": bound}
    if protocol == "ftp":
        return {"timeout": timeout}
    if protocol in ("sftp", "ssh"):  # paramiko's connect: TCP, the SSH banner, authentication
        return {"timeout": timeout, "banner_timeout": timeout, "auth_timeout": timeout}
    return {}


def _bounded(fs, attempts: int):
    if hasattr(fs, "retries"):
        fs.retries = attempts  # s3fs's own loop around botocore's (not a constructor option)
    return fs


def remote_filesystem(location, **options) -> tuple:
    """``(fsspec filesystem, path)`` for the URL ``location`` with bounded timeouts and retries
    (:func:`bounded_options`, from :data:`TIMEOUT_ENV` and :data:`ATTEMPTS_ENV`)."""
    import fsspec
    timeout, attempts = storage_limits()
    options = {**bounded_options(_protocol(location), timeout, attempts), **options}
    fs, path = fsspec.core.url_to_fs(str(location), **options)
    return _bounded(fs, attempts), path


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
    return _setting(CLAIM_SECONDS_ENV, DEFAULT_CLAIM_SECONDS, float, "a number of seconds > 0")


def chunk_marker(location, c: int, owner: str = None) -> ExpiringMarker:
    """The claim on chunk ``c`` of the remote store at ``location`` (``<store>.locks/<c>``),
    for ``owner`` (default: this process alone)."""
    return ExpiringMarker(location, f".locks/{c}", claim_seconds(), owner)
