"""One line, not a traceback, for a device torch does not know or this machine lacks, a figure
format matplotlib cannot write, and a WordNet database that is not WordNet's; each names the
option or the user's own path and the fix, and nothing is written for it."""
import shutil
from pathlib import Path

import pytest
import torch

from cli.main import cli
from refinery_pipeline.training import wordnet
from refinery_pipeline.core.devices import resolve_device
from refinery_pipeline.core.errors import ArgumentError
from refinery_pipeline.training.evaluation import evaluate_checkpoint
from refinery_pipeline.paper.plots import figure_formats, figure_path

from .test_cli import assert_one_line_error, run
from .test_plots import write_run
from .test_wordnet import IMAGENETTE, fresh_reader  # noqa: F401 (a fixture)

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

COMMANDS_WITH_DEVICE = sorted(name for name, command in cli.commands.items()
                              if any(p.name == "device" for p in command.params))


def arguments_of(command: str, tmp_path, tiny_data, tiny_refinery_ckpt) -> list:
    """Arguments that would start real work (each command's output under tmp_path)."""
    return {"precompute": [tiny_data, tmp_path / "out", "--weights", tiny_refinery_ckpt],
            "train": [tiny_data, "--out", tmp_path / "out"],
            "evaluate": [tiny_refinery_ckpt, tiny_data],
            "audit": [tmp_path / "out", tiny_data, "--weights", tiny_refinery_ckpt],
            "check-copy": [tmp_path / "out", tiny_data, "--weights", tiny_refinery_ckpt]}[command]


def test_the_commands_with_a_device_option_are_known():
    assert COMMANDS_WITH_DEVICE == ["audit", "check-copy", "evaluate", "precompute", "train"]


@pytest.mark.parametrize("command", COMMANDS_WITH_DEVICE)
@pytest.mark.parametrize("device, fragment", [
    ("banana", "not a torch device"), ("meta", "not a device models run on"),
    ("cuda", "no CUDA device is available here"), ("cuda:99", "cuda")])
def test_a_device_this_machine_cannot_run_is_one_line(command, device, fragment, tmp_path,
                                                     tiny_data, tiny_refinery_ckpt):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("this machine has a GPU")
    result = run(command, *arguments_of(command, tmp_path, tiny_data, tiny_refinery_ckpt),
                 "--device", device, ok=False)
    assert_one_line_error(result, f"--device {device}", fragment, "auto")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("device", ["banana", "meta", "cuda:99"])
