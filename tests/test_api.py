"""The public API re-exported at the package top."""

import ast
import importlib
import inspect
import pathlib

import pytest

import qevo


@pytest.mark.parametrize("name", qevo.__all__)
def test_every_export_is_its_module_attribute_and_documented(name):
    module, attr = qevo._EXPORTS[name]
    assert getattr(qevo, name) is getattr(importlib.import_module(module), attr)
    assert module.startswith("qevo.") and not attr.startswith("_")
    if callable(getattr(qevo, name)):
        assert inspect.getdoc(getattr(qevo, name)), f"{name} has no docstring"


def test_type_checkers_see_exactly_the_exports():
    """The ``if TYPE_CHECKING:`` imports name every export, from the module it is taken from."""
    tree = ast.parse(pathlib.Path(qevo.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {(alias.asname or alias.name): (node.module, alias.name)
            for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert seen == qevo._EXPORTS


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="module 'qevo' has no attribute 'run_everything'"):
        _ = qevo.run_everything
    assert dir(qevo) == qevo.__all__ and "run_compress" in qevo.__all__
