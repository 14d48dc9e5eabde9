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

nltk parses the files as it reads them and has no error of its own for a damaged database, so
any failure inside its reader is reported as one :class:`WordNetError` naming the user's
directory (:class:`DatabaseErrors`), never the cached copy nltk actually reads.
"""
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import DataSetError, RefineryError, first_line
from ..core.validators import positive_number, refuse
from ..sources.data_cache import default_cache_dir

if TYPE_CHECKING:  # torch loads when a table is made: `refine --help` reads DEFAULT_TEMPERATURE
    import torch

DEFAULT_TEMPERATURE = 0.1
WORDNET_ENV = "REFINERY_WORDNET"
DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_VERSION = "3.0"
WNID = re.compile(r"^n(\d{8})$")
ROOT_NOUN_OFFSET = 1740  # entity.n.01, the first synset of WordNet 3.0's data.noun
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
_PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
# what nltk's reader opens in a WordNet dict directory (its ``lexnames`` is written if missing)
_DATABASE_FILES = tuple(f for pos in _PARTS_OF_SPEECH
                        for f in (f"data.{pos}", f"index.{pos}", f"{pos}.exc"))
REINSTALL = "`apt-get install --reinstall wordnet-base`"


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


def _missing_files(directory) -> list:
    return [f for f in _DATABASE_FILES if not (Path(directory) / f).is_file()]


def _is_database(directory: Path) -> bool:
    return not _missing_files(directory)


def _database_dir() -> Path | None:
    """The first WordNet dict directory of ``$REFINERY_WORDNET`` or Debian's; None if neither."""
    named = os.environ.get(WORDNET_ENV)
    if named:
        missing = _missing_files(named)
        if len(missing) == len(_DATABASE_FILES):
            raise WordNetError(f"{named}: ${WORDNET_ENV} names no WordNet database (no data.noun "
                               "and index.noun); point it at WordNet 3.0's dict directory")
        if missing:
            raise WordNetError(f"{named}: ${WORDNET_ENV} names an incomplete WordNet database "
                               f"(no {', '.join(missing)}); point it at WordNet 3.0's whole dict "
                               "directory")
        return Path(named)
    if _is_database(DEBIAN_WORDNET):
        return DEBIAN_WORDNET
    return None


def _readable_copy(database: Path) -> Path:
    """``database`` itself if it has ``lexnames``, else a cached copy that has it (made once,
    atomically: concurrent ranks see a whole copy or none). The copy is named by the source's
    path and its files' sizes and times, so a database repaired or replaced in place is copied
    again rather than read from a copy of its broken state."""
    if (database / "lexnames").is_file():
        return database
    files = sorted(f for f in database.iterdir() if f.is_file())
    identity = [str(database.resolve())] + [f"{f.name}|{f.stat().st_size}|{f.stat().st_mtime_ns}"
                                            for f in files]
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:12]
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
        copy = _readable_copy(database)
        with DatabaseErrors(database, copy):
            reader = _open_reader(copy)
            version = reader.get_version()
        where = database
    else:
        reader, where = _nltk_wordnet(), "nltk's corpora/wordnet"
        with DatabaseErrors(where):
            version = reader.get_version()  # loads nltk's lazy reader
    if version is None:
        raise WordNetError(f"{where}: its data files name no WordNet version, so they are not "
                           f"WordNet's; set ${WORDNET_ENV} to a WordNet {WORDNET_VERSION} dict "
                           f"directory (Debian's: {REINSTALL})")
    if version != WORDNET_VERSION:
        raise WordNetError(f"{where}: WordNet {version}, not {WORDNET_VERSION} "
                           f"(ImageNet's class ids are WordNet 3.0 offsets); set "
                           f"${WORDNET_ENV} to a WordNet 3.0 dict directory")
    reader.refinery_errors = DatabaseErrors(where, copy if database is not None else None)
    return reader