def test_the_api_refuses_such_a_device_before_any_data_is_read(device, tiny_refinery_ckpt,
                                                               tmp_path):
    with pytest.raises(ArgumentError, match=f"--device {device}"):
        resolve_device(device)
    with pytest.raises(ArgumentError, match=f"--device {device}"):
        evaluate_checkpoint(tiny_refinery_ckpt, tmp_path / "absent", device=device)


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["plot.xyz", "plot", "plot.PNG.bak"])
def test_a_figure_format_matplotlib_cannot_write_is_one_line(name, tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    out = tmp_path / name
    result = run("plot", run_dir, "--out", out, ok=False)
    assert_one_line_error(result, f"--out {out}", ".png", ".pdf", ".svg")
    assert not out.exists() and not out.with_suffix(out.suffix + ".png").exists()
    assert not list(tmp_path.glob("plot*"))


def test_show_checks_its_figure_before_decoding_images(tiny_data, tmp_path):
    result = run("show", tmp_path / "labels.zarr", tiny_data, "--out", tmp_path / "crops.xyz",
                 ok=False)
    assert_one_line_error(result, "--out", "crops.xyz", ".png")


@pytest.mark.parametrize("kind", figure_formats())
def test_every_format_matplotlib_writes_is_accepted(kind, tmp_path):
    assert figure_path(tmp_path / f"plot.{kind.upper()}") == tmp_path / f"plot.{kind.upper()}"


# ----------------------------------------------------------------------------- WordNet

needs_wordnet = pytest.mark.skipif(not wordnet._is_database(wordnet.DEBIAN_WORDNET),
                                   reason="Debian's WordNet database (wordnet-base) absent")


def a_copy_of_wordnet(root: Path) -> Path:
    """A writable copy of Debian's WordNet dict directory, without lexnames (as Debian's)."""
    copy = root / "dict"
    shutil.copytree(wordnet.DEBIAN_WORDNET, copy)
    for f in copy.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return copy


def random_bytes_database(root: Path) -> Path:
    """Every file a WordNet dict directory holds, filled with random bytes."""
    database = root / "random"
    database.mkdir()
    rng = __import__("numpy").random.default_rng(0)
    for name in wordnet._DATABASE_FILES:
        (database / name).write_bytes(rng.integers(0, 256, 50_000, dtype="uint8").tobytes())
    return database


def short_lines_database(root: Path) -> Path:
    """Index files of two-word lines: nltk's parser runs out of tokens (``StopIteration``)."""
    database = root / "short"
    database.mkdir()
    for name in wordnet._DATABASE_FILES:
        (database / name).write_text("  1 This software and database\nabc n\n" * 20)
    return database


def truncated_database(root: Path) -> Path:
    database = a_copy_of_wordnet(root)
    data = database / "data.noun"
    data.write_bytes(data.read_bytes()[:1_000_000])
    return database


@needs_wordnet
@pytest.mark.parametrize("broken", [random_bytes_database, short_lines_database,
                                    truncated_database])
def test_a_database_that_is_not_wordnets_names_the_users_path(broken, tmp_path, monkeypatch,
                                                              fresh_reader):  # noqa: F811
    database = broken(tmp_path)
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(database))
    with pytest.raises(wordnet.WordNetError) as refused:
        wordnet.class_synsets(IMAGENETTE)
    message = str(refused.value)
    assert message.startswith(f"{database}: ") and "\n" not in message
    assert str(wordnet.cache_root()) not in message  # the user's directory, not the cache copy
    assert "restore it" in message and wordnet.WORDNET_ENV in message


@needs_wordnet
def test_the_cli_reports_a_damaged_database_before_reading_data(tiny_data, tmp_path,
                                                                monkeypatch,
                                                                fresh_reader):  # noqa: F811
    database = random_bytes_database(tmp_path)
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(database))
    out = tmp_path / "run"
    result = run("train", tiny_data, "--label-mode", "category-wordnet", "--out", out, ok=False)
    assert_one_line_error(result, str(database), "not a readable WordNet 3.0 database")
    assert not out.exists()


@needs_wordnet
def test_a_database_missing_files_names_them(tmp_path, monkeypatch, fresh_reader):  # noqa: F811
    database = a_copy_of_wordnet(tmp_path)
    (database / "data.adj").unlink()
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(database))
    with pytest.raises(wordnet.WordNetError, match=f"{database}: .*incomplete .*no data.adj"):
        wordnet.wordnet_reader()


@needs_wordnet
def test_a_database_repaired_in_place_is_read_again(tmp_path, monkeypatch,
                                                    fresh_reader):  # noqa: F811
    """The prepared copy is named by the source files' sizes and times: restoring the source
    makes a new copy rather than reading the broken one again."""
    database = truncated_database(tmp_path)
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(database))
    with pytest.raises(wordnet.WordNetError, match="truncated"):
        wordnet.class_synsets(IMAGENETTE)
    shutil.copy(wordnet.DEBIAN_WORDNET / "data.noun", database / "data.noun")
    wordnet.wordnet_reader.cache_clear()
    assert len(wordnet.class_synsets(IMAGENETTE)) == len(IMAGENETTE)


@needs_wordnet
def test_a_class_wordnet_lacks_is_still_the_classs_fault(fresh_reader):  # noqa: F811
    with pytest.raises(Exception, match="is no noun of WordNet 3.0") as refused:
        wordnet.class_synsets([IMAGENETTE[0], "n99999999"])
    assert not isinstance(refused.value, wordnet.WordNetError)
