"""Benchmark: weight-sharing compression of LeNet-5 on MNIST (``qevo.sharing``), on real data.

    python -m benchmarks.compress --float-from runs/float_lenet5_relu [--seeds 3] \\
        [--driver-seeds 5] [--driver-population 8] [--driver-generations 6] [--out PATH]

One float model (``--float-from``, a ``python -m qevo.train --config configs/lenet5.py``
run; its seed-0 validation split is kept for every search), one cluster table and one
range optimisation (timed once), then:

* headline: the whole protocol of ``configs/lenet5_sharing.py`` (GA, its population and
  generations, refinement, every codebook format) for search seeds ``0..seeds-1``;
  per seed both CRs and test accuracy per format, and the medians over seeds;
* drivers: ``ga``, ``pso``, ``random``, ``nsga3`` at one equal budget (population x
  generations evaluations), search seeds ``0..driver_seeds-1``, no refinement, float32
  codebooks: the picked network's size-weighted CR and validation/test accuracy, medians.

Seconds per run count the search (and for the headline the refinement and report);
table and range seconds are reported once.  Prints JSON and writes
``benchmarks/results/compress_<device>/compress.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import ml_collections

from benchmarks import common
from qevo import config as config_lib
from qevo.sharing import config as sharing_config
from qevo.sharing import method as sharing_method
from qevo.sharing import report as sharing_report

REPO = pathlib.Path(__file__).resolve().parents[1]
DRIVERS = ("simple_ga", "pso", "random", "nsga3")


def _with(cfg: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in changes.items():
        node = out
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return sharing_config.validate(out)


def headline_run(prep: sharing_method.Prepared, cfg, seed: int) -> dict:
    """The command's protocol after step 2 for one search seed (nothing written)."""
    cfg = _with(cfg, seed=seed)
    start = time.perf_counter()
    chosen = sharing_method.choose(prep, cfg, sharing_method.search(prep, cfg))
    formats = sharing_report.report(prep, cfg, chosen.layers, None)
    return {"seed": seed, "k": chosen.best["k"], "focus": [x.focus for x in chosen.layers],
            "feasible": chosen.best["feasible"], "val_accuracy_searched": chosen.best["val_accuracy"],
            "val_accuracy_refined": chosen.accuracy, "formats": formats,
            "seconds": round(time.perf_counter() - start, 1)}


def driver_run(prep: sharing_method.Prepared, cfg, driver: str, seed: int, population: int, generations: int) -> dict:
    """One search of ``driver`` (no refinement, float32 codebooks)."""
    cfg = _with(cfg, seed=seed, population_size=population, generations=generations,
                sharing__driver=driver, sharing__refine=False, sharing__report_formats=("float32",))
    start = time.perf_counter()
    records = sharing_method.search(prep, cfg)
    seconds = time.perf_counter() - start
    chosen = sharing_method.choose(prep, cfg, records)
    best = chosen.best
    fp32 = sharing_report.report(prep, cfg, chosen.layers, None)["float32"]
    return {"driver": driver, "seed": seed, "k": best["k"], "feasible": best["feasible"], "evaluations": len(records),
            "cr_weighted": fp32["cr_weighted"], "cr_mean": fp32["cr_mean"], "val_accuracy": fp32["val_accuracy"],
            "test_accuracy": fp32["test_accuracy"], "test_loss_points": fp32["test_loss_points"],
            "seconds": round(seconds, 1)}


def _median(values):
    return statistics.median(values)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--float-from", required=True, help="a finished qevo.train run of configs/lenet5.py")
    parser.add_argument("--config", default=str(REPO / "configs" / "lenet5_sharing.py"))
    parser.add_argument("--seeds", type=int, default=3, help="headline search seeds (0 skips the headline)")
    parser.add_argument("--driver-seeds", type=int, default=5, help="seeds per driver (0 skips the driver table)")
    parser.add_argument("--driver-population", type=int, default=8)
    parser.add_argument("--driver-generations", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    jax.config.update("jax_threefry_partitionable", False)
    cfg = sharing_config.validate(config_lib.load(args.config, [f"float_from={args.float_from}"]))
    environment = common.environment()  # the load average before the runs
    start = time.perf_counter()
    prep = sharing_method.prepare(cfg, pathlib.Path(args.float_from))
    prepare_seconds = time.perf_counter() - start

    headline = [headline_run(prep, cfg, s) for s in range(args.seeds)]
    drivers = [driver_run(prep, cfg, d, s, args.driver_population, args.driver_generations)
               for s in range(args.driver_seeds) for d in DRIVERS]
    fmts = ("float32", "float16", "float8")
    result = {
        "benchmark": "weight-sharing compression of LeNet-5 (ReLU) on MNIST without retraining",
        **environment,
        "config": cfg.to_dict(),
        "float": {"val_accuracy": prep.float_val, "test_accuracy": prep.float_test},
        "prepare_seconds": {"total_with_float_load": round(prepare_seconds, 1),
                            **{k: round(v, 1) for k, v in prep.seconds.items()}},
    }
    if headline:
        result["headline"] = {
            "runs": headline,
            "median": {fmt: {key: _median([r["formats"][fmt][key] for r in headline])
                             for key in ("cr_weighted", "cr_mean", "test_accuracy", "test_loss_points")}
                       for fmt in fmts},
            "median_seconds_per_run": _median([r["seconds"] for r in headline]),
        }
    if drivers:
        result["drivers"] = {
            "budget": {"population": args.driver_population, "generations": args.driver_generations,
                       "evaluations": args.driver_population * args.driver_generations},
            "runs": drivers,
            "median": {d: {key: _median([r[key] for r in drivers if r["driver"] == d])
                           for key in ("cr_weighted", "cr_mean", "val_accuracy", "test_accuracy", "test_loss_points",
                                       "seconds")}
                       for d in DRIVERS},
        }
    common.write(result, pathlib.Path(args.out) if args.out else common.result_path("compress"), echo=False)
    summary = {k: result[k] for k in ("float", "prepare_seconds")}
    summary |= {f"{k}_median": result[k]["median"] for k in ("headline", "drivers") if k in result}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
