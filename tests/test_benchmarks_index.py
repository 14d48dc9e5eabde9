"""benchmarks/README.md indexes every claim: each script in a group, each results file under
the script (or command) that made it, and the index as generated (issue 28, item 2)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load_index():
    spec = importlib.util.spec_from_file_location("benchmarks_index", BENCHMARKS / "index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_index_is_current_and_complete():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "index.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_results_file_is_linked_from_the_index():
    text = (BENCHMARKS / "README.md").read_text()
    for path in (BENCHMARKS / "results").iterdir():
        assert f"(results/{path.name})" in text, path.name


def test_an_unindexed_script_or_result_is_found(tmp_path, monkeypatch):
    index = load_index()
    (tmp_path / "results").mkdir()
    (tmp_path / "new_claim.py").write_text('"""Claim: something new."""\n')
    (tmp_path / "results" / "orphan.md").write_text("a table\n")
    monkeypatch.setattr(index, "HERE", tmp_path)
    monkeypatch.setattr(index, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(index, "GROUPS", {"Speed": []})
    _, _, problems = index.collect()
    assert any("new_claim.py: in no group" in p for p in problems)
    assert any("results/orphan: names no script" in p for p in problems)
