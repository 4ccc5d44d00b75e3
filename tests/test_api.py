"""The public API at the package top: ``qevo/__init__.py`` imports most names and reaches the
names of the command modules when first used."""

import ast
import importlib
import inspect
import pathlib
import subprocess
import sys

import pytest

import qevo

TREE = ast.parse(pathlib.Path(qevo.__file__).read_text())
# the modules that are also commands (python -m qevo.<command>), and those that import one
COMMANDS = ("qevo.data", "qevo.train", "qevo.search", "qevo.compress", "qevo.coevolve", "qevo.export")
IMPORTING_A_COMMAND = ("qevo.population", "qevo.sharing")


def _imports(body) -> dict[str, tuple[str, str]]:
    """``{name bound: (module, name there)}`` of the ``from qevo.x import y as z`` statements in ``body``."""
    return {(alias.asname or alias.name): (node.module, alias.name)
            for node in body if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qevo.")
            for alias in node.names}


EAGER = _imports(TREE.body)
TYPE_CHECKING_BLOCK = next(node for node in TREE.body
                           if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")


@pytest.mark.parametrize("name", qevo.__all__)
def test_every_export_is_its_module_attribute_and_documented(name):
    module, attr = EAGER.get(name) or qevo._LAZY[name]
    assert getattr(qevo, name) is getattr(importlib.import_module(module), attr)
    assert not attr.startswith("_")
    if callable(getattr(qevo, name)):
        assert inspect.getdoc(getattr(qevo, name)), f"{name} has no docstring"


def test_all_is_the_imported_names_and_the_names_used_first():
    assert len(qevo.__all__) == len(set(qevo.__all__)) == 76
    assert not set(EAGER) & set(qevo._LAZY)
    assert sorted(qevo.__all__) == sorted([*EAGER, *qevo._LAZY])
    assert not {module for module, _ in EAGER.values()} & {*COMMANDS, *IMPORTING_A_COMMAND}
    assert {module for module, _ in qevo._LAZY.values()} == {*COMMANDS, *IMPORTING_A_COMMAND, "qevo.drivers"}


def test_type_checkers_see_exactly_the_names_used_first():
    assert _imports(TYPE_CHECKING_BLOCK.body) == qevo._LAZY


def test_importing_qevo_imports_no_command_evosax_or_onnx():
    """A module imported with the package would run a second time as ``python -m`` its
    command; evosax computes at import; onnx and onnxruntime are an optional extra (here
    hidden, as if not installed: the export's name still resolves)."""
    script = ("import sys\n"
              "sys.modules['onnx'] = sys.modules['onnxruntime'] = None\n"
              "import jax._src.xla_bridge as xb\n"
              "xb.backends = lambda *a, **k: sys.exit('a backend was started at import')\n"
              "import qevo\n"
              f"print(sorted(m for m in sys.modules if m in {(*COMMANDS, *IMPORTING_A_COMMAND, 'evosax')}))\n"
              "print(qevo.export_onnx.__module__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["[]", "qevo.export"]


def test_unknown_names_are_attribute_errors_and_dir_lists_every_export():
    with pytest.raises(AttributeError, match="module 'qevo' has no attribute 'run_everything'"):
        _ = qevo.run_everything
    assert set(qevo.__all__) <= set(dir(qevo))
