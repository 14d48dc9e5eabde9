"""Claim: what each test file costs in CPU seconds, before and after a change (the suite's target:
`python3 -m pytest -q tests` in at most ~8 minutes on 2 cores).

The wall time of the whole suite depends on who else uses the machine, so this script measures
what does not: the CPU seconds (user + sys of pytest and every process it starts) each test file
costs, run alone (``pytest -n 0``), for this working tree and, with ``--ref``, for a git
revision of it, the two runs of each file side by side so that both see the same machine. Under
``--dist loadfile`` a file runs on one worker, so the largest file bounds the wall time, and
the total over 2 workers bounds it from below. ``--suite`` also times the README's command
itself (wall and CPU), once.

  python benchmarks/suite_time.py --ref main tests/test_cli.py tests/test_augment.py \\
      --tag test_suite_time_cpu
"""
import argparse
import os
from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent


def start_pytest(tree: Path, args: list, log: Path):
    """``python3 -m pytest ARGS`` started in ``tree`` (imports from it), its output to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 *args], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(process, started: float, log: Path) -> dict:
    """CPU seconds (user + sys of pytest and every process it reaped), wall seconds and
    pytest's summary line of a run from :func:`start_pytest`."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    lines = log.read_text().strip().splitlines() or ["(no output)"]
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "wall_s": round(time.time() - started, 1), "summary": lines[-1].strip("= "),
            "returncode": process.returncode}


def timed(runs: dict, scratch: Path) -> dict:
    """``{name: (tree, pytest args)}`` run side by side, so that they share the machine alike."""
    started, processes = time.time(), {}
    for name, (tree, args) in runs.items():
        processes[name] = start_pytest(tree, args, scratch / f"{name}.log")
    return {name: finish(p, started, scratch / f"{name}.log") for name, p in processes.items()}


def export(ref: str, into: Path) -> Path:
    """The tree of git revision ``ref`` (committed files only), written under ``into``."""
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True)
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    shared = ROOT.parent / "shared"  # the shared data set tests/conftest.py looks for
    if shared.is_dir() and not (into.parent / "shared").exists():
        (into.parent / "shared").symlink_to(shared)
    return into


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def render(result: dict, ref: str) -> str:
    rows = []
    for name, entry in result["files"].items():
        before = entry.get("before", {}).get("cpu_s", "")
        after = entry["after"]["cpu_s"]
        ratio = f"{before / after:.1f}x" if before and after else ""
        rows.append([Path(name).name, before, after, ratio,
                     entry.get("before", {}).get("summary", ""), entry["after"]["summary"],
                     entry["load"]])
    total = {k: round(sum(e.get(k, {}).get("cpu_s", 0) for e in result["files"].values()), 1)
             for k in ("before", "after")}
    rows.append(["**total**", total["before"] if ref else "", total["after"], "", "", "", ""])
    lines = [f"# Test suite: CPU seconds per file ({result['cpu_count']} cores)", "",
             "Each file alone (`pytest -n 0 FILE`), user + sys of pytest and every process it "
             "started" + (f"; before: git revision `{ref}`, run side by side" if ref else "")
             + f". Load at the start: {result['load_at_start']} (other work shared the machine: "
             "compare CPU seconds, not wall).", "",
             *markdown_table(["file", "CPU s before", "CPU s after", "ratio", "pytest (before)",
                              "pytest (after)", "machine after the file"], rows), ""]
    if "suite" in result:
        suite = result["suite"]
        lines += [f"The whole suite (`python3 -m pytest -q tests`, the README's command): "
                  f"{suite['wall_s'] / 60:.1f} min wall, {suite['cpu_s']:.0f} CPU s; "
                  f"{suite['summary']}; {result['load_at_end']} at its end.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="test files (default: every tests/test_*.py)")
    parser.add_argument("--ref", help="also run each file at this git revision, side by side")
    parser.add_argument("--suite", action="store_true", help="also time the whole suite, once")
    parser.add_argument("--jobs", type=int, default=1,
                        help="files measured at once (CPU seconds do not depend on it)")
    parser.add_argument("--tag", default="test_suite_time_cpu")
    args = parser.parse_args(argv)
    files = [str(Path(f).resolve().relative_to(ROOT)) for f in args.files] or sorted(
        str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_*.py"))
    result = {"files": {}, "load_at_start": load(), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as scratch:
        before_tree = export(args.ref, Path(scratch) / "ref") if args.ref else None
        def measure(name):
            runs = {"after": (ROOT, ["-n", "0", name])}
            if before_tree is not None:
                runs["before"] = (before_tree, ["-n", "0", name])
            logs = Path(scratch) / name.replace("/", "_")
            logs.mkdir()
            return name, {**timed(runs, logs), "load": load()}

        with ThreadPoolExecutor(args.jobs) as pool:
            for name, entry in pool.map(measure, files):
                result["files"][name] = entry
                write_results(args.tag, result, render(result, args.ref))  # each file as it ends
        if args.suite:
            result["suite"] = timed({"suite": (ROOT, ["tests"])}, Path(scratch))["suite"]
            result["load_at_end"] = load()
            write_results(args.tag, result, render(result, args.ref))


if __name__ == "__main__":
    main()
