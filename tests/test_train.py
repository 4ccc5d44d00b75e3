"""``python -m qevo.train`` end to end on real MNIST, and its input checks."""

import json

import pytest

from conftest import run_command


def _train(args, data_dir, tmp_path):
    return run_command("qevo.train", "lenet5.py", tmp_path / "run", args, data_dir)


@pytest.mark.slow
def test_lenet5_five_epochs_reach_98_8_percent(lenet5_float):
    """The float recipe at 5 of its 12 epochs (measured 99.01%; the full recipe, 99.21%, is
    the README's ``python -m qevo.train --config configs/lenet5.py``)."""
    results = json.loads((lenet5_float / "results.json").read_text())
    assert results["epochs"] == 5 and results["test_accuracy"] >= 0.988, results
    for name in ("config.json", "checkpoint.msgpack", "model.msgpack"):
        assert (lenet5_float / name).is_file()


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
