"""``refine``: precompute, train, inspect, demo. Bad input ends in one line naming the fix."""
import contextlib
import functools
import json
import math
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import click

from refinery_pipeline.plan.crop_plan import (DEFAULT_CROPS_PER_IMAGE, DEFAULT_SLOT_POLICY,
                                              SLOT_POLICIES)
from refinery_pipeline.core.errors import (RefineryError, RefineryWarning, storage_error_message,
                                           storage_io_errors)
from refinery_pipeline.store.label_store import (DEFAULT_PROB_BITS, DEFAULT_REST, DEFAULT_TOP_K,
                                                 MAX_PROB_BITS, REST_POLICIES)
from refinery_pipeline.core.option_relevance import check_options_used
from refinery_pipeline.training.schedule import LR_SCHEDULERS
from refinery_pipeline.training.wordnet import DEFAULT_TEMPERATURE

WORKERS_HELP = ("decoding threads (FFCV's num_workers); on a GPU machine about its core count, "
                "e.g. 16")


def _one_line_warnings():
    """Our warnings read like our errors: ``warning: <message>``, no source line."""
    default = warnings.formatwarning

    def format_warning(message, category, *args, **kwargs):
        if issubclass(category, RefineryWarning):
            return f"warning: {message}\n"
        return default(message, category, *args, **kwargs)
    warnings.formatwarning = format_warning


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
    """``--augment``, repeatable; parsed by :meth:`refinery_pipeline.plan.recipe.Recipe.parse`
    in the command, before anything is created, so a bad value leaves nothing behind."""
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

    from refinery_pipeline.sources.dataset import is_beton
    from refinery_pipeline.sources import BUILDERS, source_kind
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


def _usage_error_line(exc: click.UsageError) -> str:
    """Any usage error (bad value, unknown option, missing argument) as one line: what is wrong,
    then the fix, or where to read the options."""
    message = exc.format_message().rstrip(".")
    command = exc.ctx.command_path if exc.ctx is not None else "refine"
    fix = getattr(exc, "fix", None) or f"see '{command} --help'"
    return f"error: {message}; {fix}"


class OneLineUsageErrors(click.Group):
    """click prints a usage error as a usage block and an ``Error:`` line; ours are one
    ``error:`` line (exit code 2), as for every other bad input."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


class _OneLineUsageError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(self.message, err=True)


@contextlib.contextmanager
def _one_line_usage_errors():
    """Re-raise click's usage errors as one-line ones; help requests (no arguments) pass."""
    try:
        yield
    except click.UsageError as exc:
        if isinstance(exc, _help_requests()):
            raise
        raise _OneLineUsageError(_usage_error_line(exc)) from None


def _help_requests() -> tuple:
    """``refine`` with no command prints the help (click >= 8.2 raises it as a usage error)."""
    no_args = getattr(click.exceptions, "NoArgsIsHelpError", None)
    return (no_args,) if no_args else ()


def friendly_errors(about: str = None):
    """Turn RefineryError and storage failures into ``error: <message>`` and exit code 2, with no
    traceback.

    ``about`` names the command's parameter holding the location (a store, an output) that a
    storage error without a file name of its own (a full disk, a dropped connection) concerns.
    """
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except RefineryError as exc:
                _fail(str(exc))
            except storage_io_errors() as exc:  # read-only, full, missing, network down
                _fail(storage_error_message(exc, kwargs.get(about) if about else None))
        return wrapper
    return decorate


def _fail(message: str):
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(cls=OneLineUsageErrors,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="refinery")
def cli():
    """Offline Label Refinery: label every crop once, replay crops and labels while training."""
    _one_line_warnings()


@cli.command()
@click.argument("data")
@click.argument("store", type=click.Path())
@click.option("--refinery", "arch", multiple=True, show_default="read from each checkpoint",
              help="architecture: a torchvision name, or timm's (timm/NAME; a name both have is "
                   "torchvision's); for an ensemble once (every member) or once per --weights")
@click.option("--weights", required=True, multiple=True, type=click.Path(),
              help="refinery checkpoint (a `refine train` model.pt, a state_dict, or a "
                   "torchvision-reference or timm training checkpoint), or torchvision weights by "
                   "name, e.g. ResNet50_Weights.IMAGENET1K_V2; repeat it for an ensemble, whose "
                   "label is the mean of the members' probabilities (the order is recorded)")
@click.option("--crops-per-image", "-K", default=DEFAULT_CROPS_PER_IMAGE, type=AT_LEAST_ONE,
              help="crops sampled per image; a student of E epochs needs K >= E for parity")
@click.option("--top-k", default=DEFAULT_TOP_K, type=AT_LEAST_ONE,
              help="classes stored per crop, capped at the number of classes (fewer cost "
                   "accuracy against an online refinery: see README, choosing K and top-k)")
@click.option("--seed", default=0, type=SEED, help="crop plan seed")
@click.option("--input-size", default=None, type=PIXELS,
              show_default="the checkpoint's; required when it records none, e.g. a bare "
                           "state_dict",
              help="crop size fed to the refinery, in pixels")
