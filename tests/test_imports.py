"""Imports cost what they use (issue 28): the torch-free parts of the package (the crop plan,
the store, keys, errors) load without torch, FFCV or numba, and the public API is exactly
``__all__``, every name of it reachable from the package."""
import subprocess
import sys

import pytest

import refinery_pipeline as refinery

HEAVY = ("torch", "ffcv", "numba", "torchvision")
TORCH_FREE = ("plan.crop_plan", "plan.recipe", "store.schema", "store.encoding",
              "store.label_store", "sources.keys", "core.errors", "core.validators",
              "loaders.crop_table", "training.wordnet")

PUBLIC_API = {
    "open_store", "LabelStore", "StoreLayout", "CropPlan", "RefineryInfo", "DatasetInfo",
    "Batching", "CropRecords", "FORMAT_VERSION", "slot_of", "SLOT_POLICIES", "dense_targets",
    "REST_POLICIES", "visual_category_table", "wordnet_category_table", "get_loss", "LOSSES",
    "kl_divergence", "soft_cross_entropy", "reverse_kl", "l2_on_probabilities", "CropBatch",
    "SparseLabels", "NOT_STORED", "StoreCropDataset", "CropCollate", "CropSample",
    "BetonImages", "FolderImages", "MappedImages", "replay_loader", "beton_path", "CopyJoin",
    "check_copy", "CopyReport", "StoreCrops", "RefineryError", "RefineryWarning", "StoreError",
    "StoreNotFoundError", "StoreMismatchError", "IncompleteStoreError", "StoreCorruptError",
    "DataSetError", "CheckpointError", "ArgumentError", "MissingImagesError",
}


def loaded_by(module: str, packages: tuple) -> str:
    """Which of ``packages`` a fresh interpreter has loaded after importing ``module``."""
    probe = (f"import sys, refinery_pipeline.{module}; "
             f"print(','.join(m for m in {packages!r} if m in sys.modules))")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("module", TORCH_FREE)
def test_a_torch_free_part_loads_no_heavy_package(module):
    loaded = loaded_by(module, HEAVY)
    assert loaded == "", f"importing refinery_pipeline.{module} loaded {loaded}"


def test_the_store_schema_loads_no_zarr():
    """What a store holds (names, defaults, typed views) is read without the library that
    stores it."""
    loaded = loaded_by("store.schema", ("zarr", "numcodecs", "fsspec"))
    assert loaded == "", f"importing refinery_pipeline.store.schema loaded {loaded}"


def test_the_public_api_is_exactly_all_and_every_name_resolves():
    assert set(refinery.__all__) == PUBLIC_API  # a change here is a change for users
    for name in refinery.__all__:
        assert getattr(refinery, name) is not None
    assert set(refinery.__all__) <= set(dir(refinery))


def test_static_tools_see_the_names_where_they_load_from():
    """The ``if TYPE_CHECKING:`` imports (what IDEs and the docs' API reference read) name the
    same module for each public name as ``_HOMES`` (what runs)."""
    import ast
    from pathlib import Path
    tree = ast.parse(Path(refinery.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING")
    static = {alias.name: node.module for node in guarded.body for alias in node.names}
    assert static == refinery._HOME_OF


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        refinery.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        from refinery_pipeline import no_such_name  # noqa: F401


def test_every_import_in_the_package_resolves():
    """Each ``from X import name`` in the package and the CLI (the CLI's modules import each
    other relatively), function-level ones included (those fail only when their code runs),
    names something X defines: a module moved or split leaves none behind."""
    import ast
    import importlib
    from pathlib import Path
    root = Path(refinery.__file__).parent
    files = sorted(root.rglob("*.py")) + sorted((root.parent / "cli").rglob("*.py"))
    broken = []
    for path in files:
        parts = path.relative_to(root.parent).with_suffix("").parts
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = list(package[:len(package) - (node.level - 1)])
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            if not module.startswith(("refinery_pipeline", "cli.")):  # not a third party's
                continue
            target = importlib.import_module(module)
            for alias in node.names:
                if not hasattr(target, alias.name):
                    try:
                        importlib.import_module(f"{module}.{alias.name}")
                    except ImportError:
                        broken.append(f"{path.relative_to(root.parent)}:{node.lineno}: "
                                      f"{module}.{alias.name}")
    assert not broken, broken


STAGES = ("core", "plan", "sources", "store", "models", "loaders", "labelling", "training",
          "paper")  # docs/design.md's order: a stage imports only the stages before it


def stage_imports(path) -> list:
    """``(line, stage imported)`` for each import of another stage in the module at ``path``."""
    import ast
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level == 2:
                found.append((node.lineno, node.module.split(".")[0]))
            elif node.level == 0 and node.module.startswith("refinery_pipeline."):
                found.append((node.lineno, node.module.split(".")[1]))
    return [(line, stage) for line, stage in found if stage in STAGES]


def test_every_stage_imports_only_the_stages_before_it():
    """No import points up the stages (function-level ones included): a new contributor can
    read the stages in order, and a stage can be tested without the ones above it."""
    from pathlib import Path
    root = Path(refinery.__file__).parent
    assert sorted(p.name for p in root.iterdir() if (p / "__init__.py").exists()) == \
        sorted(STAGES)
    upward = [f"{path.relative_to(root)}:{line} imports {stage}"
              for own in STAGES for path in sorted((root / own).glob("*.py"))
              for line, stage in stage_imports(path)
              if STAGES.index(stage) > STAGES.index(own)]
    assert not upward, upward


def test_the_stage_check_sees_an_upward_import(tmp_path):
    """The check above can fail: a store module importing the loaders is reported."""
    module = tmp_path / "x.py"
    module.write_text("def f():\n    from ..loaders.replay import make_loader\n")
    assert stage_imports(module) == [(2, "loaders")]
