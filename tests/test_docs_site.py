"""The documentation site builds strictly: a broken link, a public name missing from the API
reference or without a docstring, or a docstring griffe cannot parse fails the suite.

The full build (``mkdocs build --strict``, ~15 s) runs once; the two hooks it relies on are
also shown to refuse what they exist to catch, on tiny projects of their own (~1 s each).
"""
import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import refinery_pipeline
from tests.test_examples import python_block, run_snippet_as_printed

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "docs" / "_hooks"


def mkdocs_build(project: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``project`` into ``site``, in a process of its own (the
    packages come with the test extra, as CI installs it: a missing one fails, not skips)."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(project), str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(project / "mkdocs.yml"), "-d", str(site)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = mkdocs_build(ROOT, site)
    assert result.returncode == 0, result.stderr[-5000:]
    return site


def test_api_reference_documents_every_public_name_by_its_public_path(site):
    page = (site / "reference" / "api" / "index.html").read_text()
    for name in refinery_pipeline.__all__:
        assert f'id="refinery_pipeline.{name}"' in page, name
    private = [anchor for anchor in re.findall(r'id="refinery_pipeline\.([^"]+)"', page)
               if anchor.split(".")[0] not in refinery_pipeline.__all__]
    assert private == []  # no private module path (LabelStore's mixins render as its members)


def test_roles_in_a_mixin_s_docstrings_link_to_the_public_class(site):
    """LabelStore's methods live in one mixin per concern (store/reading.py, ...); a role in
    their docstrings (``:meth:`read``` in ``read_images``) still links to LabelStore's member."""
    page = (site / "reference" / "api" / "index.html").read_text()
    after = page.split('id="refinery_pipeline.LabelStore.read_images"', 1)[1]
    section = after.split('id="refinery_pipeline.', 1)[0]
    assert 'href="#refinery_pipeline.LabelStore.read"' in section


def test_cli_reference_documents_every_command(site):
    """Of the click group the page names (one place to change when the CLI moves)."""
    source = (ROOT / "docs" / "reference" / "cli.md").read_text()
    module, command = (re.search(rf":{key}: (\S+)", source).group(1)
                       for key in ("module", "command"))
    group = getattr(importlib.import_module(module), command)
    page = (site / "reference" / "cli" / "index.html").read_text()
    assert group.commands
    for name in group.commands:
        assert f'id="refine-{name}"' in page, name


def test_linked_results_are_pages_of_the_site(site):
    """README and the pages link benchmarks/results/*; the site serves them where they live."""
    assert (site / "benchmarks" / "results" / "parity_gpu_top10" / "index.html").is_file()
    assert (site / "benchmarks" / "results" / "parity_gpu_top10.png").is_file()
    assert (site / "examples" / "lightning_loop.py").is_file()
    front = (site / "index.html").read_text()
    assert 'href="benchmarks/results/parity_gpu_top10/"' in front


def test_training_loop_page_snippet_runs_as_printed(mixup_store, tiny_data):
    page = ROOT / "docs" / "guides" / "training-loop.md"
    run_snippet_as_printed(python_block(page, "# Your own training loop"),
                           "docs/guides/training-loop.md", mixup_store, tiny_data)


def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def tiny_project(root: Path, hook: str, index: str) -> Path:
    write(root / "mkdocs.yml", f"""\
        site_name: tiny
        theme: mkdocs
        hooks:
          - {HOOKS / hook}
        """)
    write(root / "docs" / "index.md", index)
    return root


def test_repository_files_join_the_site_and_a_missing_one_fails(tmp_path):
    project = tiny_project(tmp_path / "ok", "repo_files.py",
                           "# t\n\n[a](../results/a.md), [all](../results/), [run](../run.py)\n")
    write(project / "results" / "a.md",
          "# a\n\n![plot](a.png) [all runs](../run.py#L1) [home](../docs/index.md)\n")
    (project / "results" / "a.png").write_bytes(b"\x89PNG")
    write(project / "run.py", "print('run')\n")
    result = mkdocs_build(project, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "results" / "a" / "index.html").is_file()
    assert (tmp_path / "site" / "results" / "a.png").is_file()
    assert (tmp_path / "site" / "results" / "index.html").is_file()  # the folder's listing
    assert 'href="results/a/"' in (tmp_path / "site" / "index.html").read_text()
    page = (tmp_path / "site" / "results" / "a" / "index.html").read_text()
    assert '<a href="../../">home</a>' in page  # a brought-in page's link back into docs/
    assert '<a href="../../run.py#L1">all runs</a>' in page

    broken = tiny_project(tmp_path / "broken", "repo_files.py",
                          "# t\n\n[gone](../results/gone.md)\n")
    result = mkdocs_build(broken, tmp_path / "broken-site")
    assert result.returncode != 0
    assert "'index.md'" in result.stderr and "gone.md" in result.stderr


def test_public_names_need_a_reference_entry_and_docstrings(tmp_path):
    project = tiny_project(tmp_path, "public_api.py", "# t\n")
    write(project / "refinery_pipeline" / "__init__.py", '''\
        """A stand-in package."""
        __all__ = ["documented", "bare", "Thing"]


        def documented():
            """Documented."""


        def bare():
            return 1


        class Thing:
            """A thing."""

            def method(self):
                return 2
        ''')
    write(project / "docs" / "reference" / "api.md", """\
        # API
        ::: refinery_pipeline.documented
        ::: refinery_pipeline.Thing
        ::: refinery_pipeline.private_module.Helper
        """)
    result = mkdocs_build(project, tmp_path / "site")
    assert result.returncode != 0
    assert "refinery_pipeline.bare is public (__all__) but not in docs/reference/api.md" \
        in result.stderr
    assert "refinery_pipeline.bare (refinery_pipeline/__init__.py:9) is public but has no " \
        "docstring" in result.stderr
    assert "refinery_pipeline.Thing.method" in result.stderr
    assert "'::: refinery_pipeline.private_module.Helper' documents a private path" \
        in result.stderr
