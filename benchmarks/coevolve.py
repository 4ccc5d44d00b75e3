"""Benchmark: evaluations per second of the coevolution loop against a per-candidate Python loop.

    python -m benchmarks.coevolve [--float-from runs/lenet5_float] [--w-bits 4] [--groups 8] [--repeats 3] [--out PATH]

The problem of ``configs/lenet5_cc.py`` with ``--groups`` groups per cycle, on the float
model of ``--float-from`` (a ``python -m qevo.train --config configs/lenet5.py`` run) and
MNIST, or without it on random calibrated weights and random MNIST-shaped images (the
speed does not depend on either):

* qevo: one compiled cycle (``Coevolution.cycle``: freeze, regroup, for every group a
  population of ``population_size`` integer networks scored on a training mini-batch, the
  marginal update; and the cycle's validation pass on ``--eval-images`` images), warmed up,
  then the median of ``--repeats`` timed cycles;
* baseline: the same number of integer-network evaluations, one jitted network call per
  candidate from a Python loop (the candidate's genome written on the host side of the
  call), the median of ``--repeats`` passes.

Both count ``groups * population_size`` evaluations of one mini-batch each; qevo's time
also holds its freeze/regroup/update work and the validation pass, so the ratio understates
the evaluation speed-up. Prints JSON and writes ``benchmarks/results/coevolve_<device>/coevolve.json``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from qevo import config as config_lib
from qevo.coevolve import config as coevolve_config
from qevo.coevolve import method as coevolve_method
from qevo.data.datasets import normalize
from qevo.evolution.loop import step_keys
from qevo.models.losses import cross_entropy
from qevo.models.zoo import get_model, init_variables
from qevo.quant.calibration import calibrate

REPO = pathlib.Path(__file__).resolve().parents[1]


def synthetic(cfg, n_train: int = 6000, n_val: int = 1000):
    """``coevolve_method.prepare_arrays`` on random calibrated LeNet-5 weights and random uint8 MNIST-shaped images."""
    rng = np.random.default_rng(0)
    shape = (28, 28, 1)
    images = rng.integers(0, 256, (n_train + n_val, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, n_train + n_val).astype(np.int32)
    model = get_model(cfg.model.name, 10)
    mean, std = (0.5,), (0.25,)
    variables = init_variables(model, jax.random.key(0), shape)
    variables = calibrate(model, variables, normalize(jnp.asarray(images[:512]), mean, std))
    _, runner, problem = coevolve_method.prepare_arrays(
        cfg, model, variables, mean, std, images[:n_train], labels[:n_train],
                                        images[n_train:], labels[n_train:])
    return runner, problem


def measure(float_from: str | None, w_bits: int, groups: int, eval_images: int, repeats: int) -> dict:
    """One compiled coevolution cycle against the same evaluations from a Python loop."""
    overrides = [f"coevolve.w_bits={w_bits}", f"coevolve.num_groups={groups}", f"coevolve.eval_images={eval_images}"]
    if float_from:
        overrides.append(f"float_from={float_from}")
    cfg = coevolve_config.validate(config_lib.load(REPO / "configs" / "lenet5_cc.py", overrides))
    c = cfg.coevolve
    if float_from:
        prep = coevolve_method.prepare(cfg, pathlib.Path(float_from))
        runner, problem = prep.runner, prep.problem
    else:
        runner, problem = synthetic(cfg)
    evaluations = c.num_groups * c.population_size

    state, base = runner.init_state(problem, jax.random.key(0)), jax.random.key(1)
    start = time.perf_counter()
    state, _ = jax.block_until_ready(runner.cycle(state, problem, step_keys(base, 0)))
    qevo_first = time.perf_counter() - start
    qevo_times = []
    for cycle in range(1, repeats + 1):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(runner.cycle(state, problem, step_keys(base, cycle)))
        qevo_times.append(time.perf_counter() - start)

    @jax.jit
    def one_loss(genome, images, labels):
        return cross_entropy(runner.logits(problem, genome, images), labels)

    rng = np.random.default_rng(0)
    q0 = np.asarray(problem.q0)
    groups = [rng.choice(q0.size, c.group_size, replace=False) for _ in range(c.num_groups)]
    batches = [rng.integers(0, problem.images.shape[0], c.batch_size) for _ in range(c.num_groups)]
    images, labels = np.asarray(problem.images), np.asarray(problem.labels)

    def loop_pass():
        for idx, pick in zip(groups, batches, strict=True):
            x, y = jnp.asarray(images[pick]), jnp.asarray(labels[pick])
            for _ in range(c.population_size):
                genome = q0.copy()
                genome[idx] = np.clip(q0[idx] + rng.integers(-c.radius, c.radius + 1, idx.size),
                                      -runner.max_level, runner.max_level)
                float(one_loss(jnp.asarray(genome), x, y))

    start = time.perf_counter()
    loop_pass()
    loop_first = time.perf_counter() - start
    loop_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loop_pass()
        loop_times.append(time.perf_counter() - start)

    qevo_s, loop_s = statistics.median(qevo_times), statistics.median(loop_times)
    return {
        "benchmark": "coevolution evaluations per second, LeNet-5 integer networks on MNIST-shaped mini-batches",
        "inputs": {"weights": f"float model of {float_from}" if float_from else "random, calibrated",
                   "data": "MNIST" if float_from else "random uint8 images",
                   "w_bits": c.w_bits, "a_bits": c.a_bits, "integer_weights": runner.num_weights,
                   "groups": c.num_groups, "group_size": c.group_size, "population_size": c.population_size,
                   "batch_size": c.batch_size, "strategy": c.strategy, "eval_images": c.eval_images,
                   "evaluations_per_cycle": evaluations, "repeats": repeats},
        "seconds": {"qevo_cycle_median": qevo_s, "qevo_cycle_runs": qevo_times, "qevo_first_with_compile": qevo_first,
                    "loop_pass_median": loop_s, "loop_pass_runs": loop_times, "loop_first_with_compile": loop_first},
        "evaluations_per_second": {"qevo": evaluations / qevo_s, "python_loop": evaluations / loop_s},
        "speedup_qevo_over_loop": loop_s / qevo_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coevolve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--float-from", default=None,
                        help="a finished qevo.train run of configs/lenet5.py (default: random weights)")
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8, help="groups per cycle")
    parser.add_argument("--eval-images", type=int, default=1000, help="validation images of the cycle's accuracy pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    jax.config.update("jax_threefry_partitionable", False)
    result = {**common.environment(),
              **measure(args.float_from, args.w_bits, args.groups, args.eval_images, args.repeats)}
    return common.write(result, pathlib.Path(args.out) if args.out else common.result_path("coevolve"))


if __name__ == "__main__":
    main()
