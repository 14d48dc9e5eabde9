"""WordNet category labels: the paper's taxonomy-based refined categories (Table 5's second row).

Every image of class ``c`` is labelled by one distribution over the classes, drawn from the
Wu-Palmer similarity of the classes' WordNet 3.0 noun synsets (the paper's [34], [35]); the
pixels play no part. The classes must be named by WordNet noun ids (``n01440764``), as ImageNet's
and its subsets' (Imagenette, Tiny-ImageNet) class folders are.

How similarities become a label the paper does not say. Here row ``c`` is
``softmax(wup(c, .) / temperature)``: the "soft labels" of Bertinetto et al. (*Making Better
Mistakes*, CVPR 2020), ``softmax(-beta * d)`` over a hierarchy distance, with ``d = 1 - wup`` and
``beta = 1 / temperature``. Why this form: the own class always keeps the largest share (its
similarity is 1, every other class's is below), so the target's arg-max is the ground truth as
for the visual category labels; close relatives (dog breeds) share mass and distant classes get
next to none; and one knob sets how far the label spreads. The default, 0.1, leaves an
Imagenette class 79-99% of its mass and a Tiny-ImageNet-200 class 27% on average (its 200
classes have many near relatives); ``--wordnet-temperature`` chooses another spread.

WordNet comes through nltk's reader (a maintained implementation of Wu-Palmer, not ours), over
the first database found: ``$REFINERY_WORDNET`` (a WordNet 3.0 ``dict`` directory), nltk's own
``corpora/wordnet``, or Debian's ``wordnet-base`` package (``/usr/share/wordnet``, which
``.ci/install`` installs). Debian's package lacks the ``lexnames`` file nltk's reader opens, and
nltk (3.9+) reads only files under its data path that are neither links nor outside that path,
so a database without ``lexnames`` is copied once (28 MB) into a cache directory with the file
written from WordNet's fixed list (``lexnames(5WN)``).
"""
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .dataset import default_cache_dir
from .errors import DataSetError, RefineryError
from .validators import positive_number, refuse

DEFAULT_TEMPERATURE = 0.1
WORDNET_ENV = "REFINERY_WORDNET"
DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_VERSION = "3.0"
WNID = re.compile(r"^n(\d{8})$")
# WordNet's lexicographer files, in file-number order (lexnames(5WN)); the syntactic category
# is 1 noun, 2 verb, 3 adjective, 4 adverb.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl")
_CATEGORY_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_DATABASE_FILES = ("data.noun", "index.noun")  # what a WordNet dict directory must hold


class WordNetError(RefineryError):
    """WordNet is missing, of another version, or does not know a class."""


def lexnames_text() -> str:
    """The ``lexnames`` file of WordNet 3.0: ``NN<TAB>name<TAB>category`` per line."""
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY_NUMBER[name.split('.')[0]]}\n"
                   for i, name in enumerate(LEXNAMES))


def cache_root() -> Path:
    """Where a prepared copy of a database without ``lexnames``, and similarities, are kept:
    under refinery's cache (``$REFINERY_CACHE``, else ``~/.cache/refinery``)."""
    return default_cache_dir() / "wordnet"


def _is_database(directory: Path) -> bool:
    return all((Path(directory) / f).is_file() for f in _DATABASE_FILES)


def _database_dir() -> Path | None:
    """The first WordNet dict directory of ``$REFINERY_WORDNET`` or Debian's; None if neither."""
    named = os.environ.get(WORDNET_ENV)
    if named:
        if not _is_database(named):
            raise WordNetError(f"{named}: ${WORDNET_ENV} names no WordNet database (no data.noun "
                               "and index.noun); point it at WordNet 3.0's dict directory")
        return Path(named)
    if _is_database(DEBIAN_WORDNET):
        return DEBIAN_WORDNET
    return None


def _readable_copy(database: Path) -> Path:
    """``database`` itself if it has ``lexnames``, else a cached copy that has it (made once,
    atomically: concurrent ranks see a whole copy or none)."""
    if (database / "lexnames").is_file():
        return database
    digest = hashlib.sha256(str(database.resolve()).encode()).hexdigest()[:12]
    target = cache_root() / f"dict-{digest}"
    if not (target / "lexnames").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
        for f in database.iterdir():
            if f.is_file():
                shutil.copyfile(f, staging / f.name)  # real files: nltk refuses links
        (staging / "lexnames").write_text(lexnames_text())
        try:
            staging.rename(target)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _open_reader(root: Path):
    """nltk's reader of the WordNet 3.0 directory ``root``, without its multilingual version
    mapping (which looks for nltk's own copy to map from: this database is the 3.0 it maps to)."""
    import nltk
    from nltk.corpus.reader import WordNetCorpusReader

    class WordNet30Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None

    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))  # nltk (3.9+) reads only under its data path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return WordNet30Reader(str(root), None)


