"""Training commands: ``refine train`` (a student on stored or online labels), ``refine
evaluate`` (a trained model on either split) and ``refine plot`` (the runs' accuracy, or their
train/validation gap)."""
from pathlib import Path

import click

from refinery_pipeline.core.errors import RefineryError
from refinery_pipeline.plan.crop_plan import DEFAULT_SLOT_POLICY, SLOT_POLICIES
from refinery_pipeline.store.schema import DEFAULT_REST, REST_POLICIES
from refinery_pipeline.training.schedule import LR_SCHEDULERS
from refinery_pipeline.training.wordnet import DEFAULT_TEMPERATURE

from .errors import friendly_errors
from .options import (AT_LEAST_ONE, AUGMENT_HELP, FACTOR, NON_NEGATIVE, PIXELS, POSITIVE, SEED,
                      SMOOTHING, Count, EpochList, augment_option, cache_dir_option, device_option,
                      given_source_options, max_resolution_option, source_options,
                      trust_checkpoint_option, workers_option)


@click.command()
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
    from refinery_pipeline.core.distributed import is_main
    from refinery_pipeline.paper.plots import plot_runs, read_run
    from refinery_pipeline.plan.recipe import Recipe
    from refinery_pipeline.training.config import TrainConfig
    from refinery_pipeline.training.train import fit

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


@click.command()
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


@click.command()
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
    from refinery_pipeline.models.registry import OptionNames
    from refinery_pipeline.training.evaluation import (checkpoint_of, data_of, evaluate_checkpoint,
                                                       measured_own_data, save_evaluation)
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
