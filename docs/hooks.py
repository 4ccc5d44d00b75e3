"""MkDocs hooks of the documentation site (``mkdocs.yml``).

* The pages link the committed runs as ``../benchmarks/results/...``, the path that works
  in the repository; the site publishes those files under ``benchmarks/results/`` and the
  links are pointed there.
* ``api.md`` is generated from the public API of ``qevo/__init__.py`` (``qevo.__all__``):
  one section per module, its docstring and the names ``qevo`` exports from it; the
  modules a script uses directly in full.
"""

from __future__ import annotations

import ast
import pathlib
import re

from mkdocs.structure.files import File

RESULTS = "benchmarks/results"
WHOLE = ("qevo.evolution.nsga3", "qevo.evolution.variation", "qevo.sharing.kmeans", "qevo.sharing.codebook",
         "qevo.models.losses", "qevo.config")
"""Modules documented with every public member: the pieces a research script calls directly
(docs/library.md), exported from ``qevo`` or not."""


def exports() -> dict[str, tuple[str, str]]:
    """``{public name: (module, name there)}`` of every name in ``qevo.__all__``, from the
    ``from qevo.x import y as z`` statements of ``qevo/__init__.py`` that import them."""
    import qevo

    tree = ast.parse(pathlib.Path(qevo.__file__).read_text())
    imported = {(alias.asname or alias.name): (node.module, alias.name) for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module for alias in node.names}
    return {public: imported[public] for public in qevo.__all__}


def api_page() -> str:
    """The API reference: per module, its docstring and the members ``qevo`` exports (all
    public members for the modules of :data:`WHOLE`)."""
    by_module: dict[str, list[tuple[str, str]]] = {}
    for public, (module, attr) in exports().items():
        by_module.setdefault(module, []).append((public, attr))
    lines = ["# API reference", "",
             "Everything `import qevo` exports, grouped by the module that defines it (`qevo.run_search` is "
             "`qevo.search.method.run`), and the modules a script uses directly. Generated from the docstrings.", ""]
    for module in [*by_module, *(m for m in WHOLE if m not in by_module)]:
        names = by_module.get(module, [])
        lines += [f"## `{module}`", ""]
        if names:
            public = ", ".join(f"`qevo.{p}`" + (f" (`{a}`)" if a != p else "") for p, a in names)
            lines += [f"Exported as {public}.", ""]
        lines.append(f"::: {module}")
        if module not in WHOLE:
            lines += ["    options:", "      members:", *(f"        - {a}" for _, a in names)]
        lines.append("")
    return "\n".join(lines)


def on_files(files, config):
    """The committed runs' files beside the pages, and the generated ``api.md``."""
    root = pathlib.Path(config.config_file_path).parent
    for path in sorted((root / RESULTS).rglob("*")):
        if path.is_file():
            files.append(File(path.relative_to(root).as_posix(), str(root), config.site_dir,
                              config.use_directory_urls))
    files.append(File.generated(config, "api.md", content=api_page()))
    return files


def on_page_markdown(markdown, page, config, files):
    """Links to ``../benchmarks/results/`` pointed at the published copies."""
    return re.sub(rf"\]\(\.\./{RESULTS}/", f"]({RESULTS}/", markdown)