@click.option("--bn-mode", type=click.Choice(["train", "eval"]), default="train",
              help="refinery BatchNorm mode (paper: train)")
@click.option("--temperature", default=1.0, type=POSITIVE, help="softmax temperature")
@click.option("--batch-size", default=512, type=AT_LEAST_ONE,
              help="crops per refinery forward pass")
@click.option("--chunk-size", default=None, type=AT_LEAST_ONE, show_default="chosen from K",
              help="images per store chunk")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the refinery")
@click.option("--soft-static", is_flag=True,
              help="also store the label of the whole (centred) image, for the paper's Table 4")
@click.option("--prob-bits", default=DEFAULT_PROB_BITS, type=PROB_BITS,
              help="store probabilities as multiples of 2^-N, still float16 (11: float16's own "
                   "step at p >= 0.5; fewer bits, smaller stores); 0 keeps them unrounded")
@augment_option(AUGMENT_HELP)
@max_resolution_option("a resumed STORE's, else 0: keep each image's size")
@workers_option
@device_option
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              help="local: this process (or each torchrun rank); ray: a pool of Ray actors "
                   "(pip install refinery[ray]), each labelling and writing whole chunks; the "
                   "same store, byte for byte")
@click.option("--ray-address", default=None, show_default="a local cluster",
              help="--engine ray: an existing Ray cluster (auto, HOST:6379 or ray://HOST:10001)")
@click.option("--ray-actors", default=1, type=AT_LEAST_ONE,
              help="--engine ray: actors labelling at once (those waiting for resources join "
                   "when placed)")
@click.option("--ray-gpus-per-actor", default=0.0, type=NON_NEGATIVE,
              help="--engine ray: GPUs each actor reserves (and labels on)")
@click.option("--ray-cpus-per-actor", default=1.0, type=NON_NEGATIVE,
              help="--engine ray: CPUs each actor reserves (decoding threads: --workers)")
@trust_checkpoint_option
@cache_dir_option
@source_options
@friendly_errors(about="store")
def precompute(data, store, arch, weights, crops_per_image, top_k, seed, input_size, bn_mode,
               temperature, batch_size, chunk_size, compile_, soft_static, prob_bits, augment,
               max_resolution, workers, device, engine, ray_address, ray_actors,
               ray_gpus_per_actor, ray_cpus_per_actor, trust_checkpoint, cache_dir, split,
               key_column, image_column, label_column, path_column, classes):
    """Label K planned crops of every image in DATA and write the label store STORE.

    DATA is any form of the data set with labels: an ImageFolder tree, a list of paths with a
    label column, WebDataset shards with cls members, a Hugging Face dataset, or a .beton. It
    is converted once to a .beton (JPEGs kept byte for byte), and the store records each
    image's key and the SHA-256 of its bytes, so any copy of the data finds its labels."""
    from refinery_pipeline.plan.recipe import Recipe
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.sources.dataset import check_cap_applies, conversion_options
    from refinery_pipeline.sources.data_cache import open_dataset
    from refinery_pipeline.labelling.precompute import check_labelled, precompute as run
    from refinery_pipeline.models.registry import OptionNames
    from refinery_pipeline.labelling.refinery import load_refinery, member_archs
    from refinery_pipeline.training.train import resolve_device

    recipe, archs = Recipe.parse(augment), member_archs(weights, arch)  # before any work
    ray_options = _ray_options(engine, compile_, ray_address, ray_actors, ray_gpus_per_actor,
                               ray_cpus_per_actor)
    check_cap_applies(data, max_resolution)
    read_as = given_source_options(data, split=split, key_column=key_column,
                                   image_column=image_column, label_column=label_column,
                                   path_column=path_column, classes=classes)
    options = conversion_options(_recorded_source(store), max_resolution)  # a resume's frame
    dataset = open_dataset(data, split or "train", cache_dir, options, num_workers=workers,
                           **read_as)
    check_labelled(dataset)  # a .beton converted without labels: before loading weights
    refinery = load_refinery(weights, archs, dataset.classes, input_size, bn_mode=bn_mode,
                             temperature=temperature, device=resolve_device(device),
                             compile=compile_, trust_checkpoint=trust_checkpoint,
                             option_names=OptionNames("--refinery", "--input-size"))
    plan = CropPlan(seed=seed, crops_per_image=crops_per_image, augment=recipe.names())
    # a storage failure keeps finished chunks: friendly_errors
    s = run(dataset, store, refinery, plan, top_k, batch_size, chunk_size, workers,
            soft_static=soft_static, prob_bits=prob_bits, ray_options=ray_options)
    from refinery_pipeline.core.distributed import is_main
    if is_main():
        busy = (f", {s.chunks_claimed_elsewhere} being written by another process"
                if s.chunks_claimed_elsewhere else "")
        click.echo(f"{s.crops:,} crops labelled in {s.seconds:.1f} s "
                   f"({s.crops_per_second:,.0f} crops/s); {s.chunks_written} chunks written, "
                   f"{s.chunks_skipped} already done{busy}; store {s.store_bytes / 1e6:.2f} MB, "
                   f"{s.bytes_per_crop:.1f} bytes/crop")
        click.echo(f"pixels: {dataset.path} (the exact pixel source of these labels)"
                   + _passed_through(dataset))


