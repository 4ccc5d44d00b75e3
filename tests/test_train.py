"""``python -m qevo.train`` end to end on real MNIST, and its input checks."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def _train(args, data_dir, tmp_path):
    env = {**os.environ, "QEVO_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "qevo.train", "--config", str(REPO / "configs" / "lenet5.py"), "--workdir", str(tmp_path / "run"), *args],
        env=env, capture_output=True, text=True, timeout=1800, cwd=REPO,
    )


@pytest.mark.slow
def test_lenet5_reaches_99_percent(data_dir, tmp_path):
    out = _train([], data_dir, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test_accuracy"] >= 0.99, results
    for name in ("config.json", "checkpoint.msgpack", "model.msgpack"):
        assert (tmp_path / "run" / name).is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.train.epochz=3"], "unknown config key 'train.epochz'"),
        (["--config.train.w_bits=0"], "impossible bit width"),
        (["--config.data.name=svhn"], "data.name='svhn' is not one of"),
        (["--config.data.data_dir=/nonexistent/qevo"], "/nonexistent/qevo"),
        (["--config.train.w_bits=4"], "train.init_from"),
    ],
)
def test_bad_input_gives_one_clear_line(args, message, data_dir, tmp_path):
    out = _train(args, data_dir, tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
