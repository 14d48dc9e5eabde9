"""Which options each mode uses: one table, checked before anything is read or written.

An option that the chosen mode ignores used to be accepted, recorded in ``config.json`` and
silently dropped: ``--label-smoothing 0.1 --labels STORE`` trained on the stored labels
unsmoothed, and the run's config said otherwise. Every such dependency is a row of
:data:`OPTION_USES`: the option, the setting it fills, when a value other than its default
takes effect, and, when it does not, why and what to do instead. :func:`check_options_used`
refuses the first row a command's settings break, in one line naming the option and the fix.

A setting absent from the table is used by every mode; ``tests/test_option_relevance.py``
holds each field of :class:`refinery_pipeline.training.config.TrainConfig` to be either in the table or in its list of
settings every mode uses, so a new option cannot join silently.
"""
import dataclasses
from dataclasses import dataclass
from typing import Callable

from .errors import ArgumentError

CATEGORY_VISUAL, CATEGORY_WORDNET = "category-visual", "category-wordnet"
TRAINED_ON_THE_LABELS_ALONE = ("soft", "static", CATEGORY_VISUAL)  # not their arg-max


@dataclass(frozen=True)
class OptionUse:
    """One row: ``option`` (as the CLI spells it) of ``command`` fills the setting ``field``;
    a value other than its default (or, with ``value``, that value) takes effect only where
    ``used(settings)`` holds, and is otherwise refused with ``reason`` and ``fix``."""
    command: str
    option: str
    field: str
    used: Callable
    reason: str
    fix: str
    value: object = None

    def applies_to(self, settings, defaults: dict) -> bool:
        """Whether this row concerns ``settings``: its field holds ``value`` (or, without one,
        anything but the default)."""
        given = getattr(settings, self.field)
        return given == self.value if self.value is not None else given != defaults[self.field]


# ----------------------------------------------------------------------------- train's modes

def _online(c) -> bool:
    return c.teacher is not None


def _stored(c) -> bool:
    """The targets are the store's labels (no online refinery replaces them)."""
    return c.labels is not None and not _online(c)


def _ground_truth(c) -> bool:
    return c.labels is None and not _online(c) and c.label_mode != CATEGORY_WORDNET


def _replays_store_crops(c) -> bool:
    return c.labels is not None and (not _online(c) or c.teacher_crops == "replay")