class DatabaseErrors:
    """Context manager: any failure of nltk's reader inside it (``StopIteration``, a
    ``UnicodeDecodeError``, a missing file, a line that does not parse) is one
    :class:`WordNetError` naming the user's database, never the cached copy nltk reads.

    nltk parses the files as it goes and has no error of its own for a damaged database, so
    every exception it raises there means the files are not WordNet's."""

    def __init__(self, source, copy: Path = None):
        self.source, self.copy = str(source), copy

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, RefineryError) or not isinstance(exc, Exception):
            return False
        reason = first_line(exc, limit=200, typed=True)  # nltk may quote a whole line
        if self.copy is not None:
            reason = reason.replace(str(self.copy), self.source)
        raise WordNetError(f"{self.source}: not a readable WordNet {WORDNET_VERSION} database "
                           f"({reason}); restore it (Debian's: "
                           f"{REINSTALL}) or set ${WORDNET_ENV} to an intact WordNet "
                           f"{WORDNET_VERSION} dict directory") from None

    def damage(self, reader, offset: int) -> str | None:
        """Why noun ``offset`` (a byte offset into ``data.noun``) was not found if the database
        is to blame rather than the class: the file ends before it, or WordNet's root noun
        (``entity``) no longer reads either. None for a class WordNet lacks."""
        root = getattr(getattr(reader, "root", None), "path", None)
        data = Path(root) / "data.noun" if root else None
        if data is not None and data.is_file() and offset >= data.stat().st_size:
            indexed = _last_indexed_noun(reader)
            if indexed >= data.stat().st_size:
                return (f"data.noun ends at byte {data.stat().st_size}, before the nouns its "
                        f"index.noun lists (up to offset {indexed}), so it is truncated")
        with warnings.catch_warnings(), self:
            warnings.simplefilter("ignore")
            root_noun = reader.synset_from_pos_and_offset("n", ROOT_NOUN_OFFSET)
        if root_noun is None or root_noun.name() != "entity.n.01":
            return "data.noun no longer holds WordNet's root noun 'entity' at its offset"
        return None


def _last_indexed_noun(reader) -> int:
    """The largest noun offset the reader's ``index.noun`` lists (0 if unknown): the least size
    of an intact ``data.noun``."""
    offsets = getattr(reader, "_lemma_pos_offset_map", {})  # nltk's parsed index files
    return max((o for by_pos in offsets.values() for o in by_pos.get("n", ())), default=0)


def _errors_of(reader) -> DatabaseErrors:
    """The reader's :class:`DatabaseErrors` (naming its database), set by :func:`wordnet_reader`."""
    return getattr(reader, "refinery_errors", None) or DatabaseErrors("WordNet")


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
    errors = _errors_of(reader)
    synsets = []
    for name in classes:
        match = WNID.match(name)
        if match is None:
            raise DataSetError(f"{where}: class {name!r} is not a WordNet noun id (n########); "
                               "WordNet category labels need classes named as ImageNet's are, "
                               "else use --label-mode category-visual")
        with warnings.catch_warnings(), errors:
            warnings.simplefilter("ignore")  # nltk warns, then returns None, for no such noun
            synset = reader.synset_from_pos_and_offset("n", int(match.group(1)))
        damage = errors.damage(reader, int(match.group(1))) if synset is None else None
        if damage:
            raise WordNetError(f"{errors.source}: looking up class {name}: {damage}; restore it "
                               f"(Debian's: {REINSTALL}) or set ${WORDNET_ENV} to an intact "
                               f"WordNet {WORDNET_VERSION} dict directory")
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
    with _errors_of(wordnet_reader()):  # hypernym paths read more of the database
        for i, a in enumerate(synsets):
            for j in range(i + 1, len(names)):
                sims[i, j] = sims[j, i] = a.wup_similarity(synsets[j])
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = cached.with_suffix(f".{os.getpid()}.npy")
    np.save(staging, sims)
    staging.replace(cached)
    return sims


def wordnet_category_table(classes, temperature: float = DEFAULT_TEMPERATURE,
                           where: str = "the data set") -> "torch.Tensor":
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
    import torch
    sims = torch.from_numpy(wup_similarities(names, where))
    return torch.softmax(sims / temperature, dim=1).float()
