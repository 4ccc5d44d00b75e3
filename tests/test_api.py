"""The public API re-exported at the package top."""

import qevo


def test_every_export_resolves():
    for name in qevo.__all__:
        assert getattr(qevo, name) is not None, name