def _ray_options(engine, compile_, address, actors, gpus_per_actor, cpus_per_actor):
    """``--engine ray``'s pool (None for the local engine); its options and ``--compile`` are
    refused in one line where they would do nothing or cannot work, before any data is read."""
    from refinery_pipeline.labelling.ray_engine import RayOptions
    options = RayOptions(address, actors, gpus_per_actor, cpus_per_actor)
    defaults = {"address": None, "actors": 1, "gpus_per_actor": 0.0, "cpus_per_actor": 1.0,
                "compile": False}
    check_options_used("precompute", SimpleNamespace(engine=engine, compile=compile_,
                                                     **options.__dict__), defaults)
    if engine != "ray":
        return None
    import importlib.util
    if importlib.util.find_spec("ray") is None:
        raise RefineryError("--engine ray: Ray is not installed; pip install 'refinery[ray]'")
    return options


def _passed_through(dataset) -> str:
    """``; N of M images are their source's own bytes``, where the sidecar counted them."""
    count = dataset.meta.get("passed_through")
    if count is None:
        return ""
    return (f"; {count:,} of {dataset.num_images:,} images are their source's own bytes (exact "
            "from the original files and byte-identical copies)")


def _open_store_data(data, store, cache_dir, workers: int = 2):
    """DATA of an existing STORE, a tree converted as the store's labels were made (so to the
    same .beton)."""
    from refinery_pipeline.sources.dataset import conversion_options
    from refinery_pipeline.sources.data_cache import open_dataset
    options = conversion_options(_recorded_source(store))
    return open_dataset(data, "train", cache_dir, options, num_workers=workers)


def _recorded_source(location):
    """The ``dataset.source`` an existing store records; None for a new store, or one that
    cannot be read (the command's own check of it names the problem)."""
    from refinery_pipeline.core.errors import StoreError
    from refinery_pipeline.store.label_store import LabelStore
    try:
        return LabelStore.open(location).dataset.source
    except (StoreError, TypeError, KeyError):
        return None


@cli.command()
@click.argument("data", type=click.Path(exists=True))
@click.option("--labels", default="none", help="label store, or 'none' for ground truth")
@click.option("--out", "out_dir", default="runs/student", type=click.Path(),
              help="run directory: metrics.jsonl, plot.png, last.pt, model.pt")
@click.option("--arch", default="resnet18",
              help="student architecture: a torchvision name, or timm's (timm/NAME, needs "
                   "refinery[timm]; a name both have is torchvision's)")
@click.option("--epochs", default=16, type=AT_LEAST_ONE, help="training epochs")
@click.option("--batch-size", default=256, type=AT_LEAST_ONE,
              help="crops per SGD step")
@click.option("--lr", default=0.4, type=POSITIVE,
              help="peak learning rate of SGD with Nesterov momentum 0.9")
@click.option("--weight-decay", "--wd", default=5e-4, type=NON_NEGATIVE,
              help="SGD weight decay (L2)")
@click.option("--warmup-epochs", "--lr-warmup-epochs", default=2.0, type=NON_NEGATIVE,
              help="linear warm-up from ~0 to --lr (fractions allowed)")
@click.option("--lr-scheduler", type=click.Choice(LR_SCHEDULERS), default="linear",
              help="decay after the warm-up: linear to 0, cosine to 0, step (every "
                   "--lr-step-size epochs) or multistep (at --lr-milestones)")
@click.option("--lr-step-size", default=30, type=AT_LEAST_ONE,
              help="step scheduler: epochs between decays")
@click.option("--lr-gamma", default=0.1, type=FACTOR,
              help="step and multistep schedulers: LR factor per decay")
@click.option("--lr-milestones", default="", type=EpochList(), show_default="none",
              help="multistep scheduler: the epochs at which the LR is multiplied by --lr-gamma, "
                   "e.g. 140,170 (the paper's recipe, torch's MultiStepLR)")
@click.option("--label-smoothing", default=0.0, type=SMOOTHING,
              help="ground-truth targets only (--labels none, no --teacher); refused otherwise")
@click.option("--label-mode", type=click.Choice(["soft", "hard", "static", "category-visual",
                                                 "category-wordnet"]),
              default="soft",
              help="stored soft labels, their arg-max, the whole-image (soft-static) label, "
                   "each class's mean stored label (the paper's visual category labels), or "
                   "each class's WordNet similarities (its taxonomy-based labels; classes named "
                   "by WordNet id, no --labels)")
@click.option("--wordnet-temperature", default=DEFAULT_TEMPERATURE, type=POSITIVE,
              help="category-wordnet: each class's label is softmax(Wu-Palmer similarity / "
                   "this); smaller keeps more mass on the class itself")
