"""Named errors whose messages say what is wrong *and* how to fix it.

The CLI turns any :class:`RefineryError` into a one-line message and exit code 2, so users never
see a traceback for bad input. Library code raises the most specific child it can.
"""


class RefineryError(Exception):
    """Base class: a problem with the user's input that they can fix."""


class RefineryWarning(UserWarning):
    """Input that works but probably not as meant; the CLI prints it as one ``warning:`` line."""


class DataSetError(RefineryError):
    """The image data set (ImageFolder tree or .beton) cannot be used as given."""


class StoreError(RefineryError):
    """A label store is missing, malformed, or of an unsupported format version."""


class StoreNotFoundError(StoreError):
    """Nothing is stored at the given path or URL."""


class StoreMismatchError(StoreError):
    """A label store does not belong to this data set, plan or refinery."""


class IncompleteStoreError(StoreError):
    """A label store has chunks that were never written."""


class CheckpointError(RefineryError):
    """A model checkpoint cannot be loaded for the requested use."""


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
