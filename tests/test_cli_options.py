"""Every option of every command: typed and bounded, documented, and failing in one line.

Bad numbers are refused by the option types before a command runs, so nothing is created for
them; storage failures (read-only, not a directory, full, network down) are reported in one line
naming the path and the fix.
"""
import errno
import math
import os
import re
import tempfile
from pathlib import Path

import click
from click.testing import Result
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.main import cli
from cli.options import FACTOR, POSITIVE, SMOOTHING, Count, Number
from refinery_pipeline.core.errors import storage_error_message
from refinery_pipeline.store.label_store import LabelStore

from .test_cli import assert_one_line_error, make_tree, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

OPTIONS = [(name, command, param) for name, command in sorted(cli.commands.items())
           for param in command.params if isinstance(param, click.Option)]
NUMERIC = [(name, command, param) for name, command, param in OPTIONS
           if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))]
EXAMPLES = settings(max_examples=15, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def option_id(entry) -> str:
    return f"{entry[0]} {entry[2].opts[0]}"


def files_under(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("entry", OPTIONS, ids=option_id)
def test_every_option_has_help_that_shows_its_default_once(entry):
    name, command, option = entry
    assert option.help, f"refine {name} {option.opts[0]} has no help text"
    assert "[default" not in option.help and "(default" not in option.help, (
        "a default belongs in show_default, or click prints it a second time")
    with click.Context(command, info_name=name, show_default=True) as ctx:
        rendered = option.get_help_record(ctx)[1]
    assert len(re.findall(r"\bdefault\b", rendered)) <= 1, rendered


@pytest.mark.parametrize("entry", NUMERIC, ids=option_id)
def test_every_numeric_option_is_bounded(entry):
    """A plain int or float option lets 0, -3 or nan reach the library (a traceback, a store
    made before failing, a silent default); every one takes a bounded type instead."""
    name, _, option = entry
    assert isinstance(option.type, (Count, Number)), f"refine {name} {option.opts[0]}"


def outside(kind) -> list:
    """Values just outside a bounded type's range, and ones that are no number at all."""
    values = ["abc"]
    if kind.min is not None:
        values.append(kind.min if kind.min_open else kind.min - 1)
    if kind.max is not None:
        values.append(kind.max if kind.max_open else kind.max + 1)
    if isinstance(kind, Number):
        values += ["nan", "inf"]
    return values


def refused_before_running(*args) -> Result:
    """Run refine in a fresh directory; assert the one-line refusal and that nothing was made."""
    with tempfile.TemporaryDirectory() as directory:
        here = os.getcwd()
        os.chdir(directory)
        try:
            result = run(*args, ok=False)
            assert list(Path(directory).iterdir()) == [], "files were created for bad input"
        finally:
            os.chdir(here)
    return result


def placeholder_args(command) -> list:
    """Positional arguments that parse (paths that exist), after the option under test."""
    return ["." for p in command.params if isinstance(p, click.Argument)]


BAD_VALUES = [(entry, value) for entry in NUMERIC for value in outside(entry[2].type)]


@pytest.mark.parametrize("entry,value", BAD_VALUES,
                         ids=[f"{option_id(e)}={v}" for e, v in BAD_VALUES])
def test_every_numeric_option_refuses_bad_values_in_one_line(entry, value):
    name, command, option = entry
    # the option comes first: click checks parameters in the order they are given
    result = refused_before_running(name, option.opts[0], value, *placeholder_args(command))
    assert_one_line_error(result, f"{option.opts[0]} {value}: ", "give ")


def test_the_precise_bn_message_says_what_to_give():
    result = refused_before_running("train", "--precise-bn", -1, ".")
    assert_one_line_error(result, "--precise-bn -1: out of range", "number of training batches")


def test_short_option_names_report_the_long_name():
    result = refused_before_running("precompute", "-K", 0, ".", "s.zarr", "--weights", "w.pt")
    assert_one_line_error(result, "--crops-per-image 0: out of range", "give an integer >= 1")


def test_other_usage_errors_are_one_line_too():
    assert_one_line_error(refused_before_running("train", "--no-such-option", "."),
                          "--no-such-option", "see '")
    assert_one_line_error(refused_before_running("precompute", "."), "Missing argument 'STORE'")
    assert_one_line_error(refused_before_running("no-such-command"), "no-such-command")


def test_in_range_boundaries_are_accepted():
    """The bounds are where the library's own limits are, not tighter."""
    assert Count(min=1).convert("1", None, None) == 1
    assert POSITIVE.convert("1e-12", None, None) == 1e-12
    assert FACTOR.convert("1", None, None) == 1.0
    assert SMOOTHING.convert("0", None, None) == 0.0
    assert SMOOTHING.convert("0.999", None, None) == 0.999


@EXAMPLES
@given(value=st.integers(max_value=0))
def test_any_non_positive_crops_per_image_makes_no_store(tiny_data, tiny_refinery_ckpt, value):
    result = refused_before_running("precompute", "-K", value, tiny_data, "labels.zarr",
                                    "--weights", tiny_refinery_ckpt)
    assert_one_line_error(result, f"--crops-per-image {value}: out of range")


@EXAMPLES
@given(option=st.sampled_from(["--top-k", "--batch-size", "--chunk-size", "--workers"]),
       value=st.integers(max_value=0))
def test_any_non_positive_count_makes_no_store(tiny_data, tiny_refinery_ckpt, option, value):
    result = refused_before_running("precompute", option, value, tiny_data, "labels.zarr",
                                    "--weights", tiny_refinery_ckpt)
    assert_one_line_error(result, f"{option} {value}: out of range")


@EXAMPLES
@given(option=st.sampled_from(["--epochs", "--batch-size", "--eval-every", "--lr-step-size"]),
       value=st.integers(max_value=0))
def test_any_non_positive_training_count_makes_no_run(tiny_data, option, value):
    result = refused_before_running("train", option, value, tiny_data, "--out", "run")
    assert_one_line_error(result, f"{option} {value}: out of range")


@EXAMPLES
@given(value=st.one_of(st.floats(max_value=0), st.just(math.inf)))
def test_any_non_positive_or_non_finite_lr_makes_no_run(tiny_data, value):
    """nan and inf pass click's own range check (every comparison with nan is false)."""
    result = refused_before_running("train", "--lr", value, tiny_data, "--out", "run")
    assert_one_line_error(result, "--lr ", ": ", "give a number > 0")


@EXAMPLES
@given(value=st.one_of(
    st.lists(st.integers(-5, 300), min_size=1, max_size=4).filter(
        lambda xs: min(xs) < 1 or xs != sorted(set(xs))).map(lambda xs: ",".join(map(str, xs))),
    st.sampled_from(["14O", "140;170", "1.5", "140,,170"])))
def test_any_milestone_list_not_increasing_epochs_makes_no_run(tiny_data, value):
    result = refused_before_running("train", "--lr-milestones", value, tiny_data, "--out", "run")
    assert_one_line_error(result, "--lr-milestones ", "give increasing epochs >= 1")


@EXAMPLES
@given(value=st.floats(allow_nan=False).filter(lambda x: not 0 < x <= 1))
def test_any_lr_gamma_outside_0_1_makes_no_run(tiny_data, value):
    result = refused_before_running("train", "--lr-gamma", value, tiny_data, "--out", "run")
    assert_one_line_error(result, "--lr-gamma ", "give a number in (0, 1]")


@EXAMPLES
@given(value=st.floats(min_value=1e-30, max_value=1e30))
def test_any_positive_finite_lr_is_accepted_unchanged(value):
    assert POSITIVE.convert(str(value), None, None) == value


def test_the_smallest_top_k_writes_a_store_inspect_reads(tiny_data, tiny_refinery_ckpt,
                                                          tmp_path):
    """--top-k 0 used to write a store that inspect crashed on; 1 is the smallest there is."""
    store = tmp_path / "top1.zarr"
    run("precompute", tiny_data, store, "--weights", tiny_refinery_ckpt, "-K", 1, "--top-k", 1,
        "--batch-size", 32)
    assert LabelStore.open(store).layout.top_k == 1
    assert "complete: True" in run("inspect", store).output


# Storage failures. Tests run as root, which ignores permission bits, so the locations used fail
# for root as well: a file used as a directory (ENOTDIR), and /sys (EPERM, or EROFS where it is
# mounted read-only). A chmod 0o555 directory is tested where it means something (not root).

TINY_TRAIN = ("--arch", "demo_cnn", "--epochs", 1, "--batch-size", 4)


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "not_a_directory"
    path.write_text("a file where a directory is expected\n")
    return path


def unwritable_system_dir() -> Path:
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    return Path("/sys") / f"refinery-test-{os.getpid()}"


@pytest.fixture(scope="module")
def store(tiny_data, tiny_refinery_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "labels.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "-K", 2, "--top-k", 3,
        "--batch-size", 32)
    return path


def test_train_into_a_path_through_a_file_is_one_line(tiny_data, a_file):
    out = a_file / "run"
    result = run("train", tiny_data, *TINY_TRAIN, "--out", out, ok=False)
    assert_one_line_error(result, f"{out}: Not a directory", "choose another location")
    assert a_file.read_text() == "a file where a directory is expected\n"


def test_train_into_an_unwritable_location_is_one_line(tiny_data):
    out = unwritable_system_dir() / "run"
    result = run("train", tiny_data, *TINY_TRAIN, "--out", out, ok=False)
    assert_one_line_error(result, "refinery-test-", "choose a writable location")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores permission bits")
def test_train_into_a_read_only_directory_is_one_line(tiny_data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = run("train", tiny_data, *TINY_TRAIN, "--out",
                 locked / "run", ok=False)
    assert_one_line_error(result, "Permission denied", "choose a writable location")


@pytest.mark.parametrize("where", ["through a file", "unwritable"])
def test_pack_to_an_unwritable_location_names_the_zip_and_keeps_the_store(store, a_file, where):
    out = (a_file / "labels.zip" if where == "through a file"
           else unwritable_system_dir().parent / "labels.zip")
    before = files_under(store)
    result = run("pack", store, out, ok=False)
    fix = "choose another location" if where == "through a file" else "choose a writable"
    assert_one_line_error(result, f"{out}: ", fix)
    assert ".tmp" not in result.output  # the user's path, not the temporary one written first
    assert files_under(store) == before


@pytest.mark.parametrize("where", ["through a file", "unwritable"])
def test_precompute_into_an_unwritable_location_names_the_store(tiny_data, tiny_refinery_ckpt,
                                                                 a_file, where):
    store = (a_file / "labels.zarr" if where == "through a file"
             else unwritable_system_dir().parent / "labels.zarr")
    result = run("precompute", tiny_data, store, "--weights", tiny_refinery_ckpt, "-K", 1,
                 ok=False)
    fix = "choose another location" if where == "through a file" else "choose a writable"
    assert_one_line_error(result, f"{store}: ", fix)
    assert "creating" not in result.output  # the user's path, not the temporary one


@pytest.mark.parametrize("command", ["precompute", "train"])
def test_cache_dir_through_a_file_is_one_line(command, tiny_refinery_ckpt, a_file, tmp_path):
    tree = make_tree(tmp_path / "tree", per_class=2)
    args = (["precompute", tree, tmp_path / "s.zarr", "--weights", tiny_refinery_ckpt]
            if command == "precompute" else ["train", tree, *TINY_TRAIN, "--out",
                                              tmp_path / "run"])
    result = run(*args, "--cache-dir", a_file / "cache", ok=False)
    assert_one_line_error(result, str(a_file), "Not a directory", "choose another location")
    assert not (tmp_path / "s.zarr").exists()


def test_storage_messages_name_the_path_and_the_fix():
    cases = [(PermissionError(errno.EACCES, "Permission denied", "/d/x"),
              "/d/x: Permission denied; choose a writable location or fix its permissions"),
             (OSError(errno.EROFS, "Read-only file system", "/d/x"), "choose a writable"),
             (OSError(errno.ENOENT, "No such file or directory", "/d/x"), "a directory on it is "
                                                                          "missing"),
             (OSError(errno.ENOSPC, "No space left on device"),
              "s.zarr: writing failed (No space left on device); free space there"),
             (OSError(errno.EIO, "Input/output error", "/d/x"), "check the path and rerun"),
             (OSError(errno.ENOTDIR, "Not a directory", "s.zarr.123.tmp"), "s.zarr: Not a dir"),
             (OSError(errno.EPERM, "Not permitted", ".s.zarr.creating-1"), "s.zarr: Not perm")]
    for exc, expected in cases:
        message = storage_error_message(exc, "s.zarr")
        assert expected in message and "\n" not in message, message


def test_a_dropped_connection_says_to_rerun():
    from botocore.exceptions import EndpointConnectionError
    message = storage_error_message(EndpointConnectionError(endpoint_url="http://s3:9000"),
                                    "s3://bucket/labels.zarr")
    assert message.startswith("s3://bucket/labels.zarr: reading or writing failed (Could not "
                              "connect"), message
    assert "rerun the same command" in message


BAD_RECIPES = [["nonsense"], ["erasing:2"], ["erasing:nan"], ["randaugment:x"], ["mixup:0"],
               ["trivialaugment:1"], ["trivialaugment", "randaugment:2:9"]]


@pytest.mark.parametrize("values", BAD_RECIPES, ids=lambda v: "+".join(v))
@pytest.mark.parametrize("command", ["precompute", "train"])
def test_a_bad_augment_value_is_one_line_and_makes_nothing(command, values, tiny_data,
                                                          tiny_refinery_ckpt):
    given = [a for v in values for a in ("--augment", v)]
    args = (["precompute", tiny_data, "labels.zarr", "--weights", tiny_refinery_ckpt]
            if command == "precompute" else ["train", tiny_data, "--out", "run"])
    result = refused_before_running(*args, *given)
    assert_one_line_error(result, f"--augment {values[-1]}: ")


def test_augment_values_reach_the_plan_in_canonical_form(tiny_data, tiny_refinery_ckpt,
                                                         tmp_path):
    path = tmp_path / "augmented.zarr"
    run("precompute", tiny_data, path, "--weights", tiny_refinery_ckpt, "-K", 2, "--top-k", 3,
        "--chunk-size", 32, "--workers", 1, "--augment", "TrivialAugment", "--augment",
        "erasing:0.250")
    assert LabelStore.open(path).plan.augment == ("trivialaugment", "erasing:0.25")


def test_train_augment_values_reach_the_run_config(tiny_data, tmp_path):
    import json
    out = tmp_path / "run"
    run("train", tiny_data, "--arch", "demo_cnn", "--res", 24, "--epochs", 1, "--batch-size", 32,
        "--workers", 1, "--out", out, "--augment", "randaugment:2:9", "--augment", "mixup:0.2")
    assert json.loads((out / "config.json").read_text())["augment"] == ["randaugment:2:9",
                                                                        "mixup:0.2"]