@click.option("--init", default=None, type=click.Path(), show_default="random",
              help="start the student from these weights (a checkpoint of --arch trained on "
                   "these classes, e.g. the refinery: the paper's Table 3 setting)")
@click.option("--teacher", multiple=True, type=click.Path(), show_default="none",
              help="online refinery: label every crop during training (a checkpoint, or "
                   "torchvision weights by name as for precompute --weights); repeat it for an "
                   "ensemble (the mean of the members' probabilities)")
@click.option("--teacher-arch", default=None, show_default="read from each checkpoint",
              help="the --teacher's architecture, for checkpoints that record none (a bare "
                   "state_dict); names as for --arch")
@click.option("--teacher-bn", type=click.Choice(["train", "eval"]), default="train",
              help="online refinery's BatchNorm mode (paper: train)")
@click.option("--teacher-crops", type=click.Choice(["fresh", "replay"]), default="fresh",
              help="online teacher on fresh random crops, or on the store's crops (parity)")
@click.option("--loss", type=click.Choice(["kl", "soft_ce", "reverse_kl", "l2"]), default="kl",
              help="loss between the student and the (stored or online) refinery labels")
@click.option("--adversarial-eta", default=0.0, type=NON_NEGATIVE, show_default="off",
              help="adversarial jittering (paper 3.1): also train on each crop moved by ETA x the "
                   "gradient of its loss, labelled by --teacher; watch adv_rms in the log")
@click.option("--adversarial-bn", type=click.Choice(["separate", "shared"]), default="separate",
              help="twins in a BatchNorm batch of their own, or in one batch with the natural "
                   "crops as the paper batches them (one more student pass per step)")
@click.option("--precise-bn", default=0, metavar="BATCHES", show_default="off",
              type=Count(min=0, fix="give the number of training batches to recompute BatchNorm "
                                    "statistics over (e.g. 100), or 0 for off"),
              help="before each evaluation, recompute BatchNorm statistics over BATCHES batches of "
                   "training crops (e.g. 100): for slow-momentum BN (MobileNetV3) on short "
                   "schedules")
@click.option("--rest", type=click.Choice(REST_POLICIES), default=DEFAULT_REST,
              help="where the probability mass outside the stored top-k goes: the top-k scaled "
                   "to sum to 1 (renormalize), or spread evenly over the other classes (uniform)")
@click.option("--slot-policy", type=click.Choice(SLOT_POLICIES), default=DEFAULT_SLOT_POLICY,
              help="each stored crop once before any repeats (cycle), or a random one per epoch")
@click.option("--res", default=None, type=PIXELS,
              show_default="the store's refinery input size, else 224",
              help="training crop size, in pixels")
@augment_option(AUGMENT_HELP + "; with --labels, the store's recipe is replayed and --augment "
                "must be omitted or equal it")
@max_resolution_option("the --labels store's, else 0: keep each image's size")
@workers_option
@click.option("--seed", default=0, type=SEED,
              help="student initialisation, fresh crops and slot order")
@click.option("--eval-every", default=1, type=AT_LEAST_ONE,
              help="evaluate every N epochs, and after the last")
@device_option
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the student and an online --teacher")
@click.option("--resume", is_flag=True, help="continue from OUT/last.pt")
@click.option("--allow-partial", is_flag=True, help="train on the finished chunks of a store")
@click.option("--allow-missing", is_flag=True,
              help="DATA is a copy lacking some of the --labels store's images (a keyed store): "
                   "train on those it holds instead of refusing it")
@click.option("--val", "val", default=None, type=click.Path(), show_default="DATA/val, or the "
              "'*val.beton' beside a '*train.beton'",
              help="the validation data (its classes named as the store's), for a DATA without "
                   "a validation split of its own")
@click.option("--skip-store-check", is_flag=True,
              help="do not check the store's chunks against their checksums while reading it; "
                   "accepted only after a passing `refine verify` of the same bytes")
