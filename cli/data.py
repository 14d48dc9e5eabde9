"""Data commands: ``refine convert`` (DATA to .beton files) and ``refine check-copy`` (whether a
copy of a store's data set can be trained on, and how exactly)."""
import sys

import click

from refinery_pipeline.core.option_relevance import check_options_used

from .errors import friendly_errors
from .options import (AT_LEAST_ONE, MAX_RESOLUTION_HELP, NON_NEGATIVE_COUNT, SEED, Count,
                      device_option, given_source_options, source_options, trust_checkpoint_option,
                      workers_option)
from .recorded import recorded_refinery


def passed_through(dataset) -> str:
    """``; N of M images are their source's own bytes``, where the sidecar counted them."""
    count = dataset.meta.get("passed_through")
    if count is None:
        return ""
    return (f"; {count:,} of {dataset.num_images:,} images are their source's own bytes (exact "
            "from the original files and byte-identical copies)")


@click.command("check-copy")
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
    from refinery_pipeline.core.devices import resolve_device
    from refinery_pipeline.labelling.check_copy import DEFAULT_SAMPLE
    from refinery_pipeline.labelling.check_copy import check_copy as check

    resolve_device(device)  # a device this machine lacks: refused before any data is read
    if sample is not None and not weights:
        raise click.UsageError("--sample: crops are labelled again only with --weights; pass "
                               "the store's refinery with --weights, or drop --sample")
    read_as = given_source_options(data, split=split, key_column=key_column,
                                   image_column=image_column, label_column=label_column,
                                   path_column=path_column, classes=classes)
    if split is not None:
        read_as["split"] = split
    refinery = recorded_refinery(store, weights, device, trust_checkpoint) if weights else None
    report = check(store, data, refinery, sample=sample or DEFAULT_SAMPLE, seed=seed,
                   allow_missing=allow_missing, num_workers=workers, **read_as)
    for line in report.lines:
        click.echo(line)
    sys.exit(report.status)


@click.command()
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
    from refinery_pipeline.sources.data_cache import convert_data
    from refinery_pipeline.sources.dataset import BetonOptions, ImageDataset
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
                   f"{path.stat().st_size / 1e6:,.1f} MB" + passed_through(ds))
    if ImageDataset(written[0]).has_labels:
        click.echo(f"next: refine precompute {written[0]} labels.zarr --weights REFINERY.pt")
