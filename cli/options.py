"""The typed click options every command shares: numbers with their bounds, epoch lists, the
shared option decorators (``--workers``, ``--device``, ``--augment``, ...) and the options that
say how DATA's kind of source is read. A value out of range fails before the command runs, so
nothing is created for it."""
import math
from pathlib import Path

import click

from refinery_pipeline.core.errors import RefineryError
from refinery_pipeline.store.schema import MAX_PROB_BITS

WORKERS_HELP = ("decoding threads (FFCV's num_workers); on a GPU machine about its core count, "
                "e.g. 16")


class OptionValueError(click.BadParameter):
    """A value its option cannot take, worded like our other errors: option, value, fix."""

    def __init__(self, value, what: str, fix: str, param, ctx):
        super().__init__(what, ctx=ctx, param=param)
        self.value, self.fix = value, fix

    def format_message(self) -> str:
        name = self.param.opts[0] if self.param is not None else "value"
        return f"{name} {self.value}: {self.message}"


class _Bounded:
    """Mixin for click's range types: a value out of range, not a number, or not finite (nan,
    inf) fails before the command runs, so nothing is created for it."""

    def __init__(self, *args, fix: str = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fix = fix

    def convert(self, value, param, ctx):
        try:
            number = super().convert(value, param, ctx)
        except click.BadParameter:
            raise OptionValueError(value, "out of range" if self._is_number(value) else
                                   f"not {self.noun}", self._fix(), param, ctx) from None
        if isinstance(number, float) and not math.isfinite(number):
            raise OptionValueError(value, "not a finite number", self._fix(), param, ctx)
        return number

    def _is_number(self, value) -> bool:
        try:
            float(value)
            return True
        except (TypeError, ValueError):
            return False

    def _fix(self) -> str:
        if self.fix:
            return self.fix
        return f"give {self.noun} {self.bounds()}"

    def bounds(self) -> str:
        """``>= 1``, ``> 0``, ``in (0, 1]``: the range in words a user types."""
        low, high = (f"{x:g}" if isinstance(x, float) else x for x in (self.min, self.max))
        if high is None:
            return f"{'>' if self.min_open else '>='} {low}"
        if low is None:
            return f"{'<' if self.max_open else '<='} {high}"
        return f"in {'(' if self.min_open else '['}{low}, {high}{')' if self.max_open else ']'}"


class Count(_Bounded, click.IntRange):
    """An integer option with bounds (crops, classes, batches, epochs, pixels, seeds)."""
    noun = "an integer"


class Number(_Bounded, click.FloatRange):
    """A finite real option with bounds (learning rates, factors, temperatures)."""
    noun = "a number"


class EpochList(click.ParamType):
    """Comma-separated epochs in increasing order (``140,170``), each >= 1: an LR milestone list
    mistyped (``170,140``, ``0``, ``14O``) fails before anything runs."""
    name = "EPOCHS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        if value in (None, ""):
            return ()  # the default: no milestones
        fix = "give increasing epochs >= 1 separated by commas, e.g. 140,170"
        try:
            epochs = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            raise OptionValueError(value, "not a list of whole numbers", fix, param, ctx) from None
        if min(epochs) < 1 or list(epochs) != sorted(set(epochs)):
            raise OptionValueError(value, "not increasing epochs >= 1", fix, param, ctx)
        return epochs


# The numeric option types, defined once and shared by every command.
AT_LEAST_ONE = Count(min=1)
NON_NEGATIVE_COUNT = Count(min=0)
SEED = Count(min=0, max=2**32 - 1)
PIXELS = Count(min=8)  # crop sizes: no network takes a smaller input
POSITIVE = Number(min=0, min_open=True)
NON_NEGATIVE = Number(min=0)
FRACTION = Number(min=0, max=1)
FACTOR = Number(min=0, max=1, min_open=True)  # a decay factor: (0, 1]
SMOOTHING = Number(min=0, max=1, max_open=True)  # label smoothing 1 leaves no label
PROB_BITS = Count(min=0, max=MAX_PROB_BITS)  # stored probabilities: multiples of 2^-N


# Options several commands share, defined once.
workers_option = click.option("--workers", default=2, type=AT_LEAST_ONE, help=WORKERS_HELP)


def _checked_device(ctx, param, value):
    """``--device``: a name torch does not know, or a device this machine lacks, fails before
    the command runs, so nothing is converted or created for it."""
    from refinery_pipeline.core.devices import device_problem
    problem = device_problem(value)
    if problem is not None:
        raise OptionValueError(value, *problem, param, ctx)
    return value


device_option = click.option("--device", default="auto", callback=_checked_device,
                             help="torch device: auto (the local CUDA device, else cpu), cpu, "
                                  "cuda, cuda:1, ...")
AUGMENT_HELP = ("training recipe after crop and flip, one step per --augment, names as in "
                "torchvision v2: trivialaugment, randaugment:N:M, erasing:P, mixup:ALPHA, "
                "cutmix:ALPHA")


def augment_option(help_text: str):
    """``--augment``, repeatable; parsed by :meth:`.augment.Recipe.parse` in the command,
    before anything is created, so a bad value leaves nothing behind."""
    return click.option("--augment", multiple=True, show_default="crop and flip only",
                        help=help_text)


# Every command that loads weights: a checkpoint is read as data unless its user trusts it.
trust_checkpoint_option = click.option(
    "--trust-checkpoint", is_flag=True,
    help="load weights files that run code to load (pickled objects beyond tensors and plain "
         "data); only for files from someone you trust")


MAX_RESOLUTION_HELP = ("cap each image's longer side when converting a DATA tree (FFCV's "
                       "ImageNet recipe: 256 to 512); decode memory is --workers x the largest "
                       "stored image")


def max_resolution_option(show_default: str):
    """``--max-resolution``: the stored frame a tree converts to (crop boxes are drawn in it)."""
    return click.option("--max-resolution", default=None, type=NON_NEGATIVE_COUNT,
                        show_default=show_default, help=MAX_RESOLUTION_HELP)


cache_dir_option = click.option("--cache-dir", default=None,
                                show_default="$REFINERY_CACHE, else ~/.cache/refinery",
                                help="where DATA (a tree, shards, a table...) is converted to "
                                     ".beton, once")

# Options of DATA's kind of source (refinery_pipeline.sources.open_source), by setting name.
SOURCE_OPTIONS = {
    "split": ("--split", "the split of a tree (DATA/<split>/) or of a Hugging Face DatasetDict",
              "train"),
    "key_column": ("--key-column", "Hugging Face table: the column naming each image (its "
                   "key)", "file_name, path or __key__, else the image column's paths"),
    "image_column": ("--image-column", "Hugging Face table: the column of encoded images",
                     "the first Image column"),
    "label_column": ("--label-column", "Hugging Face table or CSV list: the column of class "
                     "labels (a CSV's holds class names)", "a ClassLabel column, else label"),
    "path_column": ("--path-column", "CSV list: the column of image paths",
                    "path, file, file_name, filename, image or image_path"),
    "classes": ("--classes", "WebDataset shards: the class names their cls numbers index, "
                "comma-separated or a text file with one per line", "the numbers themselves"),
}


def source_options(command=None, *, split: bool = True):
    """``--split``, ``--key-column``, ... : how DATA's kind of source is read. ``split=False``
    leaves out ``--split``, for a command whose DATA is the training split by definition
    (``refine train``: ``source_options(split=False)``)."""
    if command is None:
        return lambda command: source_options(command, split=split)
    for name, (option, help_text, default) in reversed(SOURCE_OPTIONS.items()):
        if name != "split" or split:
            command = click.option(option, name, default=None, show_default=default,
                                   help=help_text)(command)
    return command


def given_source_options(data, **given) -> dict:
    """The source options given on the command line, each checked against DATA's kind (an
    option the kind does not take is refused, naming it); ``split`` (and ``--cache-dir``) are
    left to :func:`open_dataset`."""
    import inspect

    from refinery_pipeline.sources import BUILDERS, source_kind
    from refinery_pipeline.sources.dataset import is_beton
    given = {name: value for name, value in given.items() if value is not None}
    kind = "beton" if is_beton(data) else source_kind(data)
    accepted = inspect.signature(BUILDERS[kind]).parameters
    for name, value in given.items():
        if name not in accepted:
            raise RefineryError(f"{SOURCE_OPTIONS[name][0]} {value}: {data} is a {kind} source, "
                                "which has no such setting; drop the option")
    given.pop("split", None)
    if "classes" in given:
        given["classes"] = _class_names(given["classes"])
    return given


def _class_names(value: str) -> list:
    """``--classes``: names separated by commas, or a text file holding one per line."""
    path = Path(value)
    names = (path.read_text().splitlines() if path.is_file() else value.split(","))
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise RefineryError(f"--classes {value}: names no class; give names separated by commas "
                            "or a file with one per line")
    return names
