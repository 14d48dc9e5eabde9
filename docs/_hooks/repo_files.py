"""MkDocs hook: repository files that the documentation links to become part of the site.

The pages under ``docs/`` are read in two places: on the site and in the repository (GitHub,
an editor), and they link the measured results, scripts and examples where they live
(``../benchmarks/results/parity_gpu.md``, ``../examples``). MkDocs only knows files inside
``docs_dir``, so ``--strict`` would refuse every such link, and copying the results into
``docs/`` would keep two copies of each. Instead, at build time, this hook

* follows every relative link of every page (and of every file it brings in, so a results page's
  plots and neighbours come along) to the repository file or folder it names;
* adds each one outside ``docs/`` to the site at its repository path (``benchmarks/results/x.md``
  is served as ``/benchmarks/results/x/``; a folder gets a generated listing page), kept out of
  the navigation;
* rewrites those links to the added copies, so MkDocs checks them like any other link.

A link to a file that does not exist is left as written, and ``--strict`` fails on it, naming
the page. Nothing is hard-wired to a folder: when the repository's layout changes, the links
that still resolve keep working and the ones that do not fail the build.
"""
import logging
import os
import posixpath
import re

from mkdocs.structure.files import File, InclusionLevel

log = logging.getLogger("mkdocs.hooks.repo_files")

# Inline links and images: ](target) or ](target "title"); the target ends at a space or ')'.
LINK = re.compile(r"(\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
SKIPPED_NAMES = {"__pycache__"}

# repository path (posix, relative to the root) -> the site file standing for it
_brought_in = {}


def _repo_root(config) -> str:
    return os.path.dirname(os.path.abspath(config.config_file_path))


def _docs_prefix(config) -> str:
    """``docs_dir`` as a repository path, e.g. ``docs``."""
    return os.path.relpath(config.docs_dir, _repo_root(config)).replace(os.sep, "/")


def _relative_target(url: str):
    """The path and the ``#fragment`` of a link to a local file, or None for any other link."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) or url.startswith(("#", "/", "\\")):
        return None
    path, _, fragment = url.partition("#")
    return (path, fragment) if path else None


def _linked_repo_paths(text: str, repo_path: str, root: str):
    """Repository paths (existing or not) of the local links in ``text`` of file ``repo_path``."""
    for match in LINK.finditer(text):
        target = _relative_target(match.group(2))
        if target is None:
            continue
        linked = posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), target[0]))
        if not linked.startswith("../") and os.path.exists(os.path.join(root, linked)):
            yield linked


def _folder_listing(repo_path: str, root: str) -> str:
    """A page listing a linked folder's entries, each linked (and so brought in too)."""
    folder = os.path.join(root, repo_path)
    entries = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or name in SKIPPED_NAMES:
            continue
        is_folder = os.path.isdir(os.path.join(folder, name))
        entries.append(f"- [`{name}{'/' if is_folder else ''}`]"
                       f"({name}{'/index.md' if is_folder else ''})")
    listing = "\n".join(entries)
    return f"# `{repo_path}/`\n\nThe repository folder `{repo_path}/`:\n\n{listing}\n"


def _bring_in(repo_path: str, config, files) -> File:
    """Add one repository file or folder (as a listing page) to the site, not in the nav."""
    root = _repo_root(config)
    absolute = os.path.join(root, repo_path)
    if os.path.isdir(absolute):
        site_uri = repo_path + "/index.md"
        file = File.generated(config, site_uri, content=_folder_listing(repo_path, root),
                              inclusion=InclusionLevel.NOT_IN_NAV)
    else:
        site_uri = repo_path
        file = File.generated(config, site_uri, abs_src_path=absolute,
                              inclusion=InclusionLevel.NOT_IN_NAV)
    if files.get_file_from_path(site_uri) is not None:
        log.warning(f"repository file '{repo_path}' is linked from the docs but '{site_uri}' "
                    f"is already a page of the site: rename one of them")
        return files.get_file_from_path(site_uri)
    files.append(file)
    return file


def on_files(files, config):
    """Bring in every repository file the pages link to, following links transitively."""
    _brought_in.clear()
    root = _repo_root(config)
    docs = _docs_prefix(config)
    pending = list(files.documentation_pages())
    while pending:
        file = pending.pop()
        for linked in _linked_repo_paths(file.content_string, _repo_path_of(file, config), root):
            if linked.startswith(docs + "/") or linked == docs or linked in _brought_in:
                continue
            _brought_in[linked] = _bring_in(linked, config, files)
            if _brought_in[linked].src_uri.endswith(".md"):
                pending.append(_brought_in[linked])
    return files


def on_page_markdown(markdown, page, config, files):
    """Point the page's links to repository files at the copies ``on_files`` brought in (and a
    brought-in page's links back into ``docs/`` at the pages they name)."""
    repo_path = _repo_path_of(page.file, config)
    docs = _docs_prefix(config) + "/"
    brought_in = any(file is page.file for file in _brought_in.values())

    def rewrite(match):
        target = _relative_target(match.group(2))
        if target is None:
            return match.group(0)
        linked = posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), target[0]))
        if linked in _brought_in:
            site_file = _brought_in[linked].src_uri
        elif brought_in and linked.startswith(docs):
            site_file = linked[len(docs):]
        else:
            return match.group(0)
        new = posixpath.relpath(site_file, posixpath.dirname(page.file.src_uri) or ".")
        return match.group(1) + new + (f"#{target[1]}" if target[1] else "") + match.group(3)

    return LINK.sub(rewrite, markdown)


def _repo_path_of(file: File, config) -> str:
    """The repository path a page's links are relative to (a folder listing: inside it)."""
    if any(brought is file for brought in _brought_in.values()):
        return file.src_uri
    return f"{_docs_prefix(config)}/{file.src_uri}"
