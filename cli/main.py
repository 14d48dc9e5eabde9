"""``refine``: the click group and its commands, one module per stage a command serves:

- ``data``: convert, check-copy
- ``labelling``: precompute, audit
- ``store``: inspect, show, verify, pack
- ``training``: train, evaluate, plot
- ``demo``: demo

Bad input ends in one line naming the fix (``errors``); the typed options every command shares
are in ``options``."""
import click

from .data import check_copy, convert
from .demo import demo
from .errors import OneLineUsageErrors, _one_line_warnings
from .labelling import audit, precompute
from .store import inspect, pack, show, verify
from .training import evaluate, plot, train


@click.group(cls=OneLineUsageErrors,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="refinery")
def cli():
    """Offline Label Refinery: label every crop once, replay crops and labels while training."""
    _one_line_warnings()


# the CLI reference (docs/reference/cli.md, mkdocs-click) lists them in this order
for command in (precompute, train, plot, evaluate, inspect, show, audit, check_copy, convert,
                pack, verify, demo):
    cli.add_command(command)


if __name__ == "__main__":
    cli()
