"""WordNet category labels (Table 5's taxonomy level): the database, the table, the mode."""
import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from refinery_pipeline.training import wordnet
from refinery_pipeline.loaders.crop_batch import CropBatch, MixedLabels
from refinery_pipeline.sources.beton_writer import ArraySource, write_beton
from refinery_pipeline.core.errors import DataSetError, RefineryError
from refinery_pipeline.paper.synthetic import make_shapes
from refinery_pipeline.training.targets import CategoryTargets
from refinery_pipeline.training.train import fit
from refinery_pipeline.training.config import TrainConfig

from .test_cli import assert_one_line_error, run

# not the loader's tests: its pipelines run uncompiled, the same bytes (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("uncompiled_loaders")

# Imagenette's classes: tench, English springer, cassette player, chain saw, church, French horn,
# garbage truck, gas pump, golf ball, parachute
IMAGENETTE = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916",
              "n03417042", "n03425413", "n03445777", "n03888605")
LEXNAMES_MAN_PAGE = Path("/usr/share/man/man5/lexnames.5WN.gz")


@pytest.fixture
def fresh_reader():
    """A test that changes where WordNet is found reads it anew, and leaves no reader behind."""
    wordnet.wordnet_reader.cache_clear()
    yield
    wordnet.wordnet_reader.cache_clear()


@pytest.fixture(scope="module")
def wnid_data(tmp_path_factory) -> Path:
    """Shapes written as a data set whose ten classes are Imagenette's WordNet ids."""
    directory = tmp_path_factory.mktemp("wnid")
    for split, count, seed in (("val", 32, 1), ("train", 64, 0)):
        data = make_shapes(count, 40, seed)
        write_beton(ArraySource(data.images, data.labels), directory / f"nette_{split}.beton",
                    classes=list(IMAGENETTE), num_workers=1)
    return directory / "nette_train.beton"


@pytest.mark.skipif(not LEXNAMES_MAN_PAGE.is_file(), reason="WordNet's manual pages absent")
def test_lexnames_are_wordnets_own_list():
    """The ``lexnames`` written for Debian's database is the table of lexnames(5WN)."""
    page = gzip.decompress(LEXNAMES_MAN_PAGE.read_bytes()).decode()
    rows = re.findall(r"^(\d\d)\t(\S+)\s*\t", page, flags=re.M)
    assert [name for _, name in rows] == list(wordnet.LEXNAMES)
    assert [int(number) for number, _ in rows] == list(range(45))


def test_similarities_are_nltks_wu_palmer():
    reader = wordnet.wordnet_reader()
    assert reader.get_version() == "3.0"
    sims = wordnet.wup_similarities(IMAGENETTE)
    tench, springer, chain_saw = (reader.synset_from_pos_and_offset("n", int(w[1:]))
                                  for w in IMAGENETTE[:2] + IMAGENETTE[3:4])
    assert tench.name() == "tench.n.01" and springer.name() == "english_springer.n.01"
    assert sims[0, 1] == tench.wup_similarity(springer)
    assert sims[3, 0] == chain_saw.wup_similarity(tench)
    assert np.array_equal(sims, sims.T) and np.all(np.diag(sims) == 1)
    assert sims[0, 1] > sims[0, 3]  # a fish is nearer a dog than a chain saw


def test_similarities_are_cached_by_class_list(monkeypatch):
    first = wordnet.wup_similarities(IMAGENETTE)
    monkeypatch.setattr(wordnet, "class_synsets", lambda *a: pytest.fail("recomputed"))
    assert np.array_equal(wordnet.wup_similarities(IMAGENETTE), first)


def test_table_is_a_softmax_of_similarities_with_the_class_on_top():
    sims = torch.from_numpy(wordnet.wup_similarities(IMAGENETTE))
    sharp = wordnet.wordnet_category_table(IMAGENETTE, 0.1)
    assert torch.allclose(sharp, torch.softmax(sims / 0.1, 1).float())
    assert torch.allclose(sharp.sum(1), torch.ones(10))
    assert torch.equal(sharp.argmax(1), torch.arange(10))
    wide = wordnet.wordnet_category_table(IMAGENETTE, 0.3)
    assert torch.all(wide.diagonal() < sharp.diagonal())  # a higher temperature spreads more
    with pytest.raises(RefineryError, match="positive temperature"):
        wordnet.wordnet_category_table(IMAGENETTE, 0.0)


