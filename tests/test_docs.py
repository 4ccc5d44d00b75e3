"""The documentation (README.md and docs/*.md) against the code and the committed results.

* Every ```python block runs, in a fresh interpreter in a scratch folder (``configs/`` at
  hand, the stored datasets in ``$QEVO_DATA_DIR``); an HTML comment ``<!-- docs-test: slow
  -->`` before a block marks it slow. A block that only includes an example script
  (``--8<-- "name.py"``, pymdownx.snippets) is that script, which a test of its own runs.
* Every figure link, ``[82.27%](.../benchmarks/results/<run>/<file> "100 * front_01.test_accuracy")``,
  equals the expression in its title over fields of its file, to the decimals it shows: a
  CSV field is ``<row name>.<column>``, a JSON field a dotted path (list items by index; a
  top-level key alone).
* The README's headline table, docs/results.md and docs/performance.md quote no figure
  outside such a link.
* docs/troubleshooting.md lists every message qevo raises as a ``QevoError``: its stable
  fragment (the literal text before the first value put in, or a longer literal part).
* The docstrings cite docs/spec.md by anchors that exist, and no other specification.
* Each method's page lists every config key of the method with its default, and the
  keys every command shares are on the getting-started page.
* CI installs what the README's install command installs.
"""

import ast
import csv
import dataclasses
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Sequence

import pytest

from qevo import config as config_lib
from qevo.coevolve import config as coevolve_config
from qevo.search import config as search_config
from qevo.sharing import config as sharing_config

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
RESULTS = "benchmarks/results/"

# ---------------------------------------------------------------------------- figures

LINK = re.compile(r'\[([^\]]+)\]\(([^)\s]+) "([^"]+)"\)')
FIELD = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.\w+)*")
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.(\d+))?")


@dataclasses.dataclass(frozen=True)
class Figure:
    """A number a page quotes (``text``), the committed ``file`` it comes from and the
    ``expression`` over that file's fields that gives it."""

    page: pathlib.Path
    text: str
    file: pathlib.Path
    expression: str

    def __str__(self):
        return f"{self.page.name}: [{self.text}]({os.path.relpath(self.file, self.page.parent)} {self.expression!r})"


def figures(page: pathlib.Path, markdown: str) -> list[Figure]:
    """The figure links of ``markdown`` (a page at ``page``): links with a title to a file of
    ``benchmarks/results/``."""
    return [Figure(page, text, (page.parent / target).resolve(), expression)
            for text, target, expression in LINK.findall(markdown) if RESULTS in target]


def field(file: pathlib.Path, name: str) -> float:
    """The value of field ``name`` of a CSV (``<row name>.<column>``) or JSON (dotted path) file."""
    if file.suffix == ".csv":
        row, column = name.split(".", 1)
        with file.open() as f:
            rows = {r["name"]: r for r in csv.DictReader(f)}
        return float(rows[row][column])
    value = json.loads(file.read_text())
    for part in name.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return float(value)