@trust_checkpoint_option
@cache_dir_option
@source_options(split=False)
@friendly_errors(about="out_dir")
def train(data, labels, out_dir, arch, epochs, batch_size, lr, weight_decay, warmup_epochs,
          lr_scheduler, lr_step_size, lr_gamma, lr_milestones, label_smoothing, label_mode,
          wordnet_temperature, init, teacher, teacher_arch, teacher_bn, teacher_crops, loss,
          adversarial_eta, adversarial_bn, precise_bn, rest, slot_policy, res, augment,
          max_resolution, workers,
          seed, eval_every, device, compile_, resume, allow_partial, allow_missing, val,
          skip_store_check, trust_checkpoint, cache_dir, key_column, image_column, label_column,
          path_column, classes):
    """Train a student on DATA (ImageFolder with train/ and val/, or a *train.beton).

    With a --labels store that names its images, DATA may be any copy of its data set (another
    order, a subset with --allow-missing, a flat folder, a resized copy), joined by key; each
    epoch's log says how many crops were exact (the bytes the refinery decoded) and how many
    approximate. --label-column, --classes, ... say how such a copy is read, as for precompute.

    Writes OUT/metrics.jsonl, OUT/plot.png (see `refine plot`), OUT/last.pt and OUT/model.pt."""
    from refinery_pipeline.plan.recipe import Recipe
    from refinery_pipeline.core.distributed import is_main
    from refinery_pipeline.paper.plots import plot_runs, read_run
    from refinery_pipeline.training.train import fit
    from refinery_pipeline.training.config import TrainConfig

    recipe = Recipe.parse(augment)  # before the run directory exists
    read_as = given_source_options(data, key_column=key_column, image_column=image_column,
                                   label_column=label_column, path_column=path_column,
                                   classes=classes)
    # one teacher stays a plain path, as in the config.json of runs from before ensembles
    teacher = None if not teacher else teacher[0] if len(teacher) == 1 else tuple(teacher)
    cfg = TrainConfig(data=data, out_dir=out_dir, labels=None if labels == "none" else labels,
                      arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                      lr_scheduler=lr_scheduler, lr_step_size=lr_step_size, lr_gamma=lr_gamma,
                      lr_milestones=lr_milestones, label_smoothing=label_smoothing,
                      label_mode=label_mode, wordnet_temperature=wordnet_temperature, init=init,
                      teacher=teacher, teacher_arch=teacher_arch, teacher_bn=teacher_bn,
                      teacher_crops=teacher_crops, loss=loss,
                      adversarial_eta=adversarial_eta, adversarial_bn=adversarial_bn,
                      precise_bn=precise_bn, rest=rest,
                      slot_policy=slot_policy, res=res, augment=recipe.names(),
                      workers=workers, seed=seed,
                      eval_every=eval_every, device=device, compile=compile_, resume=resume,
                      allow_partial=allow_partial, allow_missing=allow_missing, val=val,
                      skip_store_check=skip_store_check,
                      trust_checkpoint=trust_checkpoint, cache_dir=cache_dir,
                      max_resolution=max_resolution, source_options=read_as)
    m = fit(cfg)
    if is_main():
        click.echo(f"val top-1 {m['val_top1']:.2f}  top-5 {m['val_top5']:.2f}; "
                   f"checkpoint {out_dir}/model.pt")
        click.echo(f"plot: {plot_runs([read_run(out_dir)], Path(out_dir) / 'plot.png')}")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", default=None, type=click.Path(),
              show_default="RUN/plot.png for one run, runs.png for several",
              help="image to write (.png, .pdf, .svg)")
@click.option("--name", "names", multiple=True, show_default="each run's directory name",
              help="legend name of each run, in order")
@click.option("--gap", is_flag=True,
              help="the train/validation gap of each run instead (from `refine evaluate RUN "
                   "--split train` and `--split val`): the paper's Fig. 1 and Figs. 4-6")
@friendly_errors(about="out")
def plot(runs, out, names, gap):
    """Plot accuracy per epoch and per class of one or several `refine train` RUNS (their --out
    directories): validation vs training crops, side by side in one figure."""
    from refinery_pipeline.paper.plots import figure_path, plot_gap, plot_runs, read_run
    if out is not None:
        figure_path(out)  # before reading any run
    if names and len(names) != len(runs):
        raise RefineryError(f"{len(names)} --name for {len(runs)} runs; give one per run or none")
    if not names:
        short = [Path(r).name for r in runs]
        names = short if len(set(short)) == len(short) else runs  # the paths where names clash
    loaded = [read_run(run, name) for run, name in zip(runs, names)]
    if gap:
        if any(run.classes != loaded[0].classes for run in loaded[1:]):
            raise RefineryError("runs trained on different classes cannot share the per-class "
                                "gap; plot them separately")
        default = Path(runs[0]) / "gap.png" if len(runs) == 1 else Path("gap.png")
        click.echo(f"plot: {plot_gap(runs, list(names), loaded[0].classes, out or default)}")
        return
    default = Path(runs[0]) / "plot.png" if len(runs) == 1 else Path("runs.png")
    figure = plot_runs(loaded, out or default)
    for run in loaded:
        last = run.evaluated[-1]
        click.echo(f"{run.name}: val top-1 {last['val_top1']:.2f} (epoch {last['epoch']})")
    click.echo(f"plot: {figure}")


@cli.command()
@click.argument("run", type=click.Path(exists=True))
@click.argument("data", required=False, type=click.Path(exists=True))
@click.option("--split", type=click.Choice(["val", "train"]), default="val",
              help="train: the training images themselves, for the train/validation gap")
@click.option("--res", default=None, type=PIXELS, show_default="the checkpoint's",
              help="crop side")
@click.option("--arch", default=None, show_default="read from the checkpoint",
              help="the model's architecture, for a checkpoint that records none (a bare "
                   "state_dict): a torchvision name, or timm's (timm/NAME)")
