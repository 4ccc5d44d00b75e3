"""Shared test fixtures: where the stored datasets live."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The offline dataset folder: $QEVO_DATA_DIR, else ../shared/data beside the repository."""
    path = pathlib.Path(os.environ.get("QEVO_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "mnist").is_dir():
        pytest.fail(f"stored datasets not found at {path}; set QEVO_DATA_DIR to the folder holding mnist/, cifar10/")
    return path


def pytest_configure(config):
    """Match the command-line entry points: threefry keys that compile fast on the CPU."""
    import jax

    jax.config.update("jax_threefry_partitionable", False)