def evaluate(figure: Figure) -> float:
    """The figure's expression: its fields replaced by their values, then the arithmetic
    (numbers, + - * /, parentheses)."""
    names = {}

    def name(match):
        names[f"f{len(names)}"] = field(figure.file, match.group(0))
        return f"f{len(names) - 1}"

    tree = ast.parse(FIELD.sub(name, figure.expression), mode="eval")
    operators = {ast.Add: float.__add__, ast.Sub: float.__sub__, ast.Mult: float.__mul__, ast.Div: float.__truediv__}

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            return operators[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        raise ValueError(f"{figure}: {ast.unparse(node)!r} is no field, number or + - * / of them")

    return walk(tree.body)


def disagreement(figure: Figure) -> str | None:
    """None if the number the figure shows is its expression's value rounded to the decimals
    shown; else what differs."""
    match = NUMBER.search(figure.text)
    if match is None:
        return f"{figure}: the link text holds no number"
    shown, decimals = float(match.group(0).replace(",", "")), len(match.group(1) or "")
    value = evaluate(figure)
    if abs(shown - value) > 0.5 * 10.0**-decimals * (1 + 1e-9):
        return f"{figure}: shows {match.group(0)}, the file gives {value!r}"
    return None


ALL_FIGURES = [f for page in PAGES for f in figures(page, page.read_text())]


@pytest.mark.parametrize("figure", ALL_FIGURES, ids=str)
def test_each_figure_equals_its_committed_file(figure):
    assert figure.file.is_file(), f"{figure}: no such file"
    assert disagreement(figure) is None, disagreement(figure)


def headline_rows(readme: str) -> list[str]:
    """The rows of the README's table of headline figures (its ``headline figure`` column)."""
    table = readme[readme.index("| method | headline figure | run |"):].split("\n\n")[0]
    return [line.split(" | ")[1] for line in table.splitlines()[2:]]


def test_the_readme_quotes_each_headline_figure_from_its_file():
    rows = headline_rows((REPO / "README.md").read_text())
    assert len(rows) == 3
    for row in rows:
        assert figures(REPO / "README.md", row), row
        unlinked = re.findall(r"\d+\.\d+", LINK.sub("", row))
        assert not unlinked, f"figures {unlinked} of the README's headline table link to no committed file: {row}"


def test_the_checker_catches_a_changed_figure_a_changed_file_and_an_unlinked_figure(tmp_path):
    """The checks above on altered copies: the README's first headline figure, the run file
    it reads, and a headline figure written without its link."""
    readme = (REPO / "README.md").read_text()
    row = headline_rows(readme)[0]
    first = figures(REPO / "README.md", row)[0]
    assert (first.text, first.expression) == ("82.27%", "100 * front_01.test_accuracy")
    assert disagreement(first) is None

    changed = figures(REPO / "README.md", row.replace("[82.27%]", "[82.72%]", 1))[0]
    assert "shows 82.72, the file gives 82.27" in disagreement(changed)

    run = tmp_path / "benchmarks" / "results" / "resnet20_cpu_search3"
    run.mkdir(parents=True)
    text = first.file.read_text()
    assert text.count("0.822700023651123") == 1
    (run / "final.csv").write_text(text.replace("0.822700023651123", "0.8217000126838684"))
    moved = figures(tmp_path / "README.md", row)[0]
    assert moved.file == run / "final.csv" and "shows 82.27, the file gives 82.17" in disagreement(moved)

    unlinked = readme.replace(f"[82.27%]({first.file.relative_to(REPO)} \"{first.expression}\")", "82.27%")
    assert unlinked != readme
    assert re.findall(r"\d+\.\d+", LINK.sub("", headline_rows(unlinked)[0])) == ["82.27"]


FIGURE_PAGES = (REPO / "docs" / "results.md", REPO / "docs" / "performance.md")
"""The pages of figures: every figure they quote is a figure link."""
UNLINKED = re.compile(r"\d[\d,]*(?:\.\d+)?\s?[%\u00d7]|\d[\d,]*\.\d+")
"""A figure written out: a number with decimals, a percentage or a ratio (a number and a times sign). Whole numbers
are also settings (264 evaluations, P = 1024), so they are not told apart from figures."""


def unlinked_figures(markdown: str) -> list[str]:
    """The figures ``markdown`` quotes outside its figure links (code and link targets aside)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "]", LINK.sub("", text))
    return UNLINKED.findall(re.sub(r"`[^`]*`", "", text))


@pytest.mark.parametrize("page", FIGURE_PAGES, ids=lambda p: p.name)
def test_the_figure_pages_quote_each_figure_from_its_file(page):
    markdown = page.read_text()
    assert len(figures(page, markdown)) >= 40, f"{page.name}: its figures are no longer links"
    unlinked = unlinked_figures(markdown)
    assert not unlinked, (f"{page.name} quotes figures {unlinked} that link to no committed file; write each as "
                          '[figure](../benchmarks/results/<run>/<file> "<expression>")')


def test_the_figure_page_checks_catch_an_unlinked_and_a_changed_figure():
    """The checks above on altered copies of docs/results.md: its first figure (a top-level
    field of a JSON file) written without its link, and changed."""
    page = FIGURE_PAGES[0]
    markdown = page.read_text()
    first = figures(page, markdown)[0]
    assert (first.text, first.expression) == ("87.27%", "100 * test_accuracy") and disagreement(first) is None
    link = f'[87.27%](../benchmarks/results/resnet20_cpu_float52_bf16/results.json "{first.expression}")'
    assert unlinked_figures(markdown.replace(link, "87.27%")) == ["87.27%"]
    changed = figures(page, markdown.replace("[87.27%]", "[87.72%]", 1))[0]
    assert "shows 87.72, the file gives 87.26" in disagreement(changed)


# ---------------------------------------------------------------------------- error messages

TROUBLESHOOTING = REPO / "docs" / "troubleshooting.md"


def user_errors(errors: pathlib.Path) -> frozenset[str]:
    """``QevoError`` and the classes of ``errors`` (qevo/errors.py) derived from it."""
    found = {"QevoError"}
    for node in ast.parse(errors.read_text()).body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) in found for b in node.bases):
            found.add(node.name)
    return frozenset(found)


USER_ERRORS = user_errors(REPO / "qevo" / "errors.py")
"""The user errors: the message of each raise of one is on docs/troubleshooting.md."""


@dataclasses.dataclass(frozen=True)
class Message:
    """A message qevo raises as a user error: where (``file:line``), the error class, and
    the message's literal text, split where a value is put in (``parts``)."""

    where: str
    kind: str
    parts: tuple[str, ...]

    @property
    def fragment(self) -> str:
        """The stable text the page must hold: the literal prefix up to the first value if
        it has three words or more; else the literal part of the most words, of the message
        proper (before the fix it suggests, from its first ``; ``) where one has three, or
        of the whole message. Without the punctuation around the values."""
        def words(text):
            return len(re.findall(r"[A-Za-z]\w*", text))

        fix = next((i for i, p in enumerate(self.parts) if "; " in p), len(self.parts))
        proper = [*self.parts[:fix], *(self.parts[fix].split("; ")[:1] if fix < len(self.parts) else [])]
        candidates = [proper[0], max(proper, key=words), max(self.parts, key=words)]
        return next((c for c in candidates if words(c) >= 3), candidates[-1]).lstrip(" ,:;)]").rstrip(" ,:;(")


def error_class(node: ast.expr, aliases: dict[str, str] | None = None) -> str | None:
    """The :data:`USER_ERRORS` class ``node`` names (``ConfigError``, ``config_lib.ConfigError``,
    or a name in ``aliases``, ``{name: class}``), else None."""
    if isinstance(node, ast.Name):
        return node.id if node.id in USER_ERRORS else (aliases or {}).get(node.id)
    if isinstance(node, ast.Attribute) and node.attr in USER_ERRORS:
        return node.attr
    return None


def literal_parts(node: ast.expr) -> tuple[str, ...] | None:
    """The literal text of a message expression (a str, an f-string or a ``+`` of them),
    split at each value put in; None for an expression of another kind."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (node.value,)
    if isinstance(node, ast.JoinedStr):
        parts = [""]
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts[-1] += value.value
            else:
                parts.append("")
        return tuple(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = literal_parts(node.left), literal_parts(node.right)
        if left is not None or right is not None:  # a value of another kind: a value put in
            left, right = left or ("", ""), right or ("", "")
            return (*left[:-1], left[-1] + right[0], *right[1:])
    return None


def error_messages(package: pathlib.Path) -> list[Message]:
    """The message of every raise of a :data:`USER_ERRORS` class in the ``*.py`` of ``package``.

    A raise names the class (``ConfigError(...)``, ``config_lib.ConfigError(...)``), a name
    bound to it (``err = config_lib.ConfigError``), or a function that returns one (``raise
    _needs(...)``: the messages of its returns). A message held in a name (``problem =
    unwritable(...)``) is what the function of ``package`` that set it returns. A message of
    any other form is a ``ValueError``: none goes unchecked."""
    root = package.parent
    files = {}  # path: (imports {name: (module, name)}, aliases {name: class}, functions, raises)
    for path in sorted(package.rglob("*.py")):
        imports, aliases, functions, raises = {}, {}, [], []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imports |= {alias.asname or alias.name: (node.module, alias.name) for alias in node.names}
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
                unpacked = isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                pairs = zip(target.elts, value.elts, strict=False) if unpacked else [(target, value)]
                aliases |= {t.id: error_class(v) for t, v in pairs if isinstance(t, ast.Name) and error_class(v)}
            elif isinstance(node, ast.FunctionDef):
                functions.append(node)
            elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                raises.append(node)
        files[path] = imports, aliases, functions, raises

    def module(path):
        return path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")

    top = {(module(path), f.name): (path, f) for path, (_, _, functions, _) in files.items()
           for f in functions if f.col_offset == 0}

    def function(path, name):
        """The ``(path, def)`` of the module-level function ``name`` means in ``path``, or None."""
        return top.get((module(path), name)) or top.get(files[path][0].get(name, ("", "")))

    def returns(function):
        return [n.value for n in ast.walk(function) if isinstance(n, ast.Return) and n.value is not None]

    def messages(path, call, kind, site):
        """The messages of ``call``, an error class ``kind`` called in ``path``, raised at ``site``."""
        parts = literal_parts(call.args[0]) if call.args else None
        if parts is not None:
            return [Message(f"{path.relative_to(root)}:{call.lineno}", kind, parts)]
        if call.args and isinstance(call.args[0], ast.Name):
            scope = max((f for f in files[path][2] if f.lineno <= call.lineno <= (f.end_lineno or 0)),
                        key=lambda f: f.lineno, default=None)
            setters = [n.value for n in ast.walk(scope) if scope is not None
                       and ((isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == [call.args[0].id])
                            or (isinstance(n, ast.NamedExpr) and n.target.id == call.args[0].id))]
            made = [function(path, v.func.id) for v in setters
                    if isinstance(v, ast.Call) and isinstance(v.func, ast.Name)]
            found = [Message(f"{p.relative_to(root)}:{r.lineno}", kind, parts)
                     for p, f in filter(None, made) for r in returns(f) if (parts := literal_parts(r)) is not None]
            if found:
                return found
        raise ValueError(f"{site}: the message of {ast.unparse(call)[:80]} is no str, f-string or "
                         "result of a function that returns them")

    out = []
    for path, (_, aliases, _, raises) in files.items():
        for node in raises:
            site, call = f"{path.relative_to(root)}:{node.lineno}", node.exc
            if kind := error_class(call.func, aliases):
                out += messages(path, call, kind, site)
            elif isinstance(call.func, ast.Name) and (helper := function(path, call.func.id)) is not None:
                helper_aliases = files[helper[0]][1]
                out += [m for r in returns(helper[1]) if isinstance(r, ast.Call)
                        and (kind := error_class(r.func, helper_aliases)) for m in messages(helper[0], r, kind, site)]
    unique = {(m.where, m.parts): m for m in out}
    return sorted(unique.values(), key=lambda m: (m.where.split(":")[0], int(m.where.split(":")[1])))


def unlisted(messages: Sequence[Message], page: str) -> list[str]:
    """``file:line: fragment`` of each message whose fragment ``page`` does not hold (a
    table's ``\\|`` read as ``|``, runs of white space as one)."""
    text = " ".join(page.replace("\\|", "|").split())
    return [f"{m.where}: {m.kind}: {m.fragment!r}" for m in messages if " ".join(m.fragment.split()) not in text]


@functools.cache
def qevo_messages() -> tuple[Message, ...]:
    """:func:`error_messages` of ``qevo/``, read once per session."""
    return tuple(error_messages(REPO / "qevo"))


def test_troubleshooting_lists_every_error_message():
    kinds = {"QevoError", "ConfigError", "DataError", "CheckpointError", "PopulationMemoryError", "ExportError"}
    assert kinds <= USER_ERRORS, f"qevo/errors.py defines {sorted(USER_ERRORS)}"
    messages = qevo_messages()
    assert len(messages) > 200, f"found only {len(messages)} messages: the walk over qevo/ misses raises"
    missing = unlisted(messages, TROUBLESHOOTING.read_text())
    assert not missing, (f"docs/troubleshooting.md lacks {len(missing)} error messages; add each to its topic's "
                         "table with what to do:\n" + "\n".join(missing))


def test_the_message_walk_finds_each_form_of_raise_and_names_a_missing_one(tmp_path):
    """:func:`error_messages` on a package of each form a raise takes, and :func:`unlisted` on
    the real page less one row."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "files.py").write_text(
        "def unwritable(path):\n"
        "    if path:\n"
        "        return None\n"
        "    return f'{path} cannot be written; pass a path you can write to'\n")
    (package / "a.py").write_text(
        "from qevo.errors import ConfigError, DataError\n"
        "from qevo import config as config_lib\n"
        "from pkg.files import unwritable\n"
        "def _needs(what):\n"
        "    return ConfigError(f'exporting needs {what}: pip install it')\n"
        "def f(cfg, x):\n"
        "    s, err = cfg.s, config_lib.ConfigError\n"
        "    if x == 1:\n"
        "        raise DataError('a constant message of words; with its fix')\n"
        "    if x == 2:\n"
        "        raise err(f'config s.{x}={x!r} is not one of {x}')\n"
        "    if x == 3:\n"
        "        raise config_lib.ConfigError(f'config s.k_max={x} is invalid; use 2..128')\n"
        "    if x == 4:\n"
        "        raise _needs('onnx')\n"
        "    if x == 5:\n"
        "        raise ConfigError(f'--model {x} is not a model of this run; choose one of ' + ', '.join(x))\n"
        "    if (problem := unwritable(x)) is not None:\n"
        "        raise ConfigError(problem)\n"
        "    raise ValueError(f'{x}: a bug, not a user error')\n")
    found = {m.where: (m.kind, m.fragment) for m in error_messages(package)}
    assert found == {
        "pkg/a.py:5": ("ConfigError", "pip install it"),
        "pkg/a.py:9": ("DataError", "a constant message of words"),
        "pkg/a.py:11": ("ConfigError", "is not one of"),
        "pkg/a.py:13": ("ConfigError", "config s.k_max="),
        "pkg/a.py:17": ("ConfigError", "is not a model of this run"),
        "pkg/files.py:4": ("ConfigError", "cannot be written"),
    }, found

    (package / "b.py").write_text("from qevo.errors import ConfigError\n"
                                  "def g(message):\n    raise ConfigError(message)\n")
    with pytest.raises(ValueError, match=r"pkg/b\.py:3: the message of ConfigError"):
        error_messages(package)

    page = TROUBLESHOOTING.read_text()
    row = next(line for line in page.splitlines() if "config sharing.kmeans_iters=" in line)
    missing = unlisted(qevo_messages(), page.replace(row + "\n", ""))
    assert missing and all(m.split(":")[0].startswith("qevo/") for m in missing), missing
    assert any(m.startswith("qevo/sharing/config.py:") and "config sharing.kmeans_iters=" in m for m in missing)


# ---------------------------------------------------------------------------- code blocks

BLOCK = re.compile(r"(?:<!-- docs-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
SNIPPET = re.compile(r'--8<-- "([^"]+)"')


def code_blocks():
    """``pytest.param(page, line, code)`` of every python block, slow where marked."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code")) + 1
            if m.group("mark") not in (None, "slow"):
                raise ValueError(f"{page.name}:{line}: unknown mark <!-- docs-test: {m.group('mark')} -->")
            marks = [pytest.mark.slow] if m.group("mark") == "slow" else []
            out.append(pytest.param(page, line, m.group("code"), marks=marks, id=f"{page.name}:{line}"))
    return out