@click.option("--batch-size", default=256, type=AT_LEAST_ONE, help="images per batch")
@max_resolution_option("the run's own (its config.json), else 0: keep each image's size")
@workers_option
@device_option
@trust_checkpoint_option
@cache_dir_option
@friendly_errors(about="run")
def evaluate(run, data, split, res, arch, batch_size, max_resolution, workers, device,
             trust_checkpoint, cache_dir):
    """Top-1 of a trained model (a `refine train` RUN directory, or any checkpoint with DATA)
    on the centred square of every image of a split, as validation is evaluated; `--split
    train` gives the paper's overfitting gap. A run directory keeps RUN/eval_SPLIT.json for the
    data it trained on, and RUN/eval_SPLIT-<fingerprint>.json for any other DATA."""
    from refinery_pipeline.training.evaluation import (checkpoint_of, data_of, evaluate_checkpoint,
                                                       measured_own_data, save_evaluation)
    from refinery_pipeline.models.registry import OptionNames
    metrics = evaluate_checkpoint(checkpoint_of(run), data_of(run, data), split, res,
                                  batch_size, workers, device, cache_dir, arch=arch,
                                  trust_checkpoint=trust_checkpoint,
                                  option_names=OptionNames("--arch", "--res"),
                                  options=_evaluated_conversion(run, data, max_resolution))
    saved = save_evaluation(run, metrics)
    record = metrics["data"]
    click.echo(f"{split} top-1 {metrics[split + '_top1']:.2f}  top-5 "
               f"{metrics[split + '_top5']:.2f} on {metrics['images']} images of "
               f"{record['path']} (data set {record['id']})" + (f"; {saved}" if saved else ""))
    if saved and not measured_own_data(run, record):
        click.echo(f"note: not the data {run} trained on, so kept apart from its own "
                   f"eval_{split}.json (which `refine plot --gap` reads)")


def _evaluated_conversion(run, data, max_resolution):
    """The run's own conversion for its own data (its frames), with ``--max-resolution`` given
    on top."""
    from dataclasses import replace

    from refinery_pipeline.training.evaluation import conversion_of
    options = conversion_of(run, data)
    return options if max_resolution is None else replace(options,
                                                          max_resolution=max_resolution)


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@cache_dir_option
@friendly_errors(about="store")
def inspect(store, as_json, cache_dir):
    """Show what a label store holds: plan, refinery, data set, size, completeness, labels, and
    its exact pixel source (beton: the converted .beton in the cache, when it is there)."""
    from refinery_pipeline.store.inspect_store import describe_store, format_summary
    summary = describe_store(store, cache_dir)
    if summary["beton"] is None and not as_json:
        from refinery_pipeline.sources.data_cache import default_cache_dir
        summary["beton"] = (f"not in {cache_dir or default_cache_dir()} (any command given the "
                            "DATA tree converts it there and precompute prints it)")
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


@cli.command()
@click.argument("store")
@click.argument("data", type=click.Path(exists=True))
@click.option("--images", default=6, type=AT_LEAST_ONE,
              help="how many images (rows), chosen at random")
@click.option("--crops", default=8, type=AT_LEAST_ONE, help="stored crops shown per image")
@click.option("--seed", default=0, type=SEED, help="which images")
@click.option("--out", default="crops.png", type=click.Path(), help="figure file")
@click.option("--compare", "others", multiple=True, metavar="STORE",
              help="also show this store's top-3 of the same crops (e.g. a later generation's; "
                   "same data, --seed and -K), once per store")
@click.option("--name", "names", multiple=True, show_default="the stores' file names",
              help="name of STORE and of each --compare store, in order")
@workers_option
@cache_dir_option
@friendly_errors(about="out")
def show(store, data, images, crops, seed, out, others, names, workers, cache_dir):
    """Draw stored crops of STORE (made from DATA) with their stored labels, as students see them;
    with --compare, each crop with every store's top-3 (the paper's Figs. 7-8)."""
    from refinery_pipeline.store.inspect_store import compared_labels, sample_stored_crops
    from refinery_pipeline.paper.plots import figure_path, plot_compared_crops, plot_stored_crops
    figure_path(out)  # before any image is decoded for it
    check_options_used("show", SimpleNamespace(names=names, others=others), {"names": ()})
    stores = (store, *others)
    if names and len(names) != len(stores):
        raise RefineryError(f"{len(names)} --name for {len(stores)} stores; give one per store "
                            "(STORE first, then each --compare) or none")
    dataset = _open_store_data(data, store, cache_dir, workers)
    sample = sample_stored_crops(dataset, store, images, seed, workers)
    shown = min(crops, sample.pixels.shape[1])
    if others:
        labels = [(sample.topk_indices, sample.topk_probs)] + [
            compared_labels(other, sample, store) for other in others]
        figure = plot_compared_crops(sample, labels, list(names or
                                                          [Path(s).stem for s in stores]), out,
                                     crops)
    else:
        figure = plot_stored_crops(sample, out, crops)
    click.echo(f"{figure}: {len(sample.images)} images x {shown} crop{'' if shown == 1 else 's'}")


