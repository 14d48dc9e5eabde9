"""The examples under ``examples/`` run end to end on a tiny store, each in its own process, and
README's API snippet runs as it is printed."""
import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from refinery_pipeline.plan.crop_plan import CropPlan
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.labelling.precompute import precompute
from refinery_pipeline.labelling.refinery import Refinery

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("plain_pytorch.py", "ffcv_loop.py", "timm_style.py", "lightning_loop.py")
LOSS = re.compile(r"^epoch (\d+): mean loss (\S+)$", re.MULTILINE)
# Lightning calls set_epoch from a hook: two epochs show the hook runs each epoch.
EPOCHS = {"lightning_loop.py": 2}


@pytest.fixture(scope="module")
def example_runs(tiny_data, tiny_refinery_ckpt, tmp_path_factory) -> dict:
    """Each example's finished process on a K = 2 store of the tiny shapes, run side by side
    (most of each run is importing torch and FFCV, and FFCV compiling its pipeline)."""
    out = tmp_path_factory.mktemp("examples")
    store = out / "labels.zarr"
    precompute(open_dataset(tiny_data), store,
               Refinery.from_checkpoint(tiny_refinery_ckpt, bn_mode="eval"),
               CropPlan(seed=5, crops_per_image=2), top_k=4, crop_batch=32, chunk_size=32,
               progress=False)
    env = dict(os.environ, REFINERY_CACHE=str(out / "cache"), CUDA_VISIBLE_DEVICES="")
    runs = {name: subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / name), str(store), str(tiny_data),
         "--epochs", str(EPOCHS.get(name, 1)), "--batch-size", "8", "--limit-steps", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in EXAMPLES}
    results = {}
    for name, process in runs.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[name] = (process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_trains_and_prints_a_finite_loss(example_runs, name):
    returncode, stdout, stderr = example_runs[name]
    assert returncode == 0, stderr[-3000:]
    found = LOSS.findall(stdout)
    assert [int(epoch) for epoch, _ in found] == list(range(EPOCHS.get(name, 1))), stdout
    assert all(math.isfinite(float(loss)) for _, loss in found), found


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_short_and_says_what_it_shows(name):
    source = (ROOT / "examples" / name).read_text()
    assert len(source.splitlines()) < 60
    assert ast.get_docstring(ast.parse(source))


def python_block(path: Path, heading: str) -> str:
    """The first Python block after ``heading`` in the Markdown file ``path``."""
    text = path.read_text()
    section = text[text.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("\n```", start)]


def readme_snippet() -> str:
    """The Python block of README's "Use a store in your own training loop" section."""
    return python_block(ROOT / "README.md", "## Use a store in your own training loop")


def run_snippet_as_printed(code: str, where: str, store, data):
    """Run a printed training loop with only the paths and the sizes changed (each must appear
    exactly once, so an edited snippet fails here rather than drifting): tiny data, one
    worker-free epoch."""
    for old, new in (('"labels.zarr"', repr(str(store))), ('"DATA/train"', repr(str(data))),
                     ("num_workers=8", "num_workers=0"), ("range(16)", "range(1)")):
        assert code.count(old) == 1, f"{where}'s snippet no longer holds {old}"
        code = code.replace(old, new)
    namespace = {}
    exec(compile(code, where, "exec"), namespace)
    assert math.isfinite(namespace["loss"].item())
    assert namespace["b"].targets.indices.shape[1] == 4  # it trained on the store's labels


def test_readme_snippet_runs_as_printed(mixup_store, tiny_data):
    run_snippet_as_printed(readme_snippet(), "README.md", mixup_store, tiny_data)