@pytest.mark.parametrize("page, line, code", code_blocks())
def test_each_python_block_runs(page, line, code, data_dir, tmp_path):
    included = SNIPPET.findall(code)
    if included:
        assert SNIPPET.sub("", code).strip() == "", f"{page.name}:{line}: a block includes a script or is code"
        tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py") if p.name != "test_docs.py")
        for name in included:
            assert (REPO / "docs" / "examples" / name).is_file(), f"{page.name}:{line}: no docs/examples/{name}"
            assert f'"{name}"' in tests, f"{page.name}:{line}: no test runs docs/examples/{name}"
        return
    (tmp_path / "configs").symlink_to(REPO / "configs")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "QEVO_DATA_DIR": str(data_dir)}, check=False)
    assert done.returncode == 0, f"{page.name}, the block at line {line}:\n{done.stderr[-3000:]}"


# ---------------------------------------------------------------------------- the specification


def anchors(markdown: str) -> list[str]:
    """The anchors of a page's headings, as MkDocs and GitHub make them from plain headings."""
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return [re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings]


def test_the_docstrings_cite_sections_of_docs_spec_that_exist():
    spec = anchors((REPO / "docs" / "spec.md").read_text())
    assert len(spec) == len(set(spec)), "docs/spec.md repeats a heading: its anchors must be unique"
    cited = {}
    for path in sorted((REPO / "qevo").rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(REPO))
        assert not re.search(r"\bSPEC\b", text), f"{name} cites a specification outside the repository"
        for anchor in re.findall(r"docs/spec\.md#([\w-]+)", text):
            cited.setdefault(anchor, []).append(name)
    assert {"quantizers", "coevolution", "weight-sharing", "compression-rate"} <= set(spec)
    assert {"search-protocol", "weight-sharing", "coevolution", "clustering"} <= set(cited)
    missing = {a: files for a, files in cited.items() if a not in spec}
    assert not missing, f"docs/spec.md has no sections {missing}"


