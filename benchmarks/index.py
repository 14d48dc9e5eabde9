"""Write benchmarks/README.md: every claim, the script that measures it, its results files and
the command that made each (``python benchmarks/index.py``; ``--check`` exits 1 when the index
is stale, a script has no group, or a results file names no script).

The index is generated, not written by hand, so it cannot drift from the scripts (each opens
with its claim) and the results files (each ends with the command that made it). A results
file belongs to the script its command runs; a figure or a file without a command belongs to
the results file it sits beside (``parity_cpu32.png`` beside ``parity_cpu32.md``) or extends
(``x_gap.png`` of ``x.md``), or to the script named in ``ATTRIBUTED``.
"""
import argparse
import ast
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
INDEX = HERE / "README.md"

GROUPS = {  # concern -> the scripts measuring it, in reading order
    "Speed: loaders, labelling, checks": [
        "loader_throughput.py", "plain_loader_throughput.py", "epoch_time.py",
        "precompute_throughput.py", "recipe_cost.py", "checksum_cost.py", "store_read.py",
        "conversion_passthrough.py", "key_join.py", "ray_engine.py", "import_cost.py"],
    "Scale: stores and memory at ImageNet size": [
        "imagenet_store.py", "epoch_reads.py", "label_bytes.py", "large_image_memory.py"],
    "Fidelity: labels describe the pixels shown": [
        "replay_fidelity.py", "pixel_source_agreement.py", "store_copies.py"],
    "Accuracy: the paper's tables and students": [
        "refined_vs_ground_truth.py", "parity_sweep.py", "top_k_rest.py", "recipes.py",
        "generations.py", "adversarial_jitter.py", "paper_tables.py", "bn_recalibration.py",
        "steps_per_epoch.py"],
    "Tools": ["folder_subset.py"],
    "Development: the test suite": ["suite_time.py"],
}
ATTRIBUTED = {  # results files whose command is not a benchmark script
    "test_suite_wall_cpu": "suite_time.py",
    "demo": "refine demo",
    "prob_bits_demo_cpu": "label_bytes.py",
    "stored_crops_cpu32": "refine show",
    "stored_crops_tin200_cpu32": "refine show",
    "loader_cpu": "loader_throughput.py",
    "precompute_cpu": "precompute_throughput.py",
    "epoch_time_cpu32": "epoch_time.py",
}
COMMAND = re.compile(r"Command: `([^`]*)`")


def claim_of(script: Path) -> str:
    """The script's claim: its docstring's first paragraph, on one line."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def command_of(result: Path) -> str:
    """The command stamped on a results file (its markdown, else its JSON), or ''."""
    markdown, data = result.with_suffix(".md"), result.with_suffix(".json")
    if markdown.is_file():
        found = COMMAND.search(markdown.read_text())
        if found:
            return found.group(1)
    if data.is_file():
        try:
            return str(json.loads(data.read_text()).get("command", ""))
        except ValueError:
            return ""
    return ""


def script_of(stem: str, command: str, scripts: set) -> str:
    """Which script made the results ``stem``: the one its command runs."""
    if stem in ATTRIBUTED:
        return ATTRIBUTED[stem]
    for word in command.split():
        name = Path(word).name
        if name in scripts:
            return name
    return ""


def _owner_of_prefix(stem: str, owners: dict) -> str:
    """A figure's owner from the results it extends (``x_crops.png`` extends ``x``)."""
    prefixes = [known for known in owners if stem.startswith(known + "_") and owners[known]]
    return owners[max(prefixes, key=len)] if prefixes else ""


def stems_of_results() -> dict:
    """results stem -> its files (``.md``, ``.json``, figures), sorted."""
    stems = {}
    for path in sorted(RESULTS.iterdir()):
        if path.is_file():
            stems.setdefault(path.stem, []).append(path)
    return stems


def collect():
    scripts = {p.name for p in HERE.glob("*.py") if not p.name.startswith("_")} - {"index.py"}
    grouped = [name for names in GROUPS.values() for name in names]
    problems = [f"{name}: in no group of benchmarks/index.py GROUPS; add it"
                for name in sorted(scripts - set(grouped))]
    problems += [f"{name}: listed in GROUPS but not in benchmarks/; drop it"
                 for name in grouped if name not in scripts]
    by_script, owners = {}, {}
    for stem, files in stems_of_results().items():
        command = command_of(files[0])
        owner = script_of(stem, command, scripts) or _owner_of_prefix(stem, owners)
        owners[stem] = owner
        if not owner:
            problems.append(f"results/{stem}: names no script (its command: {command!r}); stamp "
                            "it with write_results or add it to ATTRIBUTED")
        by_script.setdefault(owner, []).append((stem, files, command))
    return scripts, by_script, problems


def render(scripts, by_script) -> str:
    lines = ["# Benchmarks", "",
             "Every claim README.md and the docs make, the script that measures it, and what it "
             "measured (`benchmarks/results/`, each with the command that made it). Generated by "
             "`python benchmarks/index.py` from the scripts' docstrings and the results' stamped "
             "commands: do not edit by hand. Speed is always measured as ratios side by side in "
             "one run; `cpu` in a name means this project's 2-core CPU, `gpu` one H100/H200.",
             ""]
    for group, names in GROUPS.items():
        lines += [f"## {group}", "", "| script | claim | results (command) |", "|---|---|---|"]
        for name in names:
            if name not in scripts:
                continue
            results = "<br>".join(_result_cell(stem, files, command)
                                  for stem, files, command in by_script.get(name, []))
            lines.append(f"| [{name}]({name}) | {_cell(claim_of(HERE / name))} | "
                         f"{results or 'none yet'} |")
        lines.append("")
    other = sorted(k for k in by_script if k and k not in scripts)
    if other:
        lines += ["## Made by `refine` itself", "", "| command | results |", "|---|---|"]
        for owner in other:
            lines.append(f"| `{owner}` | " + "<br>".join(
                _result_cell(stem, files, command) for stem, files, command in by_script[owner])
                + " |")
        lines.append("")
    return "\n".join(lines)


def _result_cell(stem, files, command) -> str:
    links = ", ".join(f"[{p.suffix[1:]}](results/{p.name})" for p in files)
    shown = f" `{_cell(command)}`" if command else ""
    return f"{stem}: {links}{shown}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if README.md is stale or something is unindexed")
    args = parser.parse_args(argv)
    scripts, by_script, problems = collect()
    text = render(scripts, by_script)
    if args.check:
        if INDEX.is_file() and INDEX.read_text() != text:
            problems.append("benchmarks/README.md is stale; run python benchmarks/index.py")
        elif not INDEX.is_file():
            problems.append("benchmarks/README.md is missing; run python benchmarks/index.py")
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    INDEX.write_text(text)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
