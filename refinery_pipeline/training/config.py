"""What one training run is: every setting of `refine train`, as its run directory's config.json
records it (the runtime ones may change on --resume: run_dir.RESUMABLE_CHANGES).
"""
from dataclasses import dataclass, field, replace

from ..plan.crop_plan import DEFAULT_SLOT_POLICY
from ..store.schema import DEFAULT_REST
from .wordnet import DEFAULT_TEMPERATURE


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out_dir: str
    labels: str = None          # label store location; None trains on ground truth
    arch: str = "resnet18"
    epochs: int = 16
    batch_size: int = 256
    lr: float = 0.4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    lr_scheduler: str = "linear"  # decay after the warm-up: linear, cosine, step or multistep
    lr_step_size: int = 30      # step: epochs between decays
    lr_gamma: float = 0.1       # step, multistep: factor per decay
    lr_milestones: tuple = ()   # multistep: the epochs at which the LR is multiplied by lr_gamma
    label_smoothing: float = 0.0
    label_mode: str = "soft"    # 'soft', 'hard' (arg-max), 'static' (whole-image label) or
    #                             'category-visual' (each class's mean stored label) or
    #                             'category-wordnet' (WordNet similarity of the class names)
    wordnet_temperature: float = DEFAULT_TEMPERATURE  # category-wordnet: softmax(wup / this)
    teacher: str = None         # online refinery checkpoint: labels every crop as it is shown
    #                             (a tuple of several: an ensemble, the mean of their labels)
    init: str = None            # student weights to start from (paper Table 3: the refined model)
    teacher_arch: str = None    # the teacher's architecture, where its checkpoint records none
    teacher_bn: str = "train"
    augment: tuple = ()         # recipe after crop and flip (recipe.Recipe names); a store's own
    teacher_crops: str = "fresh"  # 'fresh' random crops, or 'replay' the store's crops (parity)
    loss: str = "kl"
    adversarial_eta: float = 0.0  # > 0: also train on adversarial twins (needs a teacher)
    adversarial_bn: str = "separate"  # or "shared": twins in the natural crops' BN batch (paper)
    precise_bn: int = 0         # > 0: recompute BN statistics over this many batches before eval
    rest: str = DEFAULT_REST    # where the mass outside the stored top-k goes
    slot_policy: str = DEFAULT_SLOT_POLICY  # or "random": an independent slot every epoch
    res: int = None             # crop size; defaults to the store's refinery input size, else 224
    workers: int = 2
    seed: int = 0
    eval_every: int = 1
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    resume: bool = False
    allow_partial: bool = False
    allow_missing: bool = False  # a keyed store's images a copy (DATA) lacks: skipped
    val: str = None             # the validation data; None: DATA's val/ or its '*val.beton'
    skip_store_check: bool = False  # only after a passing `refine verify` of the same bytes
    trust_checkpoint: bool = False  # load weights files that run code to load (trusted ones only)
    cache_dir: str = None
    max_resolution: int = None  # cap a tree's longer side; None: the store's record, else keep
    progress: bool = True
    # how DATA's kind of source is read (sources.open_source options: label_column, classes...)
    source_options: dict = field(default_factory=dict)


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    return replace(cfg, **kw)