@cli.command()
@click.argument("store")
@click.argument("data", type=click.Path(exists=True))
@click.option("--weights", required=True, multiple=True, type=click.Path(),
              help="the store's refinery checkpoint, or torchvision weights by name; an "
                   "ensemble's members, one --weights each in the recorded order")
@click.option("--sample-crops", default=20000, type=AT_LEAST_ONE,
              help="about this many stored crops are re-labelled")
@click.option("--min-agreement", default=0.999, type=FRACTION,
              help="exit 1 when top-1 agreement is lower")
@click.option("--seed", default=0, type=SEED, help="which loader batches are sampled")
@workers_option
@device_option
@trust_checkpoint_option
@cache_dir_option
@friendly_errors(about="store")
def audit(store, data, weights, sample_crops, min_agreement, seed, workers, device,
          trust_checkpoint, cache_dir):
    """Re-run the refinery on sampled stored crops of STORE (made from DATA) and compare."""
    from refinery_pipeline.labelling.audit import audit_store

    refinery = _recorded_refinery(store, weights, device, trust_checkpoint)
    dataset = _open_store_data(data, store, cache_dir, workers)
    r = audit_store(dataset, store, refinery, sample_crops, seed, workers)
    batches = f"{r.loader_batches} loader batch{'' if r.loader_batches == 1 else 'es'}"
    click.echo(f"{r.crops:,} crops in {batches} re-labelled (BN {r.bn_mode}): "
               f"top-1 agreement {100 * r.top1_agreement:.3f}%, top-k indices agreement "
               f"{100 * r.topk_indices_agreement:.3f}%, probability error max "
               f"{r.max_probability_error:.2e} mean {r.mean_probability_error:.2e}")
    if r.top1_agreement < min_agreement:
        click.echo(f"error: {store}: top-1 agreement below {100 * min_agreement:.1f}%; the store "
                   "does not match this refinery and data", err=True)
        sys.exit(1)


def _recorded_refinery(store, weights, device, trust_checkpoint):
    """The refinery ``weights`` make under STORE's record of its refinery (its classes,
    input size, BN mode: an ImageNet refinery selects the store's classes)."""
    from refinery_pipeline.store.label_store import LabelStore
    from refinery_pipeline.labelling.refinery import load_as_recorded
    from refinery_pipeline.training.train import resolve_device
    opened = LabelStore.open(store)
    return load_as_recorded(weights, opened.attrs["refinery"], opened.classes,
                            device=resolve_device(device), trust_checkpoint=trust_checkpoint)


@cli.command("check-copy")
@click.argument("store")
@click.argument("data")
@click.option("--weights", multiple=True, type=click.Path(), show_default="none: labels are "
              "not compared",
              help="the store's refinery (as for audit): label a sample of crops cut from "
                   "DATA's pixels again and compare with the stored labels")
@click.option("--sample", default=None, type=AT_LEAST_ONE, show_default="1000 with --weights",
              help="crops labelled again (train-mode BN: whole loader batches of the store's "
                   "run, at least this many crops)")
@click.option("--seed", default=0, type=SEED, help="which crops are sampled")
@click.option("--allow-missing", is_flag=True,
              help="DATA will be trained with --allow-missing: images it lacks do not make "
                   "this exit 1")
@workers_option
@device_option
@trust_checkpoint_option
@source_options
@friendly_errors(about="store")
def check_copy(store, data, weights, sample, seed, allow_missing, workers, device,
               trust_checkpoint, split, key_column, image_column, label_column, path_column,
               classes):
    """Can DATA, a copy of STORE's data set, be trained on, and how exactly?

    Joins DATA with STORE as `refine train` would (by key for a store that names its images)
    and reads each matched image once: exact (the very bytes the refinery decoded), resized,
    re-encoded, reframed (rotated, cropped or padded: skipped), missing, extra. With --weights,
    also the top-1 agreement and probability error between the stored labels and the
    refinery's on DATA's pixels. One line per finding; exit 0: usable, 1: usable only with
    --allow-missing, 2: unusable. --label-column, --classes, ... say how DATA is read, as for
    train."""
    from refinery_pipeline.labelling.check_copy import DEFAULT_SAMPLE, check_copy as check
    from refinery_pipeline.training.train import resolve_device

    resolve_device(device)  # a device this machine lacks: refused before any data is read
    if sample is not None and not weights:
        raise click.UsageError("--sample: crops are labelled again only with --weights; pass "
                               "the store's refinery with --weights, or drop --sample")
    read_as = given_source_options(data, split=split, key_column=key_column,
                                   image_column=image_column, label_column=label_column,
                                   path_column=path_column, classes=classes)
    if split is not None:
        read_as["split"] = split
    refinery = _recorded_refinery(store, weights, device, trust_checkpoint) if weights else None
    report = check(store, data, refinery, sample=sample or DEFAULT_SAMPLE, seed=seed,
                   allow_missing=allow_missing, num_workers=workers, **read_as)
    for line in report.lines:
        click.echo(line)
    sys.exit(report.status)


