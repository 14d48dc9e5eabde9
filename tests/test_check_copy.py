"""``refine check-copy``: every finding of a copy (matched, missing, extra, exact, resized,
re-encoded, reframed, unreadable), the exit code, and the stored labels against the refinery's on
the copy's pixels, in both BN modes (train mode in whole loader batches of the original run)."""
import io
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from refinery_pipeline.core.errors import ArgumentError, StoreMismatchError
from refinery_pipeline.labelling.check_copy import (NEEDS_ALLOW_MISSING, UNUSABLE, USABLE,
                                                    check_copy)
from refinery_pipeline.labelling.refinery import Refinery
from refinery_pipeline.labelling.verdicts import (ABSENT, EXACT, REENCODED, REFRAMED, RESIZED,
                                                  UNREADABLE)
from refinery_pipeline.sources import ImageSource
from refinery_pipeline.sources.pixels import decode_jpeg
from refinery_pipeline.store.label_store import LabelStore

from .copy_fixtures import (N, export_files, hf_table, make_origin, mixing_origin,  # noqa: F401
                            origin, precompute_store, stored_bytes, subset, write_shards)
from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")


class BytesSource(ImageSource):
    """A copy held in memory: key -> encoded bytes (what a test composes freely)."""
    kind = "paths"

    def __init__(self, data: dict):
        self.data = list(data.values())
        super().__init__("in-memory copy", list(data))

    def encoded(self, i: int) -> bytes:
        return self.data[i]