OPTION_USES = (
    # the label mode: which labels it is computed from
    OptionUse("train", "--label-mode", "label_mode", lambda c: c.labels is None and not _online(c),
              "each class's label comes from WordNet alone, not from a refinery, so a store or "
              "teacher would be ignored", "drop --labels and --teacher", value=CATEGORY_WORDNET),
    OptionUse("train", "--label-mode", "label_mode", _stored,
              "each class's label is the mean of its stored crop labels, which needs a store and "
              "no online refinery", "pass --labels STORE (without --teacher)",
              value=CATEGORY_VISUAL),
    OptionUse("train", "--label-mode", "label_mode", _stored,
              "the whole-image (soft-static) label is read from a store, and an online "
              "--teacher would label the crops instead", "pass --labels STORE without --teacher "
              "(a store precomputed with --soft-static)", value="static"),
    OptionUse("train", "--label-mode", "label_mode", lambda c: c.labels is not None or _online(c),
              "the arg-max of stored or online labels; ground truth is hard already",
              "pass --labels STORE or --teacher, or drop --label-mode", value="hard"),
    # where the labels come from
    OptionUse("train", "--labels", "labels",
              lambda c: not _online(c) or c.teacher_crops == "replay",
              "an online --teacher on fresh crops labels every crop itself, so the store would "
              "be read for nothing", "pass --teacher-crops replay to label the store's crops, "
              "or drop --labels"),
    OptionUse("train", "--teacher-crops", "teacher_crops",
              lambda c: _online(c) and c.labels is not None,
              "an online --teacher replays the crops of a store", "pass --teacher CHECKPOINT "
              "and --labels STORE, or use --teacher-crops fresh", value="replay"),
    OptionUse("train", "--teacher-arch", "teacher_arch", _online,
              "names the architecture of an online --teacher's bare state_dict, and there is "
              "no --teacher", "pass --teacher CHECKPOINT, or drop --teacher-arch"),
    OptionUse("train", "--teacher-bn", "teacher_bn", _online,
              "sets the BatchNorm mode of an online --teacher, and there is none",
              "pass --teacher CHECKPOINT, or drop --teacher-bn"),
    OptionUse("train", "--adversarial-eta", "adversarial_eta", _online,
              "adversarial twins are new pixels, which only an online refinery can label (no "
              "store holds them)", "pass --teacher CHECKPOINT"),
    OptionUse("train", "--adversarial-bn", "adversarial_bn", lambda c: c.adversarial_eta > 0,
              "it places adversarial twins in BatchNorm batches, and there are none",
              "pass --adversarial-eta ETA, or drop --adversarial-bn"),
    # how the labels are turned into targets
    OptionUse("train", "--label-smoothing", "label_smoothing", _ground_truth,
              "only ground-truth targets are smoothed; stored, online and WordNet labels are "
              "used as they are", "drop --label-smoothing, or train on ground truth "
              "(--labels none, no --teacher)"),
    OptionUse("train", "--rest", "rest",
              lambda c: _stored(c) and c.label_mode in TRAINED_ON_THE_LABELS_ALONE,
              "it places the probability mass outside a store's top-k, and this run trains on "
              "no stored distribution (ground truth, an online teacher, WordNet, or an arg-max)",
              "drop --rest, or pass --labels STORE with --label-mode soft, static or "
              "category-visual"),
    OptionUse("train", "--wordnet-temperature", "wordnet_temperature",
              lambda c: c.label_mode == CATEGORY_WORDNET,
              "it spreads WordNet category labels only", "pass --label-mode category-wordnet, "
              "or drop --wordnet-temperature"),
    # the store's crops
    OptionUse("train", "--slot-policy", "slot_policy", _replays_store_crops,
              "it picks which stored crop is replayed, and this run replays no store's crops",
              "pass --labels STORE (with --teacher: --teacher-crops replay), or drop "
              "--slot-policy"),
    OptionUse("train", "--allow-partial", "allow_partial", lambda c: c.labels is not None,
              "it lets a run use a store's finished chunks, and there is no store",
              "pass --labels STORE, or drop --allow-partial"),
    OptionUse("train", "--allow-missing", "allow_missing", lambda c: c.labels is not None,
              "it skips the store images a copy of its data lacks, and there is no store",
              "pass --labels STORE, or drop --allow-missing"),
    OptionUse("train", "--skip-store-check", "skip_store_check", lambda c: c.labels is not None,
              "it skips checking a store's chunks, and there is no store",
              "pass --labels STORE, or drop --skip-store-check"),
    # the learning-rate schedule
    OptionUse("train", "--lr-step-size", "lr_step_size", lambda c: c.lr_scheduler == "step",
              "only the step scheduler decays every N epochs",
              "pass --lr-scheduler step, or drop --lr-step-size"),
    OptionUse("train", "--lr-gamma", "lr_gamma",
              lambda c: c.lr_scheduler in ("step", "multistep"),
              "only the step and multistep schedulers decay by a factor (linear and cosine "
              "decay to 0)", "pass --lr-scheduler step or multistep, or drop --lr-gamma"),
    OptionUse("train", "--lr-milestones", "lr_milestones",
              lambda c: c.lr_scheduler == "multistep",
              "only the multistep scheduler decays at milestones",
              "pass --lr-scheduler multistep"),
    # other commands
    OptionUse("convert", "--jpeg-quality", "jpeg_quality", lambda o: o.write_mode == "jpg",
              "raw pixels are stored as they are, without JPEG encoding",
              "drop --jpeg-quality, or pass --write-mode jpg"),
    OptionUse("convert", "--jpeg", "jpeg", lambda o: o.write_mode == "jpg",
              "raw pixels are stored as they are, neither passed through nor re-encoded as JPEG",
              "drop --jpeg, or pass --write-mode jpg"),
    *(OptionUse("precompute", option, field, lambda s: s.engine == "ray",
                "it sets up the Ray engine's pool", f"add --engine ray, or drop {option}")
      for option, field in (("--ray-address", "address"), ("--ray-actors", "actors"),
                            ("--ray-gpus-per-actor", "gpus_per_actor"),
                            ("--ray-cpus-per-actor", "cpus_per_actor"))),
    OptionUse("precompute", "--compile", "compile", lambda s: s.engine != "ray",
              "a compiled refinery cannot be sent to Ray actors", "drop --compile with "
              "--engine ray", value=True),
    OptionUse("show", "--name", "names", lambda s: bool(s.others),
              "the names label the stores of a --compare figure, and a figure of one store "
              "names none", "add --compare STORE, or drop --name"),
)


def check_options_used(command: str, settings, defaults: dict = None):
    """Refuse the first option of ``command`` in ``settings`` that its mode would ignore.

    Parameters
    ----------
    command : str
        ``train``, ``convert``, ``precompute`` or ``show``: whose rows of :data:`OPTION_USES` apply.
    settings : object
        The command's settings as attributes (``TrainConfig``, ``BetonOptions``, ...).
    defaults : dict, optional
        Each setting's default; a dataclass's own field defaults when omitted.

    Raises
    ------
    ArgumentError
        Naming the option, its value, why it would have no effect, and the fix.
    """
    if defaults is None:
        defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    for row in OPTION_USES:
        if row.command == command and row.applies_to(settings, defaults) \
                and not row.used(settings):
            raise ArgumentError(f"{row.option} {_shown(getattr(settings, row.field))}: "
                                f"{row.reason}; {row.fix}")


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "(none)"
    return str(value)
