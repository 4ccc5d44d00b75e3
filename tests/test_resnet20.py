"""ResNet-20 on real CIFAR-10 (JPEG copy) at a tiny budget: the bit-width search and the
coevolution end to end, each from a one-epoch float model (slow); in the fast tier, the
costs the search writes, from the ResNet-20 layer table alone.

No accuracy is asserted (the budget is far too small); costs are checked against
multiply-accumulates and weights counted by hand, and the integer forward pass against
fake quantization. ResNet-20 (projection shortcuts) has 18 inner convolutions:

* 16 of them at 2,359,296 MACs per image (3x3, 16/32/64 channels at 32/16/8 pixels);
* the first of stages 2 and 3 at 1,179,648, each with its 1x1 shortcut (131,072 MACs),
  which takes the same widths;
* the first convolution (442,368) and the classifier (640) stay float.
"""

import csv
import json

import jax
import numpy as np
import pytest

from helpers import run_command
from qevo.models import cost
from qevo.models.zoo import get_model, init_variables
from qevo.quant.layers import Bits
from qevo.search import problem as search_problem

INNER_MACS = 16 * 2_359_296 + 2 * (1_179_648 + 131_072)
FLOAT_MACS = 442_368 + 640
INNER_WEIGHTS = 6 * 2_304 + (4_608 + 5 * 9_216 + 512) + (18_432 + 5 * 36_864 + 2_048)
SMALL_DATA = ["--config.data.max_train_images=512", "--config.data.val_size=500", "--config.data.max_test_images=1000"]


@pytest.fixture(scope="module")
def resnet20_float(data_dir, tmp_path_factory):
    """One epoch of configs/resnet20_cpu.py's recipe on 512 images."""
    workdir = tmp_path_factory.mktemp("resnet20_float")
    out = run_command("qevo.train", "resnet20_cpu.py", workdir,
                      ["--config.train.epochs=1", "--config.train.warmup_epochs=0", *SMALL_DATA], data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _rows(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _from_float(module, config, overrides, float_run, data_dir, run):
    """``python -m <module>`` from the tiny float model on the small data, ``overrides`` (config keys) added."""
    args = [f"--config.float_from={float_run}", *SMALL_DATA, *(f"--config.{k}={v}" for k, v in overrides.items())]
    out = run_command(module, config, run, args, data_dir)
    assert out.returncode == 0, out.stderr[-3000:]


def test_resnet20_costs_equal_hand_counts():
    """What the search writes as the costs of its uniform baselines and of float (``qevo.search.problem.costs``
    of ResNet-20's layer table, one row per model): BitOps and weight bits against the counts
    above, without data or training (the slow test reads them from a search's final.csv)."""
    model = get_model("resnet20", 10)
    table = cost.layer_table(model, init_variables(model, jax.random.key(0), (32, 32, 3)), (32, 32, 3))
    assert len(table.names) == 20
    inner = np.array([8, 4, 2, 32])
    widths = np.tile(inner[:, None], (1, 20))
    widths[:, 0] = widths[:, -1] = 32  # the first convolution and the classifier stay float
    costs = search_problem.costs(table, Bits(w=widths, a=widths.copy()))
    np.testing.assert_array_equal(costs["bitops"], inner * inner * INNER_MACS + 32 * 32 * FLOAT_MACS)
    assert float(costs["size"][1]) - float(costs["size"][2]) == 2 * INNER_WEIGHTS  # w4a4 against w2a2


@pytest.mark.slow
def test_resnet20_search_writes_costs_by_hand(resnet20_float, data_dir, tmp_path):
    run = tmp_path / "run"
    _from_float("qevo.search", "resnet20_cpu.py",
                {"population_size": 8, "search.initial_samples": 8, "generations": 1, "search.qat_steps": 2,
                 "search.qat_batch_size": 32, "search.eval_images": 100, "final.epochs": 1, "final.max_models": 1},
                resnet20_float, data_dir, run)
    for name in ("config.json", "history.jsonl", "pareto.csv", "final.csv", "pareto.png", "results.json"):
        assert (run / name).is_file(), name
    rows = {r["name"]: r for r in _rows(run / "final.csv")}
    assert {"front_00", "w8a8", "w4a4", "w2a2", "float"} <= set(rows), rows.keys()
    for name, (w, a) in {"w8a8": (8, 8), "w4a4": (4, 4), "w2a2": (2, 2), "float": (32, 32)}.items():
        assert float(rows[name]["bitops"]) == w * a * INNER_MACS + 32 * 32 * FLOAT_MACS, name
        assert rows[name]["w_bits"].split()[1:-1] == [str(w)] * 18, name
    assert float(rows["w4a4"]["size"]) - float(rows["w2a2"]["size"]) == 2 * INNER_WEIGHTS
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 16 and all(set(r["w_bits"][1:-1]) <= {1, 2, 4, 8} for r in history)
    evaluated = {(" ".join(map(str, r["w_bits"])), " ".join(map(str, r["a_bits"]))) for r in history}
    front = (rows["front_00"]["w_bits"], rows["front_00"]["a_bits"])
    uniform = {(rows[b]["w_bits"], rows[b]["a_bits"]) for b in ("w8a8", "w4a4", "w2a2")}
    assert front in evaluated and front not in uniform
    assert {(r["w_bits"], r["a_bits"]) for r in _rows(run / "pareto.csv")} <= evaluated
    for r in rows.values():
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0


@pytest.mark.slow
def test_resnet20_coevolution_integer_forward_equals_fake_quant(resnet20_float, data_dir, tmp_path):
    run = tmp_path / "run"
    overrides = {"cycles": 1, "num_groups": 2, "group_size": 64, "population_size": 3, "batch_size": 16,
                 "eval_images": 100, "qat": False}
    _from_float("qevo.coevolve", "resnet20_cc_cpu.py", {f"coevolve.{k}": v for k, v in overrides.items()},
                resnet20_float, data_dir, run)
    result = json.loads((run / "results.json").read_text())
    assert result["integer_weights"] == INNER_WEIGHTS
    assert result["w_bits"] == [32, *[4] * 18, 32] and result["a_bits"] == [32, *[8] * 18, 32]
    rtn = result["round_to_nearest"]
    # at most 1 of 1,000 test images differs
    assert abs(rtn["test_accuracy"] - rtn["fake_quant_test_accuracy"]) <= 1e-3, rtn
    assert 0.0 < result["round_to_nearest_bn"]["test_accuracy"] <= 1.0  # BatchNorm statistics re-estimated
    assert result["coevolution"]["evaluations"] == 6 and result["coevolution"]["images"] == 32
