"""Named errors whose messages say what is wrong *and* how to fix it.

The CLI turns any :class:`RefineryError`, and any storage failure (:func:`storage_error_message`),
into a one-line message and exit code 2, so users never see a traceback for bad input. Library
code raises the most specific child it can.
"""
import errno
from pathlib import Path


class RefineryError(Exception):
    """Base class: a problem with the user's input that they can fix."""


class RefineryWarning(UserWarning):
    """Input that works but probably not as meant; the CLI prints it as one ``warning:`` line."""


class DataSetError(RefineryError):
    """The image data set (ImageFolder tree or .beton) cannot be used as given."""


class MissingImagesError(DataSetError):
    """A copy of a store's data set lacks images the store labels (or holds them unusably:
    reframed, or every replayable crop needs a missing partner); refused unless the caller
    allows missing images (``allow_missing=True``, ``--allow-missing``), which skips them."""


class StoreError(RefineryError):
    """A label store is missing, malformed, or of an unsupported format version."""


class StoreNotFoundError(StoreError):
    """Nothing is stored at the given path or URL."""


class StoreMismatchError(StoreError):
    """A label store does not belong to this data set, plan or refinery."""


class IncompleteStoreError(StoreError):
    """A label store has chunks that were never written."""


class StoreCorruptError(StoreError):
    """A label store's bytes no longer match what was written (checksums, digests, shapes)."""


class ArgumentError(RefineryError, ValueError):
    """A public API argument of the wrong kind or out of range; the message names the argument
    and the fix. A ``ValueError`` too, so callers that caught the built-in error still do."""


class CheckpointError(RefineryError):
    """A model checkpoint cannot be loaded for the requested use."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that would run code to load (a pickled object beyond tensors and plain
    data), refused unless the user says they trust whoever made the file."""


class RunError(RefineryError):
    """A training run's --out directory holds another run, or --resume does not match its run."""


def first_line(exc: BaseException, limit: int = None, typed: bool = False) -> str:
    """What ``exc`` says, in one line for a one-line error: the first non-blank line of its
    message (a library's message may go on for paragraphs of advice or a traceback), stripped;
    the exception's type name where the message is empty.

    Parameters
    ----------
    exc : BaseException
        The exception caught.
    limit : int, optional
        Keep at most this many characters of the line (a parser's message may quote a whole line
        of a damaged file).
    typed : bool
        Put the type name before the line, ``KeyError: 'model'``, where the type says what the
        line alone does not (a parser's ``ValueError``, a damaged array's ``KeyError``).

    Returns
    -------
    str
        The line, never empty.
    """
    name = type(exc).__name__
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    line = line[:limit].rstrip()  # a cut may end in a space
    if not line:
        return name
    return f"{name}: {line}" if typed else line


def storage_io_errors() -> tuple:
    """Exception types meaning "the storage failed" (disk full, network down), not a bug.

    Object-store clients raise their own types for network failures (botocore's
    ``EndpointConnectionError`` is no ``OSError``), so they are listed when installed.
    """
    errors = [OSError]
    try:
        from botocore.exceptions import BotoCoreError
        errors.append(BotoCoreError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError
        errors.append(ClientError)
    except ImportError:
        pass
    return tuple(errors)


def _errno_fixes() -> dict:
    """What to do about a storage failure, by ``errno`` (names missing on this OS are left out:
    ``EDQUOT`` is POSIX only)."""
    unwritable = "choose a writable location or fix its permissions"
    full = ("free space there (or choose another location) and rerun the same command: finished "
            "work is kept")
    fixes = {"EACCES": unwritable, "EPERM": unwritable, "EROFS": unwritable,
             "ENOSPC": full, "EDQUOT": full, "EFBIG": full,
             "ENOENT": "check the path: a directory on it is missing (create it, or choose "
                       "another location)",
             "ENOTDIR": "a part of the path is a file, not a directory: choose another location",
             "EISDIR": "it is a directory: give a file path",
             "ENAMETOOLONG": "choose a shorter path"}
    return {getattr(errno, name): fix for name, fix in fixes.items() if hasattr(errno, name)}


ERRNO_FIXES = _errno_fixes()
WRITE_ONLY_ERRNOS = frozenset(("ENOSPC", "EDQUOT", "EFBIG", "EROFS"))
NETWORK_FIX = "check the connection and the URL, then rerun the same command: finished work is kept"
GENERIC_FIX = "check the path and rerun"


def storage_error_message(exc: BaseException, location=None) -> str:
    """The one-line form of a storage failure: ``<path>: <what failed>; <the fix>``.

    The single place that turns an OS or object-store error into words, so every command says
    the same about a read-only, full or missing location.

    Parameters
    ----------
    exc : BaseException
        One of :func:`storage_io_errors`.
    location : str, optional
        What the command was reading or writing; named when the error carries no file name
        (a full disk, a dropped connection).

    Returns
    -------
    str
        The message, without the ``error:`` prefix.
    """
    number = getattr(exc, "errno", None)
    reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror
              else first_line(exc))
    if isinstance(exc, OSError):
        fix = ERRNO_FIXES.get(number, GENERIC_FIX)
    else:  # an object-store client's own error: the network, not the path
        fix = NETWORK_FIX
    filename = getattr(exc, "filename", None)
    if filename is not None:
        return f"{_shown_path(filename, location)}: {reason}; {fix}"
    write_only = errno.errorcode.get(number) in WRITE_ONLY_ERRNOS
    what = f"{'writing' if write_only else 'reading or writing'} failed ({reason})"
    return f"{location}: {what}; {fix}" if location is not None else f"{what}; {fix}"


def _shown_path(filename, location) -> str:
    """The user's own path in place of the temporary sibling it is written through
    (``out.zip.1234.tmp`` and ``.labels.zarr.creating-1234`` are reported as the user's path)."""
    if location is not None:
        file, target = Path(str(filename)), Path(str(location))
        if (file.parent == target.parent
                and file.name.lstrip(".").startswith(target.name.lstrip(".") + ".")):
            return str(location)
    return str(filename)