@lru_cache(maxsize=None)
def wordnet_reader():
    """nltk's WordNet 3.0 reader over the first database found (see the module docstring).

    Returns
    -------
    nltk.corpus.reader.WordNetCorpusReader

    Raises
    ------
    WordNetError
        No database was found, or it is not WordNet 3.0.
    """
    database = _database_dir()
    if database is not None:
        reader = _open_reader(_readable_copy(database))
        where = database
    else:
        reader, where = _nltk_wordnet(), "nltk's corpora/wordnet"
    if reader.get_version() != WORDNET_VERSION:
        raise WordNetError(f"{where}: WordNet {reader.get_version()}, not {WORDNET_VERSION} "
                           f"(ImageNet's class ids are WordNet 3.0 offsets); set "
                           f"${WORDNET_ENV} to a WordNet 3.0 dict directory")
    return reader


def _nltk_wordnet():
    """nltk's own downloaded WordNet, if there is one."""
    import nltk
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        raise WordNetError(f"WordNet {WORDNET_VERSION} not found (looked in ${WORDNET_ENV}, "
                           f"{DEBIAN_WORDNET} and nltk's data); install it with `apt-get install "
                           "wordnet-base` or `python -m nltk.downloader wordnet`, or set "
                           f"{WORDNET_ENV}=DIR") from None
    from nltk.corpus import wordnet
    return wordnet


def class_synsets(classes, where: str = "the data set") -> list:
    """The WordNet noun synset of each class, named by its id (``n02123394``).

    Parameters
    ----------
    classes : sequence of str
        Class names in label order.
    where : str
        The data set, for the error message.

    Raises
    ------
    DataSetError
        A class is not named by a WordNet noun id, or WordNet 3.0 has no such noun.
    """
    reader = wordnet_reader()
    synsets = []
    for name in classes:
        match = WNID.match(name)
        if match is None:
            raise DataSetError(f"{where}: class {name!r} is not a WordNet noun id (n########); "
                               "WordNet category labels need classes named as ImageNet's are, "
                               "else use --label-mode category-visual")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns, then returns None, for no such noun
            synset = reader.synset_from_pos_and_offset("n", int(match.group(1)))
        if synset is None:
            raise DataSetError(f"{where}: class {name!r} is no noun of WordNet "
                               f"{WORDNET_VERSION}; rename it to its WordNet 3.0 id, or use "
                               "--label-mode category-visual")
        synsets.append(synset)
    return synsets


def wup_similarities(classes, where: str = "the data set") -> np.ndarray:
    """Wu-Palmer similarity of every pair of classes, ``(C, C)`` float64, 1 on the diagonal.

    nltk takes about 0.5 ms a pair, so the matrix is symmetric-filled from its upper triangle
    (Wu-Palmer is symmetric) and cached by class list: ImageNet-1k's 500k pairs take minutes
    once, then nothing."""
    names = list(classes)
    key = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    cached = cache_root() / f"wup-{key}.npy"
    if cached.is_file():
        return np.load(cached)
    synsets = class_synsets(names, where)
    sims = np.eye(len(names))
    for i, a in enumerate(synsets):
        for j in range(i + 1, len(names)):
            sims[i, j] = sims[j, i] = a.wup_similarity(synsets[j])
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = cached.with_suffix(f".{os.getpid()}.npy")
    np.save(staging, sims)
    staging.replace(cached)
    return sims


def wordnet_category_table(classes, temperature: float = DEFAULT_TEMPERATURE,
                           where: str = "the data set") -> torch.Tensor:
    """The taxonomy-based category labels: row ``c`` is ``softmax(wup(c, .) / temperature)``.

    Parameters
    ----------
    classes : sequence of str
        WordNet noun ids, in label order.
    temperature : float
        Spread of each label: small keeps the mass on the class, large spreads it over its
        WordNet relatives (see the module docstring for the choice).
    where : str
        The data set, for error messages.

    Returns
    -------
    torch.Tensor
        ``(C, C)`` float32, each row a distribution whose largest entry is its own class.

    Raises
    ------
    ArgumentError
        ``temperature`` not a finite number above 0, ``classes`` no list of names.
    """
    temperature = positive_number("temperature", temperature, "pass a positive temperature "
                                  f"(e.g. {DEFAULT_TEMPERATURE})")
    names = [] if isinstance(classes, str) or not hasattr(classes, "__iter__") else list(classes)
    if not names or not all(isinstance(name, str) for name in names):
        raise refuse("classes", classes, "must be a non-empty list of class names (WordNet "
                     "noun ids)", "pass store.classes")
    sims = torch.from_numpy(wup_similarities(names, where))
    return torch.softmax(sims / temperature, dim=1).float()