@pytest.mark.parametrize("name, why", [("cat", "not a WordNet noun id"),
                                       ("n99999999", "no noun of WordNet 3.0")])
def test_classes_wordnet_does_not_name_are_refused(name, why):
    with pytest.raises(DataSetError, match=why):
        wordnet.class_synsets([IMAGENETTE[0], name], "DATA: train")


def test_a_missing_database_is_one_clear_error(monkeypatch, tmp_path, fresh_reader):
    import nltk
    monkeypatch.delenv(wordnet.WORDNET_ENV, raising=False)
    monkeypatch.setattr(wordnet, "DEBIAN_WORDNET", tmp_path / "none")
    monkeypatch.setattr(nltk.data, "find", lambda *a, **k: (_ for _ in ()).throw(LookupError()))
    with pytest.raises(wordnet.WordNetError, match="apt-get install wordnet-base"):
        wordnet.wordnet_reader()
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(tmp_path))
    with pytest.raises(wordnet.WordNetError, match="names no WordNet database"):
        wordnet.wordnet_reader()


def test_a_database_with_lexnames_is_read_in_place(tmp_path, monkeypatch, fresh_reader):
    """A full WordNet dict directory (lexnames present) is not copied."""
    import shutil
    full = tmp_path / "dict"
    shutil.copytree(wordnet.DEBIAN_WORDNET, full)
    (full / "lexnames").write_text(wordnet.lexnames_text())
    monkeypatch.setenv(wordnet.WORDNET_ENV, str(full))
    assert Path(wordnet.wordnet_reader().root.path) == full
    assert not (tmp_path / "cache" / "wordnet").exists()  # REFINERY_CACHE, per test


def test_mixed_crops_get_both_classes_rows_in_their_shares():
    table = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.9, 0.0], [0.0, 0.3, 0.7]])
    batch = CropBatch(None, torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([-1, -1]),
                      mix=MixedLabels(torch.tensor([1, 2]), torch.tensor([0.25, 1.0])))
    target = CategoryTargets(table, "cpu")(batch, None)
    assert torch.allclose(target[0], 0.25 * table[0] + 0.75 * table[1])
    assert torch.allclose(target[1], table[2])


def config(data, tmp_path, **kw):
    base = dict(data=str(data), out_dir=str(tmp_path / "run"), arch="demo_cnn", epochs=1,
                batch_size=16, res=24, workers=1, progress=False, warmup_epochs=0.5,
                label_mode="category-wordnet")
    return TrainConfig(**{**base, **kw})


def test_students_train_on_each_class_wordnet_label(wnid_data, tmp_path):
    record = fit(config(wnid_data, tmp_path, wordnet_temperature=0.2))
    assert np.isfinite(record["train_loss"])
    saved = np.load(tmp_path / "run" / "category_targets.npy")
    assert np.allclose(saved, wordnet.wordnet_category_table(IMAGENETTE, 0.2).numpy())


def test_students_on_wordnet_labels_take_a_mixing_recipe(wnid_data, tmp_path):
    record = fit(config(wnid_data, tmp_path, augment=("cutmix:1",)))
    assert np.isfinite(record["train_loss"])


def test_wordnet_labels_with_a_store_or_teacher_are_refused(wnid_data, tmp_path,
                                                            tiny_refinery_ckpt):
    for extra in (dict(labels="x.zarr"), dict(teacher=str(tiny_refinery_ckpt))):
        with pytest.raises(RefineryError, match="drop --labels and --teacher"):
            fit(config(wnid_data, tmp_path, **extra))
    assert not (tmp_path / "run").exists()


def test_cli_names_a_class_that_is_no_wordnet_id(tiny_data, tmp_path):
    """The shapes data set's classes (``circle``, ...) are no WordNet ids: one line, no run."""
    result = run("train", tiny_data, "--label-mode", "category-wordnet", "--arch", "demo_cnn",
                 "--epochs", 1, "--batch-size", 16, "--res", 24, "--workers", 1,
                 "--out", tmp_path / "run", ok=False)
    assert_one_line_error(result, str(tiny_data), "is not a WordNet noun id",
                          "category-visual")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    result = run("train", tiny_data, "--label-mode", "category-wordnet",
                 "--wordnet-temperature", 0, "--out", tmp_path / "run2", ok=False)
    assert_one_line_error(result, "--wordnet-temperature")
