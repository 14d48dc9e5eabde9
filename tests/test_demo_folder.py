"""`refine demo` owns its --out folder: a rerun starts over, any other folder is left alone."""
import pytest

from refinery_pipeline.paper.demo import _start_over
from refinery_pipeline.core.errors import RunError


def test_a_previous_demo_is_replaced(tmp_path):
    (tmp_path / "refinery").mkdir()
    (tmp_path / "refinery" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (tmp_path / "demo_result.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    _start_over(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the demo's files


def test_another_folder_is_refused_untouched(tmp_path):
    (tmp_path / "refinery").mkdir()
    (tmp_path / "refinery" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(RunError, match="not a previous demo's folder"):
        _start_over(tmp_path)
    assert (tmp_path / "refinery" / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
