"""Object stores (S3 and other fsspec URLs): bounded timeouts and retries for every client.

A dead endpoint must be reported in one line within seconds, not after the clients' defaults
(botocore: about 6 minutes of silence; aiohttp, under fsspec's HTTP: 5 minutes per request).
Every protocol whose client takes a timeout gets the same bound, from the same environment
variables (:data:`BOUNDED_PROTOCOLS`). Both the label store and the image sources (shards at a
URL) reach object stores through here, so it sits in ``core`` below both.
"""
import math
import os

from .errors import ArgumentError, first_line


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
    timeout = env_setting(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS, float, "a number of seconds > 0")
    attempts = env_setting(ATTEMPTS_ENV, DEFAULT_ATTEMPTS, int, "a whole number >= 1")
    return timeout, attempts


def env_setting(name: str, default, kind, wanted: str):
    """The positive, finite ``kind`` in environment variable ``name`` (``default`` when unset);
    anything else is refused in one line naming the variable and what it takes."""
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
    reason = first_line(exc)
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
