"""Progress bars refresh live on a terminal and sparingly in a log file."""
import io
import sys
import time

from refinery_pipeline.core.progress import progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def refreshes(monkeypatch, stderr, items=40, seconds_each=0.01) -> int:
    """How many times a bar over ``items`` steps redraws itself, with stderr being ``stderr``."""
    monkeypatch.setattr(sys, "stderr", stderr)
    out = io.StringIO()
    for _ in progress_bar(range(items), file=out, desc="work"):
        time.sleep(seconds_each)
    return out.getvalue().count("\r")


def test_a_log_file_gets_the_start_and_the_end_only(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert refreshes(monkeypatch, io.StringIO()) <= 3
    assert refreshes(monkeypatch, FakeTerminal()) >= 4  # 0.4 s at tqdm's 0.1 s refresh


def test_tqdm_mininterval_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    assert refreshes(monkeypatch, io.StringIO()) >= 20
