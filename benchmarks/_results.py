"""Shared by the benchmark scripts: write a result as JSON and markdown, stamped with the command."""
import json
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines: ``header`` names the columns, ``rows`` holds formatted cells."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def write_results(tag: str, result: dict, markdown: str):
    """Write ``results/<tag>.json`` and ``results/<tag>.md`` (with the exact command) and print."""
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps({**result, "command": command}, indent=1))
    markdown += f"\nCommand: `{command}`\n"
    (RESULTS / f"{tag}.md").write_text(markdown)
    print(markdown)
