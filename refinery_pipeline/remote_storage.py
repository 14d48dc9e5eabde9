"""Object stores (S3 and other fsspec URLs): bounded timeouts and retries, and one creator.

A dead endpoint must be reported in one line within seconds, not after botocore's defaults
(about 6 minutes of silence); and object stores have no rename, so two processes creating one
store agree through a create-only marker object beside it.
"""
import os


def is_remote(location) -> bool:
    """An fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ...) rather than a local path."""
    return "://" in str(location)


# Object stores: how long one request may take and how often it is tried (botocore's attempts,
# and s3fs's own retries around them, each up to this count). A dead endpoint is then reported
# within about a minute, not after botocore's defaults (~6 minutes of silence); the environment
# overrides both, e.g. for a slow link.
TIMEOUT_ENV, ATTEMPTS_ENV = "REFINERY_STORAGE_TIMEOUT", "REFINERY_STORAGE_ATTEMPTS"
DEFAULT_TIMEOUT_SECONDS, DEFAULT_ATTEMPTS = 10.0, 2


def unreachable_message(location, exc) -> str:
    """One line for an object store that does not answer (within the bounded timeouts)."""
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    return (f"{location}: the storage endpoint does not answer ({reason}); check the connection "
            f"and the endpoint URL (AWS_ENDPOINT_URL for S3), or raise {TIMEOUT_ENV} (seconds, "
            f"default {DEFAULT_TIMEOUT_SECONDS:.0f}) for a slow link, then rerun")


def _bounded(fs, attempts: int):
    if hasattr(fs, "retries"):
        fs.retries = attempts  # s3fs's own loop around botocore's (not a constructor option)
    return fs


def remote_filesystem(location, **options) -> tuple:
    """``(fsspec filesystem, attempts)`` for the URL ``location`` with bounded timeouts and
    retries (S3: botocore's ``config_kwargs``, which s3fs passes on)."""
    import fsspec
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_SECONDS))
    attempts = max(1, int(os.environ.get(ATTEMPTS_ENV, DEFAULT_ATTEMPTS)))
    if str(location).startswith(("s3://", "s3a://")):
        options["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout,
                                    "retries": {"max_attempts": attempts, "mode": "standard"}}
    fs, path = fsspec.core.url_to_fs(str(location), **options)
    return _bounded(fs, attempts), path


def remote_store(location, read_only: bool = False):
    """A zarr ``FsspecStore`` for the URL ``location`` (see :func:`remote_filesystem`)."""
    from zarr.storage import FsspecStore
    fs, path = remote_filesystem(location, asynchronous=True)
    if not fs.async_impl:  # as zarr's own ``FsspecStore.from_url`` does
        from zarr.storage._fsspec import _make_async
        fs = _make_async(fs)
    return FsspecStore(fs=fs, path=path, read_only=read_only)


CREATION_WAIT_SECONDS = 120.0  # how long the loser of a creation race on an object store waits
CREATION_MARKER = ".refinery-creating"  # beside a remote store (not in it) while it is created


def claim_creation(location) -> bool:
    """Create the creation marker only if absent (S3's conditional ``If-None-Match`` write):
    True for the one process that may create the store. Interleaved writes of ``zarr.json``
    by two creators could drop each other's attributes; the marker admits one. A backend
    without conditional writes raises something else and is let through (the old race)."""
    fs, path = remote_filesystem(location)
    try:
        fs.pipe_file(path.rstrip("/") + CREATION_MARKER, str(os.getpid()).encode(), mode="create")
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError, ValueError):
        pass  # no create-only mode here
    return True


def release_creation(location):
    fs, path = remote_filesystem(location)
    fs.rm_file(path.rstrip("/") + CREATION_MARKER)
