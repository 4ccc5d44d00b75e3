"""Fixtures and pytest hooks: where the stored datasets live, the session's float runs, the
order the files run in and the JAX settings of the test processes. Helpers the tests import
live in ``helpers.py``."""

import os
import pathlib

import pytest

from helpers import REPO, run_command


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The offline dataset folder: $QEVO_DATA_DIR, else ../shared/data beside the repository."""
    path = pathlib.Path(os.environ.get("QEVO_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "mnist").is_dir():
        pytest.fail(f"stored datasets not found at {path}; set QEVO_DATA_DIR to the folder holding mnist/, cifar10/")
    return path


# The files with the longest end-to-end runs, longest first: the suite's two workers take
# whole files (``--dist loadfile``) in collection order, so the long ones start first and the
# short ones fill in at the end.
LONGEST_FIRST = ("test_compress.py", "test_coevolve.py", "test_resnet20.py", "test_search.py", "test_export.py",
                 "test_distributed.py", "test_data.py", "test_population.py", "test_train.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def pytest_configure(config):
    """Match the command-line entry points: threefry keys that compile fast on the CPU, and
    their persistent compilation cache (``<qevo cache>/jax``), which the tests that run in
    this process then share with the commands the others start. Unlike the commands, the tests
    keep every program in that cache, not only those that take a second or more to compile
    (JAX's default): the suite compiles hundreds of small programs, again at every run, and
    a second run of the fast tier then loads them (on the 2-core CPU, tests/test_layers.py and
    tests/test_quant.py take 15 s so against 47-52 s). The cache and this setting reach the
    commands and the scripts the tests start (``python -c``: several devices, several
    processes) through the environment."""
    import jax

    from qevo.data.datasets import default_cache_dir

    cache = str(default_cache_dir() / "jax")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_threefry_partitionable", False)
    jax.config.update("jax_compilation_cache_dir", cache)


@pytest.fixture(scope="session")
def lenet5_float(data_dir, tmp_path_factory) -> pathlib.Path:
    """A finished ``qevo.train`` run of configs/lenet5.py shortened to 5 of its 12 epochs (the
    cosine schedule spans the 5), shared by the slow tests: 99.01% test in 81 s on the 2-core
    CPU against 99.21% in 188 s for the full recipe (the README's float model)."""
    workdir = tmp_path_factory.mktemp("lenet5_float")
    out = run_command("qevo.train", "lenet5.py", workdir, ["--config.train.epochs=5"], data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def tiny_lenet5_float(data_dir, tmp_path_factory) -> pathlib.Path:
    """A LeNet-5 float run of one epoch on 3,000 images (fast; for plumbing tests)."""
    workdir = tmp_path_factory.mktemp("tiny_lenet5_float")
    out = run_command("qevo.train", "lenet5.py", workdir,
                      ["--config.train.epochs=1", "--config.data.max_train_images=3000"], data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir
