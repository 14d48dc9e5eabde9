"""Bad input ends in one line: click's usage errors, RefineryError and storage failures as one
``error:`` line (exit code 2), our warnings as one ``warning:`` line, never a traceback."""
import contextlib
import functools
import sys
import warnings

import click

from refinery_pipeline.core.errors import (RefineryError, RefineryWarning, storage_error_message,
                                           storage_io_errors)


def _one_line_warnings():
    """Our warnings read like our errors: ``warning: <message>``, no source line.

    Installed once per process: every ``cli()`` call runs this (in-process callers, the tests
    among them, make many), and wrapping our own wrapper again would stack a layer per call."""
    default = warnings.formatwarning
    if getattr(default, "refinery_one_line", False):
        return

    def format_warning(message, category, *args, **kwargs):
        if issubclass(category, RefineryWarning):
            return f"warning: {message}\n"
        return default(message, category, *args, **kwargs)
    format_warning.refinery_one_line = True
    warnings.formatwarning = format_warning


def _usage_error_line(exc: click.UsageError) -> str:
    """Any usage error (bad value, unknown option, missing argument) as one line: what is wrong,
    then the fix, or where to read the options."""
    message = exc.format_message().rstrip(".")
    command = exc.ctx.command_path if exc.ctx is not None else "refine"
    fix = getattr(exc, "fix", None) or f"see '{command} --help'"
    return f"error: {message}; {fix}"


class OneLineUsageErrors(click.Group):
    """click prints a usage error as a usage block and an ``Error:`` line; ours are one
    ``error:`` line (exit code 2), as for every other bad input."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


class _OneLineUsageError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(self.message, err=True)


@contextlib.contextmanager
def _one_line_usage_errors():
    """Re-raise click's usage errors as one-line ones; help requests (no arguments) pass."""
    try:
        yield
    except click.UsageError as exc:
        if isinstance(exc, _help_requests()):
            raise
        raise _OneLineUsageError(_usage_error_line(exc)) from None


def _help_requests() -> tuple:
    """``refine`` with no command prints the help (click >= 8.2 raises it as a usage error)."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", None)
    return (no_args,) if no_args else ()


def friendly_errors(about: str = None):
    """Turn RefineryError and storage failures into ``error: <message>`` and exit code 2, with no
    traceback.

    ``about`` names the command's parameter holding the location (a store, an output) that a
    storage error without a file name of its own (a full disk, a dropped connection) concerns.
    """
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except RefineryError as exc:
                _fail(str(exc))
            except storage_io_errors() as exc:  # read-only, full, missing, network down
                _fail(storage_error_message(exc, kwargs.get(about) if about else None))
        return wrapper
    return decorate


def _fail(message: str):
    click.echo(f"error: {message}", err=True)
    sys.exit(2)
