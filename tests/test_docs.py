"""The documentation (README.md and docs/*.md) against the code and the committed results.

* Every ```python block runs, in a fresh interpreter in a scratch folder (``configs/`` at
  hand, the stored datasets in ``$QEVO_DATA_DIR``); an HTML comment ``<!-- docs-test: slow
  -->`` before a block marks it slow. A block that only includes an example script
  (``--8<-- "name.py"``, pymdownx.snippets) is that script, which a test of its own runs.
* Every figure link, ``[82.27%](.../benchmarks/results/<run>/<file> "100 * front_01.test_accuracy")``,
  equals the expression in its title over fields of its file, to the decimals it shows: a
  CSV field is ``<row name>.<column>``, a JSON field a dotted path (list items by index).
* The README's headline table quotes no figure outside such a link.
* The docstrings cite docs/spec.md by anchors that exist, and no other specification.
* Each method's page lists every config key of the method with its default, and the
  keys every command shares are on the getting-started page.
* CI installs what the README's install command installs.
"""

import ast
import csv
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

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
FIELD = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.\w+)+")
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
