"""Final-training noise of a finished bit-width search: is a gap of a few tenths between two
final models a difference, or the draw of one training run?

``python -m benchmarks.final_seeds --workdir runs/resnet20_cpu_search3
--models w4a4,front_02,front_03 --seeds 1,2 [--out FILE]``

For a run finished with ``final.seeds=1`` (a new run sets ``final.seeds=N`` and gets this in
its ``final.csv`` and ``results.json``): this trains the named rows of the run's ``final.csv``
again, once per other seed, by the search's own final training
(:func:`qevo.search.final.train_once`): the same budget (``final``), from the same float
model, all models of a seed side by side. Each seed's training resumes per epoch from
``<workdir>/final_seeds/seed<S>/``. Prints JSON (default also written to
``<workdir>/final_seeds/final_seeds.json``): per model the test accuracy of every seed, the
run's own first, their mean and sample standard deviation; and for each model after the
first its paired difference from the first (same seed, same images) per seed, with mean
and standard deviation.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import ml_collections
import numpy as np

from benchmarks import common, search_run
from qevo.search import config as search_config
from qevo.search import final as search_final
from qevo.search import problem as search_problem


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path, help="a finished qevo.search run")
    parser.add_argument("--models", required=True, help="comma-separated names from its final.csv; the first is "
                                                          "the one the others are compared with")
    parser.add_argument("--seeds", required=True, help="comma-separated seeds other than the run's own")
    parser.add_argument("--out", type=pathlib.Path, help="JSON file (default <workdir>/final_seeds/final_seeds.json)")
    args = parser.parse_args(argv)
    config, rows, names, w, a = search_run.final_models(args.workdir, args.models, parser.error)
    cfg = search_config.validate(ml_collections.ConfigDict(config))
    seeds = [int(s) for s in args.seeds.split(",")]
    if cfg.seed in seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds {seeds} must be distinct and differ from the run's own seed {cfg.seed}")
    out = args.out or args.workdir / "final_seeds" / "final_seeds.json"

    report = {"benchmark": "final-training repeats of a bit-width search's final models under other seeds",
              **common.environment(),
              "inputs": {"workdir": str(args.workdir), "models": names, "seeds": [cfg.seed, *seeds],
                         "final": cfg.final.to_dict()}}
    problem = search_problem.prepare(cfg, args.workdir)
    models = [{"name": n, "w_bits": w[i].tolist(), "a_bits": a[i].tolist()} for i, n in enumerate(names)]
    accuracy = {n: [float(rows[n]["test_accuracy"])] for n in names}
    seconds = {}
    for seed in seeds:
        start = time.perf_counter()
        results = search_final.train_once(cfg, problem, models, args.workdir / "final_seeds" / f"seed{seed}", seed)
        seconds[seed] = round(time.perf_counter() - start, 1)
        for name, r in results.items():
            accuracy[name].append(r["test_accuracy"])
    report["test_accuracy"] = {n: common.spread(100 * np.asarray(v)) for n, v in accuracy.items()}
    first = np.asarray(accuracy[names[0]])
    report["minus_first"] = {n: common.spread(100 * (np.asarray(accuracy[n]) - first)) for n in names[1:]}
    report["seconds"] = seconds
    return common.write(report, out)


if __name__ == "__main__":
    main()
