"""Store commands: ``refine inspect`` (what a store holds), ``refine show`` (its crops with
their labels), ``refine verify`` (every chunk against its checksum) and ``refine pack`` (one
reproducible zip)."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import click

from refinery_pipeline.core.errors import RefineryError
from refinery_pipeline.core.option_relevance import check_options_used

from .errors import friendly_errors
from .options import AT_LEAST_ONE, SEED, cache_dir_option, workers_option
from .recorded import open_store_data


@click.command()
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


@click.command()
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
    from refinery_pipeline.paper.plots import figure_path, plot_compared_crops, plot_stored_crops
    from refinery_pipeline.labelling.shown_crops import compared_labels, sample_stored_crops
    figure_path(out)  # before any image is decoded for it
    check_options_used("show", SimpleNamespace(names=names, others=others), {"names": ()})
    stores = (store, *others)
    if names and len(names) != len(stores):
        raise RefineryError(f"{len(names)} --name for {len(stores)} stores; give one per store "
                            "(STORE first, then each --compare) or none")
    dataset = open_store_data(data, store, cache_dir, workers)
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


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("out_zip", type=click.Path())
@friendly_errors(about="out_zip")
def pack(store, out_zip):
    """Pack a complete STORE directory into one reproducible zip (readable in place)."""
    from refinery_pipeline.store.store_tools import pack_store
    size = pack_store(store, out_zip)
    click.echo(f"{out_zip}: {size / 1e6:.2f} MB")


@click.command()
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
    dataset = open_store_data(data, store, cache_dir) if data else None
    identity = store_identity(store)  # before reading: a change during the check voids it
    report = verify_store(store, dataset)
    for problem in report.problems:
        click.echo(f"error: {store}: {problem}", err=True)
    if not report.ok:
        sys.exit(1)
    record_verified(store, identity, cache_dir)
    click.echo(f"{store}: {report.verified}/{report.chunks} chunks verified"
               + (", data set fingerprint matches" if dataset else ""))