def png(pixels) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def jpeg(pixels, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def refinery(tiny_refinery_ckpt):
    return Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval")


@pytest.fixture(scope="module")
def variants(origin) -> dict:
    """key -> {kind: bytes}: the stored bytes, a half-size PNG, a full-size PNG (other bytes,
    the same pixels), a JPEG at quality 40, and a crop of the left half (reframed)."""
    import cv2
    out = {}
    for key, data in stored_bytes(origin).items():
        pixels = decode_jpeg(data)
        h, w = pixels.shape[:2]
        out[key] = {"same": data, "png": png(pixels), "q40": jpeg(pixels, 40),
                    "half": png(cv2.resize(pixels, (w // 2, h // 2),
                                           interpolation=cv2.INTER_AREA)),
                    "crop": png(np.ascontiguousarray(pixels[:, :w // 2]))}
    return out


@pytest.fixture(scope="module")
def tree(origin, tmp_path_factory):
    return export_files(origin, tmp_path_factory.mktemp("tree") / "train")[0].parents[1]


EXPECTED = {"same": EXACT, "gone": ABSENT, "half": RESIZED, "png": REENCODED, "q40": REENCODED,
            "crop": REFRAMED}


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(EXPECTED)), min_size=N, max_size=N))
def test_each_image_is_told_by_its_bytes_and_frame(origin, variants, kinds):
    keys = LabelStore.open(origin.keyed).read_keys()
    copy = {k: variants[k][kind] for k, kind in zip(keys, kinds) if kind != "gone"}
    if not copy:
        return
    report = check_copy(origin.keyed, BytesSource(copy))
    expected = np.array([EXPECTED[kind] for kind in kinds])
    assert np.array_equal(report.verdicts, expected)
    counts = report.counts
    assert counts["missing"] == kinds.count("gone") and counts["reframed"] == kinds.count("crop")
    assert counts["exact"] == kinds.count("same") and counts["resized"] == kinds.count("half")
    assert counts["reencoded"] == kinds.count("png") + kinds.count("q40")
    skipped = kinds.count("gone") + kinds.count("crop")
    assert counts["used"] == N - skipped
    assert report.status == (NEEDS_ALLOW_MISSING if skipped and skipped < N else
                             UNUSABLE if skipped == N else USABLE)
    assert check_copy(origin.keyed, BytesSource(copy), allow_missing=True).status == \
        (UNUSABLE if skipped == N else USABLE)


@pytest.mark.parametrize("form", ["tree", "shards", "hf table"])
def test_an_exact_copy_agrees_label_for_label(origin, refinery, tree, tmp_path, form):
    data = {"tree": tree,
            "shards": write_shards(origin, tmp_path / "shards", origin.keys[::-1]),
            "hf table": hf_table(origin, origin.keys[::-1])}[form]
    report = check_copy(origin.keyed, data, refinery, sample=60, seed=1)
    assert report.status == USABLE and report.counts["exact"] == report.counts["used"] == N
    agreement = report.agreement
    assert agreement.bn_mode == "eval" and agreement.loader_batches == 0
    assert agreement.overall.crops == agreement.exact.crops == 60
    assert agreement.approximate is None
    assert agreement.exact.top1 == 1.0 and agreement.exact.max_error == 0.0
    assert report.lines[-1] == f"usable: all {N} of {N} store images"
    assert any(line.startswith("labels, exact crops: 60 crops, top-1 agreement 100.00%")
               for line in report.lines)


def test_approximate_copies_are_compared_apart_from_exact_ones(origin, variants, refinery):
    keys = LabelStore.open(origin.keyed).read_keys()
    copy = {k: variants[k]["same" if n % 2 else "q40"] for n, k in enumerate(keys)}
    report = check_copy(origin.keyed, BytesSource(copy), refinery, sample=N * 3)
    agreement = report.agreement
    assert agreement.exact.crops + agreement.approximate.crops == N * 3  # every crop
    assert agreement.exact.max_error == 0.0 and agreement.approximate.max_error > 0.0
    assert any(line.startswith(f"re-encoded: {N // 2} ") for line in report.lines)


def test_a_resized_copy_is_approximate_and_its_labels_drift(origin, variants, refinery):
    copy = {k: v["half"] for k, v in variants.items()}
    report = check_copy(origin.keyed, BytesSource(copy), refinery, sample=50)
    assert report.status == USABLE and report.counts["resized"] == N
    assert report.agreement.exact is None and report.agreement.approximate.crops == 50
    assert report.agreement.approximate.max_error > 0.0


def test_a_subset_needs_allow_missing_and_names_what_is_lost(origin, tree, tmp_path):
    kept = subset(origin.keys, 0.75)
    export_files(origin, tmp_path / "part", kept)
    report = check_copy(origin.keyed, tmp_path / "part")
    lost = sorted(set(origin.keys) - set(kept))
    assert report.status == NEEDS_ALLOW_MISSING and report.counts["missing"] == len(lost)
    missing = next(line for line in report.lines if line.startswith("missing:"))
    assert missing.startswith(f"missing: {len(lost)} ") and any(repr(k) in missing for k in lost)
    assert "pass --allow-missing" in report.lines[-1]
    assert check_copy(origin.keyed, tmp_path / "part", allow_missing=True).status == USABLE


def test_extra_images_are_counted_and_harmless(origin, tree, tmp_path):
    copy = shutil.copytree(tree, tmp_path / "more")
    first = next(copy.rglob("*.jpg"))
    shutil.copy(first, first.with_name("stranger.jpg"))
    report = check_copy(origin.keyed, copy)
    assert report.status == USABLE and report.counts["extra"] == 1
    assert any(line.startswith("extra: 1 ") and "stranger" in line for line in report.lines)


def test_an_unreadable_image_makes_the_copy_unusable(origin, tree, tmp_path):
    copy = shutil.copytree(tree, tmp_path / "broken")
    victim = sorted(copy.rglob("*.jpg"))[5]
    victim.write_bytes(b"no image here")
    report = check_copy(origin.keyed, copy, allow_missing=True)
    assert report.status == UNUSABLE and report.counts["unreadable"] == 1
    key = victim.relative_to(copy).with_suffix("").as_posix()
    assert any(line.startswith("unreadable: 1 ") and repr(key) in line for line in report.lines)
    assert report.verdicts.tolist().count(UNREADABLE) == 1


def test_a_copy_of_other_images_is_unusable(origin, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "holiday.jpg").write_bytes(stored_bytes(origin)[origin.keys[0]])
    report = check_copy(origin.keyed, tmp_path / "other")
    assert report.status == UNUSABLE and report.lines[-1].startswith("unusable: ")
    assert any(line.startswith(f"matched: 0 of {N}") for line in report.lines)


def test_a_copy_whose_classes_differ_is_unusable(origin, tree, tmp_path):
    files = sorted(tree.rglob("*.jpg"))
    names = [f.parent.name for f in files]
    wrong = names[1:] + names[:1]  # every image named another image's class
    rows = "\n".join(f"{f},{c}" for f, c in zip(files, wrong))
    (tmp_path / "list.csv").write_text(f"path,label\n{rows}\n")
    report = check_copy(origin.keyed, tmp_path / "list.csv", label_column="label")
    assert report.status == UNUSABLE and "other classes" in report.lines[-1]


def test_an_unkeyed_store_takes_only_its_own_data_by_position(origin, tree, refinery):
    own = check_copy(origin.plain, origin.beton, refinery, sample=20)
    assert own.status == USABLE and own.counts["exact"] == N
    assert own.agreement.exact.top1 == 1.0 and own.agreement.exact.max_error == 0.0
    assert own.lines[0].startswith(f"matched: {N} of {N} store images (by position")
    other = check_copy(origin.plain, tree)
    assert other.status == UNUSABLE and other.lines[0].startswith(f"matched: 0 of {N}")


def test_another_refinery_is_refused(origin, tree, tiny_refinery_ckpt):
    other = Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="train")
    with pytest.raises(StoreMismatchError, match="refinery differs"):
        check_copy(origin.keyed, tree, other)


@pytest.mark.parametrize("name, value", [("sample", 0), ("seed", -1), ("allow_missing", "yes"),
                                         ("num_workers", 0)])
def test_arguments_are_checked(origin, tree, name, value):
    with pytest.raises(ArgumentError, match=name):
        check_copy(origin.keyed, tree, **{name: value})


# ----------------------------------------------------------------------------- BN modes

@pytest.fixture(scope="module")
def train_bn(origin, tiny_refinery_ckpt, tmp_path_factory):
    """The origin's images labelled in train-mode BN (labels depend on their loader batch)."""
    from refinery_pipeline.labelling.precompute import precompute
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.sources.data_cache import open_dataset
    out = tmp_path_factory.mktemp("train_bn")
    refinery = Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="train")
    precompute(open_dataset(origin.beton), out / "keyed.zarr", refinery,
               CropPlan(seed=5, crops_per_image=3), top_k=4, crop_batch=16, chunk_size=16,
               progress=False, num_workers=1, soft_static=True)
    return out / "keyed.zarr", refinery  # precompute recorded the keys


def test_train_mode_labels_are_compared_in_whole_loader_batches(train_bn, variants):
    store, refinery = train_bn
    keys = LabelStore.open(store).read_keys()
    report = check_copy(store, BytesSource({k: variants[k]["same"] for k in keys}), refinery,
                        sample=60)
    agreement = report.agreement
    assert agreement.bn_mode == "train" and agreement.loader_batches == 2  # units of 16 x 3
    assert agreement.exact.crops == 96 and agreement.exact.top1 == 1.0
    assert agreement.exact.max_error == 0.0  # the same crops in the same forward batches
    assert "whole loader batches" in next(line for line in report.lines
                                          if line.startswith("labels:"))


def test_train_mode_needs_a_loader_batch_the_copy_holds_whole(train_bn, variants):
    store, refinery = train_bn
    keys = LabelStore.open(store).read_keys()
    copy = {k: variants[k]["same"] for n, k in enumerate(keys) if n % 16 != 3}  # one per batch
    report = check_copy(store, BytesSource(copy), refinery, allow_missing=True)
    assert report.status == USABLE and report.agreement.overall is None
    assert any(line.startswith("labels: not compared (no loader batch") for line in report.lines)


def test_mixed_crops_are_rebuilt_as_labelled(mixing_origin, tree, tiny_refinery_ckpt):
    refinery = Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval")
    report = check_copy(mixing_origin.keyed, mixing_origin.beton, refinery, sample=40)
    assert report.agreement.exact.crops == 40 and report.agreement.exact.max_error == 0.0


# ----------------------------------------------------------------------------- the command

def test_the_command_prints_one_line_per_finding_and_exits_by_verdict(origin, tree, tmp_path,
                                                                      tiny_refinery_ckpt):
    done = run("check-copy", origin.keyed, tree, "--weights", tiny_refinery_ckpt, "--sample", 30)
    lines = done.output.strip().splitlines()
    assert lines[-1] == f"usable: all {N} of {N} store images" and "Traceback" not in done.output
    assert any(line.startswith("labels, exact crops: 30 crops") for line in lines)
    export_files(origin, tmp_path / "part", origin.keys[:-4])
    partial = run("check-copy", origin.keyed, tmp_path / "part", ok=False)
    assert partial.exit_code == 1 and "missing: 4 " in partial.output
    assert run("check-copy", origin.keyed, tmp_path / "part", "--allow-missing").exit_code == 0
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "x.jpg").write_bytes(stored_bytes(origin)[origin.keys[0]])
    assert run("check-copy", origin.keyed, tmp_path / "none", ok=False).exit_code == 2


def test_the_command_refuses_bad_input_in_one_line(origin, tree, tmp_path):
    assert_one_line_error(run("check-copy", tmp_path / "nothing.zarr", tree, ok=False),
                          "nothing.zarr")
    assert_one_line_error(run("check-copy", origin.keyed, tree, "--sample", 5, ok=False),
                          "--sample", "--weights")
    assert_one_line_error(run("check-copy", origin.keyed, tmp_path / "absent", ok=False),
                          "absent")