@cli.command()
@click.argument("data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--max-resolution", default=0, type=NON_NEGATIVE_COUNT, help=MAX_RESOLUTION_HELP
              + "; 0 keeps it")
@click.option("--jpeg", type=click.Choice(["passthrough", "reencode"]), default="passthrough",
              help="JPEG images: store their own bytes where FFCV decodes them exactly as the "
                   "original (then the originals and byte-identical copies give the labelled "
                   "pixels), or decode and re-encode every image (how conversions worked "
                   "before)")
@click.option("--jpeg-quality", default=90, type=Count(min=1, max=100),
              help="quality of re-encoded JPEGs (images not passed through)")
@click.option("--write-mode", type=click.Choice(["jpg", "raw"]), default="jpg",
              help="JPEG, or raw pixels (larger files, no decoding cost)")
@click.option("--workers", default=2, type=AT_LEAST_ONE,
              help="processes reading and encoding images")
@source_options
@friendly_errors(about="out_dir")
def convert(data, out_dir, max_resolution, jpeg, jpeg_quality, write_mode, workers, split,
            key_column, image_column, label_column, path_column, classes):
    """Write DATA to .beton files in OUT_DIR: an ImageFolder tree (train/ and val/) to
    <name>_{train,val}.beton, any other form (shards, a Hugging Face dataset, a list or folder
    of images) to <name>.beton, keyed by its images' names.

    Every command also takes DATA as it is and converts it once into a cache with default
    options; convert is for choosing them (size, quality) and for a file to share.
    """
    from refinery_pipeline.sources.dataset import BetonOptions, ImageDataset
    from refinery_pipeline.sources.data_cache import convert_data
    options = BetonOptions(max_resolution, jpeg_quality, write_mode, jpeg)
    check_options_used("convert", options)  # a JPEG quality for raw pixels: refused
    read_as = given_source_options(data, split=split, key_column=key_column,
                                   image_column=image_column, label_column=label_column,
                                   path_column=path_column, classes=classes)
    written = convert_data(data, out_dir, options, workers, split, **read_as)
    for path in written:
        ds = ImageDataset(path)
        classes = f"{len(ds.classes)} classes" if ds.has_labels else "no labels"
        click.echo(f"{path}: {ds.num_images:,} images, {classes}, "
                   f"{path.stat().st_size / 1e6:,.1f} MB" + _passed_through(ds))
    if ImageDataset(written[0]).has_labels:
        click.echo(f"next: refine precompute {written[0]} labels.zarr --weights REFINERY.pt")


@cli.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("out_zip", type=click.Path())
@friendly_errors(about="out_zip")
def pack(store, out_zip):
    """Pack a complete STORE directory into one reproducible zip (readable in place)."""
    from refinery_pipeline.store.store_tools import pack_store
    size = pack_store(store, out_zip)
    click.echo(f"{out_zip}: {size / 1e6:.2f} MB")


@cli.command()
@click.argument("store")
@click.option("--data", default=None, type=click.Path(exists=True),
              help="also check the store against this data set's fingerprint")
@cache_dir_option
@friendly_errors(about="store")
def verify(store, data, cache_dir):
    """Check every array of STORE (chunks against their checksums, attributes against their
    digest and the arrays' shapes, labels, a zip's entries); exit 1 naming all that is wrong.

    A pass is recorded in the cache (outside the store), so that `refine train
    --skip-store-check` may skip re-checking these very bytes."""
    from refinery_pipeline.store.store_tools import record_verified, store_identity, verify_store
    dataset = _open_store_data(data, store, cache_dir) if data else None
    identity = store_identity(store)  # before reading: a change during the check voids it
    report = verify_store(store, dataset)
    for problem in report.problems:
        click.echo(f"error: {store}: {problem}", err=True)
    if not report.ok:
        sys.exit(1)
    record_verified(store, identity, cache_dir)
    click.echo(f"{store}: {report.verified}/{report.chunks} chunks verified"
               + (", data set fingerprint matches" if dataset else ""))


@cli.command()
@click.option("--out", "out_dir", default="refinery-demo", type=click.Path(),
              help="directory for the data, the refinery, the store and the students (a rerun "
              "replaces a previous demo there)")
@click.option("--train-images", default=3000,
              type=Count(min=64, fix="give at least 64: the demo trains on batches of 64"),
              help="procedural training images (plus 1000 for validation)")
@click.option("--epochs", default=30, type=AT_LEAST_ONE,
              help="student epochs (the refinery trains twice as long)")
@workers_option
@click.option("--seed", default=0, type=SEED, help="images, crop plan and training")
@friendly_errors(about="out_dir")
def demo(out_dir, train_images, epochs, workers, seed):
    """Run the whole path on procedural shapes (no data, no GPU, a few minutes)."""
    from refinery_pipeline.paper.demo import DemoConfig, run_demo
    run_demo(DemoConfig(out_dir=out_dir, train_images=train_images, epochs=epochs,
                        refinery_epochs=2 * epochs, workers=workers, seed=seed), echo=click.echo)


if __name__ == "__main__":
    cli()
