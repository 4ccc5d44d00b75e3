"""The import layers of ``pyproject.toml`` ([tool.importlinter]) hold, and break when they should."""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess:
    """import-linter's verdict on the ``qevo`` package under ``root`` (with the repository's
    contracts). Without ``site`` (``-S``), so that an editable install's import hook, which
    maps ``qevo`` to the repository, does not hide the copy under ``root``."""
    path = f"{root}{os.pathsep}{sysconfig.get_paths()['purelib']}"
    return subprocess.run([sys.executable, "-S", "-c", LINT], cwd=root, env={"PYTHONPATH": path},
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_package_keeps_its_layers():
    done = _lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, broken", [
    # an upward import: a foundation reaching a method
    ("quant/quantizers.py", "import qevo.search.method", "qevo.quant.quantizers -> qevo.search.method"),
    # the circle that once was: the harness importing the training method that imports it
    ("harness.py", "from qevo.train import MODEL as _M", "qevo.harness -> qevo.train"),
    # two independent methods importing each other
    ("sharing/method.py", "import qevo.coevolve.method", "qevo.sharing.method -> qevo.coevolve.method"),
    # the engine reaching the method table
    ("evolution/loop.py", "import qevo.methods", "qevo.evolution.loop -> qevo.methods"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, line, broken):
    shutil.copytree(REPO / "qevo", tmp_path / "qevo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path = tmp_path / "qevo" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    done = _lint(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 kept, 1 broken" in done.stdout and broken in done.stdout, done.stdout
