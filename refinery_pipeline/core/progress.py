"""Progress bars that suit where the output goes.

On a terminal, a live tqdm bar. Written to a file (a batch job's log, ``refine ... 2> log``),
tqdm would add every refresh, ten a second, to the log; there the bar refreshes at most once
every :data:`LOG_REFRESH_SECONDS`, so the log still shows the rate and the ETA. tqdm's own
``TQDM_MININTERVAL`` (or ``TQDM_DISABLE=1``) in the environment still overrides this.
"""
import os
import sys

TERMINAL_REFRESH_SECONDS = 0.1  # tqdm's default
LOG_REFRESH_SECONDS = 30.0


def refresh_seconds() -> float:
    if "TQDM_MININTERVAL" in os.environ:
        return float(os.environ["TQDM_MININTERVAL"])
    return TERMINAL_REFRESH_SECONDS if sys.stderr.isatty() else LOG_REFRESH_SECONDS


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar on stderr, refreshed as often as its destination warrants."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not enabled, mininterval=refresh_seconds(), **kwargs)
