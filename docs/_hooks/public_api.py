"""The public API on the site: its reference is complete, documented, and linked by name.

Two parts, both keyed on ``refinery_pipeline.__all__`` (the public API) and read statically by
griffe, so nothing is imported:

* an MkDocs hook (``on_files``) that fails ``mkdocs build --strict`` when a public name has no
  ``::: refinery_pipeline.NAME`` entry in the reference page, when a page documents a private
  path (``::: refinery_pipeline.label_store.X``: it would break when modules move), or when a
  public name, or a public method of a public class, has no docstring;
* a griffe extension (``SphinxRolesAsLinks``, named in ``mkdocs.yml``) for the docstrings' roles.

The docstrings' Sphinx roles as links of the site's API reference:
The numpy docstrings name other objects with Sphinx roles (``:class:`CropBatch```,
``:meth:`LabelStore.read_crops```, ``:func:`.sources.open_source```), which read well in
``help()`` and an editor but which Markdown shows as raw text. For the site only (the source is
untouched), each role becomes

* a cross-reference ``[CropBatch][refinery_pipeline.CropBatch]`` when it names a public object
  (a name of ``refinery_pipeline.__all__``, a member of one, or a member of the class whose
  docstring it is in) that the reference renders (it has a docstring);
* inline code otherwise (private modules and helpers are not on the site: ``__all__`` is the
  public API, and the reference is generated from it alone).

So the links follow the public names, not the module paths, and a restructure of the package
leaves them intact; an unresolved cross-reference fails ``mkdocs build --strict``.
"""
import ast
import logging
import os
import re

import griffe

log = logging.getLogger("mkdocs.hooks.public_api")
REFERENCE_PAGE = "reference/api.md"
DIRECTIVE = re.compile(r"^:::\s+(\S+)", re.MULTILINE)

PACKAGE = "refinery_pipeline"
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|exc|mod|obj|const):`([^`]+)`")


def public_names(pkg) -> list:
    """``__all__`` of the package, read from its source (nothing is imported)."""
    return list(ast.literal_eval(str(pkg.members["__all__"].value)))


def _documented(pkg, path: str):
    """The object at a public dotted path below the package when it has a docstring, else None."""
    try:
        obj = pkg[path]
        target = obj.final_target if obj.is_alias else obj
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    return target if target.docstring else None


class SphinxRolesAsLinks(griffe.Extension):
    """Rewrite every docstring's roles once the package is loaded (see the module docstring)."""

    def on_package(self, *, pkg, **kwargs):
        if pkg.name != PACKAGE:
            return
        public = public_names(pkg)
        owners = {}  # canonical path of a public class (or its mixin) -> its public name
        publicly = {}  # canonical path of a public object or class member -> its public path
        targets = {name: _documented(pkg, name) for name in public}
        public_paths = {target.path for target in targets.values() if target is not None}
        for name, target in targets.items():
            if target is None:
                continue
            publicly[target.path] = name
            if not target.is_class:
                continue
            # A private base (LabelStore's mixins, one per concern) holds methods of the public
            # class: its docstrings' roles name the public class's members, and link there.
            mixins = [base for base in target.mro() if base.path not in public_paths]
            for cls in [target, *mixins]:
                owners[cls.path] = name
                publicly.update((member.path, f"{name}.{member_name}")
                                for member_name, member in cls.members.items()
                                if not member.is_alias)
        for obj in _walk(pkg):
            if obj.docstring is not None:
                owner = owners.get(obj.path) or owners.get(getattr(obj.parent, "path", None))
                obj.docstring.value = ROLE.sub(
                    lambda m: _rewrite(m.group(1), pkg, public, publicly, owner),
                    obj.docstring.value)


def _rewrite(reference: str, pkg, public: list, publicly: dict, owner) -> str:
    """One role's text: a cross-reference to a documented public object (named by a public
    path, by a member of the docstring's own class, or by the module path of a public object,
    ``.crop_batch.CropBatch``), else inline code."""
    text = reference.strip()
    shown = text.lstrip("~.").split(".")[-1] if text.startswith("~") else text.lstrip(".")
    path = text.lstrip("~.")
    if path.startswith(PACKAGE + "."):
        path = path[len(PACKAGE) + 1:]
    candidates = []
    if path.split(".")[0] in public:
        candidates.append(path)
    if owner is not None:
        candidates.append(f"{owner}.{path}")
    candidates.append(publicly.get(f"{PACKAGE}.{path}"))
    for candidate in filter(None, candidates):
        if _documented(pkg, candidate) is not None:
            return f"[`{shown}`][{PACKAGE}.{candidate}]"
    return f"`{shown}`"


def _walk(obj):
    """The object and every object defined below it (aliases are someone else's)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def on_files(files, config):
    """Check the reference against ``__all__`` and the public docstrings (see the top)."""
    root = os.path.dirname(os.path.abspath(config.config_file_path))
    pkg = griffe.load(PACKAGE, search_paths=[root], docstring_parser="numpy")
    public = public_names(pkg)
    documented = {}
    for page in files.documentation_pages():
        for path in DIRECTIVE.findall(page.content_string):
            documented.setdefault(path, []).append(page.src_uri)
    for path, pages in documented.items():
        if path.startswith(PACKAGE) and path.split(".")[1:2] and path.split(".")[1] not in public:
            log.warning(f"{pages[0]}: '::: {path}' documents a private path; name the public "
                        f"object instead ('::: {PACKAGE}.NAME', NAME in {PACKAGE}.__all__)")
    reference = files.get_file_from_path(REFERENCE_PAGE)
    listed = DIRECTIVE.findall(reference.content_string) if reference else []
    for name in public:
        if f"{PACKAGE}.{name}" not in listed:
            log.warning(f"{PACKAGE}.{name} is public (__all__) but not in docs/{REFERENCE_PAGE}: "
                        f"add '::: {PACKAGE}.{name}' under its section")
    for path, obj in _undocumented(pkg, public):
        log.warning(f"{PACKAGE}.{path} ({obj.relative_filepath}:{obj.lineno}) is public but has "
                    f"no docstring: write a numpy-style one")
    return files


def _undocumented(pkg, public: list):
    """Public names, and the public methods of public classes, that have no docstring."""
    for name in public:
        target = pkg[name].final_target if pkg[name].is_alias else pkg[name]
        if not target.docstring:
            yield name, target
        if not target.is_class:
            continue
        for member_name, member in target.all_members.items():
            member = member.final_target if member.is_alias else member
            if member.is_function and not member_name.startswith("_") and not member.docstring:
                yield f"{name}.{member_name}", member