# ---------------------------------------------------------------------------- config tables


def config_table(page: pathlib.Path) -> dict:
    """``{key: default}`` of the rows ``| `key` | `default` | meaning |`` of a page."""
    rows = re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", page.read_text(), re.M)
    return {key: ast.literal_eval(default) for key, default in rows}


SHARED = config_lib.flatten(config_lib.defaults())


@pytest.mark.parametrize("page, defaults", [
    ("search.md", search_config.defaults), ("sharing.md", sharing_config.defaults),
    ("coevolution.md", coevolve_config.defaults),
    ("getting-started.md", config_lib.defaults)])
def test_each_page_lists_its_config_keys_with_their_defaults(page, defaults):
    flat = config_lib.flatten(defaults())
    want = flat if defaults is config_lib.defaults else {k: v for k, v in flat.items() if k not in SHARED}
    assert config_table(REPO / "docs" / page) == want


def test_ci_installs_what_the_readme_says():
    command = re.compile(r'pip install -e "\.\[[\w,]+\]"')
    readme = command.findall((REPO / "README.md").read_text())[0]
    assert command.findall((REPO / ".ci" / "run").read_text()) == [readme]
    assert command.findall((REPO / "docs" / "getting-started.md").read_text())[0] == readme
    assert "docs" in readme and "test" in readme
