"""The public API at the package top: ``qevo/__init__.py`` imports every name explicitly."""

import ast
import importlib
import inspect
import pathlib
import subprocess
import sys
import warnings

import pytest

import qevo

TREE = ast.parse(pathlib.Path(qevo.__file__).read_text())
# the command entry points (python -m qevo.<command>): never imported by the package
ENTRY_POINTS = ("qevo.data.__main__", "qevo.train.__main__", "qevo.search.__main__", "qevo.sharing.__main__",
                "qevo.coevolve.__main__", "qevo.export.__main__")


def _imports(body) -> dict[str, tuple[str, str]]:
    """``{name bound: (module, name there)}`` of the ``from qevo.x import y as z`` statements in ``body``."""
    return {(alias.asname or alias.name): (node.module, alias.name)
            for node in body if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qevo")
            for alias in node.names}


IMPORTED = _imports(TREE.body)


@pytest.mark.parametrize("name", qevo.__all__)
def test_every_export_is_its_module_attribute_and_documented(name):
    module, attr = IMPORTED[name]
    assert getattr(qevo, name) is getattr(importlib.import_module(module), attr)
    assert not attr.startswith("_")
    if callable(getattr(qevo, name)):
        assert inspect.getdoc(getattr(qevo, name)), f"{name} has no docstring"


def test_all_is_exactly_the_imported_names():
    assert len(qevo.__all__) == len(set(qevo.__all__)) == 78
    assert sorted(qevo.__all__) == sorted(IMPORTED)


def test_importing_qevo_runs_no_entry_point_and_imports_no_evosax_or_onnx():
    """An entry point imported with the package would run its command; evosax computes at
    import, before a multi-process run has joined; onnx and onnxruntime are an optional
    extra (here hidden, as if not installed: the export's name still resolves)."""
    script = ("import sys\n"
              "sys.modules['onnx'] = sys.modules['onnxruntime'] = None\n"
              "import jax._src.xla_bridge as xb\n"
              "xb.backends = lambda *a, **k: sys.exit('a backend was started at import')\n"
              "import qevo\n"
              f"print(sorted(m for m in sys.modules if m in {(*ENTRY_POINTS, 'evosax')}))\n"
              "print(qevo.export_onnx.__module__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["[]", "qevo.export.exporter"]


def test_renamed_names_resolve_with_a_deprecation_warning():
    for old, new in (("run_compress", "run_sharing"), ("compress_defaults", "sharing_defaults")):
        with pytest.warns(DeprecationWarning, match=f"qevo.{old} is now qevo.{new}"):
            assert getattr(qevo, old) is getattr(qevo, new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(qevo.EVOSAX_STRATEGIES) == set(qevo.evosax_strategies())


def test_unknown_names_are_attribute_errors_and_dir_lists_every_export():
    with pytest.raises(AttributeError, match="module 'qevo' has no attribute 'run_everything'"):
        _ = qevo.run_everything
    assert set(qevo.__all__) <= set(dir(qevo))


def test_the_method_table_holds_each_command():
    assert set(qevo.METHODS) == {"train", "search", "sharing", "coevolve"}
    for name, method in qevo.METHODS.items():
        assert method.name == name and importlib.util.find_spec(f"qevo.{name}.__main__") is not None
