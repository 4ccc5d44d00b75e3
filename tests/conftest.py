"""Shared test fixtures: where the stored datasets live, float runs, kills, synthetic images."""

import os
import pathlib
import types

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


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
    this process then share with the commands the others start."""
    import jax

    from qevo.data.datasets import default_cache_dir

    jax.config.update("jax_threefry_partitionable", False)
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "jax"))


def run_command(module: str, config: str, workdir: pathlib.Path, args=(), data_dir=None, timeout=1800):
    """Run ``python -m <module> --config configs/<config> --workdir <workdir> <args>`` in the repository."""
    import subprocess
    import sys

    env = {**os.environ, **({"QEVO_DATA_DIR": str(data_dir)} if data_dir else {})}
    return subprocess.run(
        [sys.executable, "-m", module, "--config", str(REPO / "configs" / config), "--workdir", str(workdir), *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )


def on_cpu_devices(script: str, devices: int, env=None, timeout: int = 600):
    """Run ``python -c <script>`` where JAX sees ``devices`` CPU devices (XLA's host device
    count), from the repository; ``env`` adds variables. Returns the finished process."""
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           **(env or {})}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, check=False)


def run_main(module: str, config: str, workdir: pathlib.Path, args=(), data_dir=None) -> tuple[int, str]:
    """A command's entry point (``qevo.cli.main``) in this process, for fast error-path tests:
    ``(exit status, stderr)`` of ``python -m <module> --config configs/<config> --workdir <workdir> <args>``."""
    import contextlib
    import io
    from unittest import mock

    from qevo import cli
    from qevo.methods import METHODS

    method = METHODS[module.removeprefix("qevo.")]
    err = io.StringIO()
    env = {"QEVO_DATA_DIR": str(data_dir)} if data_dir else {}
    argv = ["--config", str(REPO / "configs" / config), "--workdir", str(workdir), *args]
    with mock.patch.dict(os.environ, env), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(module, method.run, method.validate, argv)
    return status, err.getvalue()


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


class Killed(BaseException):
    """Stands for a kill (SIGKILL, a lost machine) between two steps of a run."""


def kill_after_checkpoint(monkeypatch, saves: int, folder: str | None = None):
    """Make the ``saves``-th write of a ``checkpoint.msgpack`` (in a folder named ``folder``,
    if given) end the run with :class:`Killed` right after the file is in place, as a kill
    between that step and the next would. ``monkeypatch.undo()`` lets the rerun resume."""
    from qevo import checkpoint

    real, count = checkpoint.save, [0]

    def save(path, *args, **kwargs):
        real(path, *args, **kwargs)
        path = pathlib.Path(path)
        if path.name == "checkpoint.msgpack" and folder in (None, path.parent.name):
            count[0] += 1
            if count[0] == saves:
                raise Killed(str(path))

    monkeypatch.setattr(checkpoint, "save", save)


def without_seconds(records: list[dict]) -> list[dict]:
    """Records without their wall-clock fields (:func:`qevo.harness.without_seconds`)."""
    from qevo import harness

    return [harness.without_seconds(r) for r in records]


def synthetic_digits(seed: int = 0, train: int = 5000, val: int = 300, test: int = 10000):
    """A stand-in for MNIST where a test needs images a network can learn but not real data:
    28x28x1 uint8 images, 10 classes, each image 60% its class's fixed random template and
    40% noise.  Returns a namespace with ``train/val/test_images/labels``, ``mean``, ``std``."""
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 28, 28, 1))

    def split(n):
        labels = rng.integers(0, 10, n).astype(np.int32)
        images = 255 * (0.6 * templates[labels] + 0.4 * rng.random((n, 28, 28, 1)))
        return images.astype(np.uint8), labels

    (tx, ty), (vx, vy), (sx, sy) = split(train), split(val), split(test)
    return types.SimpleNamespace(train_images=tx, train_labels=ty, val_images=vx, val_labels=vy, test_images=sx,
                                 test_labels=sy, mean=(0.5,), std=(0.2,))
