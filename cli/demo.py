"""``refine demo``: the whole path on procedural shapes, no data and no GPU needed."""
import click

from .errors import friendly_errors
from .options import AT_LEAST_ONE, SEED, Count, workers_option


@click.command()
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
