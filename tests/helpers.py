"""Helpers the tests import (``from helpers import ...``): run a command or a script in the
repository, kill a run between two checkpoints, synthetic images. Fixtures and pytest hooks
live in ``conftest.py``."""

import os
import pathlib
import types

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


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
