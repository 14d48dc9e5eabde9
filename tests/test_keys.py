"""Keys and the join of a store's images with a copy's: normalization, matching rules, counts."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refinery_pipeline.core.errors import ArgumentError
from refinery_pipeline.sources.keys import (AMBIGUOUS, DUPLICATE, EXTRA, MATCHED, join,
                                            normalize_key, normalize_keys)


@pytest.mark.parametrize("text, key", [
    ("n01/n01_10026.JPEG", "n01/n01_10026"),
    ("./n01/x.jpg", "n01/x"),
    ("/abs//n01/./x.png", "abs/n01/x"),
    ("n01\\x.tif", "n01/x"),
    ("x.jpg.png", "x"),            # WebDataset's key ends at the first dot
    ("x.v2.jpg", "x.v2"),          # only image extensions go
    ("x.txt", "x.txt"),
    (".jpg", ".jpg"),              # a hidden file's name is all it has
    ("a/x.jpg/..jpg", "a/x"),
    ("e\u0301t\u00e9.jpg", "\u00e9t\u00e9"),  # NFD from macOS -> NFC
    ("plain", "plain"),
])
def test_normalize_key(text, key):
    assert normalize_key(text) == key
    assert normalize_keys([text, "other.jpg"]) == [key, "other"]


@pytest.mark.parametrize("text", ["", "/", "./", "a\0b", "a\nb", 3, None])
def test_a_key_that_names_no_image_is_refused_in_one_line(text):
    with pytest.raises(ArgumentError) as caught:
        normalize_keys(["fine.jpg", text])
    assert repr(text) in str(caught.value) and "\n" not in str(caught.value).replace("\\n", "")


NAME = st.text(alphabet="ab.\\/éjpgJPG\u0301", max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(NAME, max_size=8))
def test_the_batch_path_equals_the_careful_one_and_is_idempotent(texts):
    """normalize_keys takes a one-pass shortcut where it can; it must agree with normalize_key
    key by key, and normalizing twice changes nothing."""
    try:
        expected = [normalize_key(t) for t in texts]
    except ArgumentError:
        with pytest.raises(ArgumentError):
            normalize_keys(texts)
        return
    assert normalize_keys(texts) == expected
    assert normalize_keys(expected) == expected


# ------------------------------------------------------------------------------------ join

def reference_join(store_keys, copy_keys) -> np.ndarray:
    """The rules written out by brute force: ``rows`` as join must give them."""
    candidates = []
    for key in copy_keys:
        if key in store_keys:
            candidates.append(store_keys.index(key))
            continue
        ending = [n for n, s in enumerate(store_keys) if s.endswith("/" + key)]
        candidates.append(ending[0] if len(ending) == 1 else -1)
    rows = np.full(len(store_keys), -1)
    for n in range(len(store_keys)):
        claims = [i for i, c in enumerate(candidates) if c == n]
        if len(claims) == 1:
            rows[n] = claims[0]
    return rows


COMPONENT = st.sampled_from(["a", "b", "c", "n01", "n02", "x_1", "x_2"])
STORE_KEYS = st.lists(st.lists(COMPONENT, min_size=1, max_size=3).map("/".join),
                      min_size=1, max_size=20, unique=True)


@st.composite
def store_and_copy(draw):
    """Store keys, and a copy of some of them: shuffled, some flattened to their last
    components, some with an extension, plus keys the store lacks and repeats."""
    store = draw(STORE_KEYS)
    picked = draw(st.lists(st.sampled_from(range(len(store))), max_size=len(store) + 3))
    copy = []
    for n in picked:
        parts = store[n].split("/")
        kept = draw(st.integers(1, len(parts)))
        copy.append("/".join(parts[-kept:]) + draw(st.sampled_from(["", ".jpg", ".PNG"])))
    copy += draw(st.lists(st.sampled_from(["zz", "a/zz", "n03/x_9"]), max_size=2))
    return store, draw(st.permutations(copy))


@settings(max_examples=300, deadline=None)
@given(store_and_copy())
def test_join_follows_its_rules(case):
    store, copy = case
    result = join(store, copy)
    copy_keys = normalize_keys(copy)
    np.testing.assert_array_equal(result.rows, reference_join(store, copy_keys))
    matched = np.flatnonzero(result.rows >= 0)
    np.testing.assert_array_equal(result.copy_rows[result.rows[matched]], matched)  # inverse
    for n in matched:  # never a wrong image: equal, or the one store key ending so
        key = copy_keys[result.rows[n]]
        assert store[n] == key or sum(s.endswith("/" + key) for s in store) == 1
    assert result.matched + result.missing == len(store)
    assert result.matched + result.extra + result.ambiguous + result.duplicates == len(copy)


@settings(max_examples=100, deadline=None)
@given(STORE_KEYS, st.randoms(use_true_random=False))
def test_any_permutation_subset_or_flattening_joins_back(store, random):
    order = list(range(len(store)))
    random.shuffle(order)
    subset = order[:random.randint(0, len(order))]
    for copy in ([store[n] for n in order], [store[n] for n in subset]):
        rows = join(store, copy).rows
        expected = np.full(len(store), -1)
        expected[[store.index(k) for k in copy]] = np.arange(len(copy))
        np.testing.assert_array_equal(rows, expected)
    flat = [store[n].rsplit("/", 1)[-1] + ".jpg" for n in order]
    result = join(store, flat)
    for n in range(len(store)):
        name = store[n].rsplit("/", 1)[-1]
        unique = sum(s.rsplit("/", 1)[-1] == name for s in store) == 1
        assert result.rows[n] == (order.index(n) if unique else -1)


def test_conflicts_are_counted_and_named():
    store = ["n01/a", "n02/a", "n01/b", "n01/c", "n01/d"]
    copy = ["a.jpg", "n01/b", "b", "c", "c.png", "n01/d", "zz"]
    result = join(store, copy)
    assert result.rows.tolist() == [-1, -1, -1, -1, 5]
    assert result.copy_status.tolist() == [AMBIGUOUS, DUPLICATE, DUPLICATE, DUPLICATE,
                                           DUPLICATE, MATCHED, EXTRA]
    assert (result.matched, result.missing, result.extra, result.ambiguous,
            result.duplicates, result.by_suffix) == (1, 4, 1, 1, 4, 0)
    assert result.examples["ambiguous"] == ["a"] and result.examples["extra"] == ["zz"]
    assert result.examples["missing"] == ["n01/a", "n02/a", "n01/b", "n01/c"]
    lines = result.findings()
    assert lines[0] == "matched: 1 of 5 store images"
    assert [line.split(":")[0] for line in lines] == ["matched", "missing", "extra", "ambiguous",
                                                      "duplicate"]
    assert "'zz'" in lines[2]


def test_a_flat_copy_matches_by_suffix():
    store = ["train/n01/x_1", "train/n02/x_2"]
    result = join(store, ["x_2.JPEG", "n01/x_1.jpeg"])
    assert result.rows.tolist() == [1, 0] and result.by_suffix == 2
    assert result.findings() == ["matched: 2 of 2 store images (2 by a trailing part of their "
                                 "key)"]


def test_store_keys_must_be_unique():
    with pytest.raises(ArgumentError, match=r"store_keys: 'n01/a' is the key of rows 0 and 2"):
        join(["n01/a.jpg", "b", "n01/a.png"], ["b"])


def test_empty_sides():
    assert join(["a"], []).missing == 1
    assert join([], ["a"]).extra == 1


def test_the_specs_join_is_this_join():
    """docs/label-store.md writes the join out in plain Python for readers without this
    package; it must give the same rows."""
    import re
    from pathlib import Path

    spec = (Path(__file__).parents[1] / "docs" / "label-store.md").read_text()
    code = re.search(r"```python\n(def join\(store_keys, copy_keys\):.*?)```", spec, re.S)
    namespace = {}
    exec(code.group(1), namespace)  # noqa: S102 - our own documentation

    @settings(max_examples=200, deadline=None)
    @given(store_and_copy())
    def agrees(case):
        store, copy = case
        assert namespace["join"](store, normalize_keys(copy)) == join(store, copy).rows.tolist()
    agrees()
