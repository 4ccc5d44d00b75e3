"""Does a longer search score rank a finished search's final models as their final training does?

``python -m benchmarks.score_budget --workdir runs/resnet20_cpu_search3
--models w4a4,front_02,front_03 --steps 30,100,300 --repeats 3 [--out FILE]``

The search scores each model by ``search.qat_steps`` steps of QAT from the float model, then
validation accuracy (``search.eval_images``); the final models then train for ``final.epochs``
and are ranked by test accuracy. This scores the named rows of the run's ``final.csv`` as the
search would with each step count of ``--steps`` (everything else as the run's config), with
``--repeats`` keys for the QAT mini-batches, all models of a key side by side in one population
call. Prints JSON (default also written to ``<workdir>/score_budget.json``): per step count and
model the validation accuracy of each key, their mean and sample standard deviation, the
run's final test accuracy beside them, and the seconds each step count took.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import ml_collections
import numpy as np

from benchmarks import common, search_run
from qevo.quant.layers import Bits
from qevo.search import config as search_config
from qevo.search import problem as search_problem


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path, help="a finished qevo.search run")
    parser.add_argument("--models", required=True, help="comma-separated names from its final.csv")
    parser.add_argument("--steps", required=True, help="comma-separated QAT step counts to score with")
    parser.add_argument("--repeats", type=int, default=3, help="keys (QAT mini-batch draws) per step count")
    parser.add_argument("--out", type=pathlib.Path, help="JSON file (default <workdir>/score_budget.json)")
    args = parser.parse_args(argv)
    base, rows, names, w, a = search_run.final_models(args.workdir, args.models, parser.error)
    steps = [int(s) for s in args.steps.split(",")]
    if args.repeats < 1 or any(s < 0 for s in steps):
        parser.error("--repeats must be >= 1 and --steps >= 0")
    out = args.out or args.workdir / "score_budget.json"

    report = {"benchmark": "search scores of a finished search's final models against the QAT steps they take",
              **common.environment(),
              "inputs": {"workdir": str(args.workdir), "models": names, "steps": steps, "repeats": args.repeats,
                         "eval_images": base["search"]["eval_images"], "final_epochs": base["final"]["epochs"]},
              "final_test_accuracy": {n: round(100 * float(rows[n]["test_accuracy"]), 2) for n in names},
              "val_accuracy": {}, "seconds": {}}
    for s in steps:
        cfg = ml_collections.ConfigDict(base)
        cfg.search.qat_steps = s
        problem = search_problem.prepare(search_config.validate(cfg), args.workdir)
        start = time.perf_counter()
        accs = []
        for r in range(args.repeats):
            key = jax.random.fold_in(jax.random.key(cfg.seed), 1000 + r)
            accs.append(problem.accuracy(len(problem.rungs) - 1, Bits(w=w, a=a), key))
        v = 100 * np.stack(accs)
        report["seconds"][s] = round(time.perf_counter() - start, 1)
        report["val_accuracy"][s] = {n: common.spread(v[:, i]) for i, n in enumerate(names)}
    return common.write(report, out)


if __name__ == "__main__":
    main()
