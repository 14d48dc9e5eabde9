"""Labelling commands: ``refine precompute`` (label every planned crop into a store, locally or
on Ray) and ``refine audit`` (re-label sampled stored crops and compare)."""
import sys
from types import SimpleNamespace

import click

from refinery_pipeline.core.errors import RefineryError
from refinery_pipeline.core.option_relevance import check_options_used
from refinery_pipeline.plan.crop_plan import DEFAULT_CROPS_PER_IMAGE
from refinery_pipeline.store.schema import DEFAULT_PROB_BITS, DEFAULT_TOP_K

from .data import passed_through
from .errors import friendly_errors
from .options import (AT_LEAST_ONE, AUGMENT_HELP, FRACTION, NON_NEGATIVE, PIXELS, POSITIVE,
                      PROB_BITS, SEED, augment_option, cache_dir_option, device_option,
                      given_source_options, max_resolution_option, source_options,
                      trust_checkpoint_option, workers_option)
from .recorded import open_store_data, recorded_refinery, recorded_source


@click.command()
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
    from refinery_pipeline.core.devices import resolve_device
    from refinery_pipeline.labelling.precompute import check_labelled
    from refinery_pipeline.labelling.precompute import precompute as run
    from refinery_pipeline.labelling.refinery import load_refinery, member_archs
    from refinery_pipeline.models.registry import OptionNames
    from refinery_pipeline.plan.recipe import Recipe
    from refinery_pipeline.plan.crop_plan import CropPlan
    from refinery_pipeline.sources.data_cache import open_dataset
    from refinery_pipeline.sources.dataset import check_cap_applies, conversion_options

    recipe, archs = Recipe.parse(augment), member_archs(weights, arch)  # before any work
    ray_options = _ray_options(engine, compile_, ray_address, ray_actors, ray_gpus_per_actor,
                               ray_cpus_per_actor)
    check_cap_applies(data, max_resolution)
    read_as = given_source_options(data, split=split, key_column=key_column,
                                   image_column=image_column, label_column=label_column,
                                   path_column=path_column, classes=classes)
    options = conversion_options(recorded_source(store), max_resolution)  # a resume's frame
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
                   + passed_through(dataset))


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


@click.command()
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

    refinery = recorded_refinery(store, weights, device, trust_checkpoint)
    dataset = open_store_data(data, store, cache_dir, workers)
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
