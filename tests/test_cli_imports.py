"""The command line starts without its heavy libraries (issue 28): importing ``refine``'s entry
module, and asking it or any command for ``--help``, loads none of torch, FFCV, numba (nor zarr).
They cost seconds to import and a command imports what it uses when it runs, so a user reading
the help does not wait for them. Each probe runs in a fresh interpreter: this one has them all."""
import os
import subprocess
import sys
from pathlib import Path

from .test_imports import HEAVY

REPO = Path(__file__).resolve().parents[1]
# what none of the probes may load: the imports that cost a command line seconds
NOT_AT_START = HEAVY + ("zarr",)

LOADED = f"print(','.join(m for m in {NOT_AT_START!r} if m in sys.modules))"

IMPORT_ENTRY = "import sys, cli.main; " + LOADED

EVERY_HELP = f"""
import sys
from click.testing import CliRunner
from cli.main import cli
for args in [["--help"]] + [[name, "--help"] for name in cli.commands]:
    result = CliRunner().invoke(cli, args, prog_name="refine")
    assert result.exit_code == 0 and "Usage: refine" in result.output, (args, result.output)
{LOADED}
"""


def loaded_by(probe: str) -> str:
    """Which heavy packages a fresh interpreter holds after running ``probe`` (this tree's
    ``cli`` package on its path, as the installed ``refinery_cli``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_importing_the_entry_module_loads_no_heavy_package():
    loaded = loaded_by(IMPORT_ENTRY)
    assert loaded == "", f"importing cli.main (refine's entry module) loaded {loaded}"


def test_every_help_loads_no_heavy_package():
    loaded = loaded_by(EVERY_HELP)
    assert loaded == "", f"refine --help or a command's --help loaded {loaded}"
