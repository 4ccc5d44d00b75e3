"""Search protocols compared on one task: the former single-fidelity protocol against
multi-fidelity scoring with layer sensitivity and common random numbers, and each part
switched off alone.

``python -m benchmarks.protocols --config configs/lenet5.py --float-from runs/lenet5/float
--workdir runs/protocols_lenet5 --reference 0.05,1.544e8 [--protocols old,new,...] [--rungs R]
[--seeds 3] [--out FILE]``

Each protocol is ``python -m qevo.search`` with the overrides of :data:`PROTOCOLS` (plus
``--extra``), from the same float model, with ``final.seeds`` trainings of every final model
(``--seeds``), in ``<workdir>/<protocol>/`` (a rerun resumes each). Then, per protocol:
the hypervolume of its tested front in (test error, BitOps) against ``--reference``, fixed
before the runs, for each final-training seed (the front models' test errors of that seed)
with mean and standard deviation; the same with the uniform baselines added; and, at each
baseline's BitOps, the best front model against the baseline as the paired mean difference
in test accuracy and its standard error (``results.json``'s ``against_baselines``). Prints
JSON and writes it (default ``benchmarks/results/protocols_<device>/protocols.json``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

from benchmarks import common
from qevo.evolution import nsga3
from qevo.harness import read_rows
from qevo.search.final import final_folder

# The default rungs: LeNet-5's 16 x 10 + 4 x 40 QAT steps are the 320 of 16 x 20 (configs/lenet5.py) in one
# generation, scored on 2,000 validation images, then the 4 promoted on all of them.
RUNGS = "((10,2000),(40,100000))"
PROTOCOLS = {
    "old": ["search.shared_draws=False", "search.rungs=()", "search.sensitivity=False"],
    "new": ["search.shared_draws=True", "search.rungs={rungs}", "search.sensitivity=True"],
    "no_rungs": ["search.shared_draws=True", "search.rungs=()", "search.sensitivity=True"],
    "no_sensitivity": ["search.shared_draws=True", "search.rungs={rungs}", "search.sensitivity=False"],
    "draws_per_generation": ["search.shared_draws=False", "search.rungs={rungs}", "search.sensitivity=True"],
}


def run_protocol(name: str, args) -> dict:
    """Run (or resume) one protocol's search; its ``results.json`` and ``final.csv`` rows."""
    folder = args.workdir / name
    overrides = [*(o.format(rungs=args.rungs) for o in PROTOCOLS[name]), f"final.seeds={args.seeds}",
                 f"float_from={args.float_from}", *args.extra]
    cmd = [sys.executable, "-m", "qevo.search", "--config", str(args.config), "--workdir", str(folder),
           *(f"--config.{o}" for o in overrides)]
    start = time.perf_counter()
    with open(args.workdir / f"{name}.log", "a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"protocol {name} failed (exit {done.returncode}); see {args.workdir / f'{name}.log'}")
    results = json.loads((folder / "results.json").read_text())
    return {"overrides": overrides, "seconds": round(time.perf_counter() - start, 1), "results": results,
            "rows": list(read_rows(folder / "final.csv").values())}


def seed_accuracies(folder: pathlib.Path, names: list[str], seeds: int) -> np.ndarray:
    """float ``[seeds, models]`` test accuracy of each final model in each final training."""
    out = np.zeros((seeds, len(names)))
    for r in range(seeds):
        for j, name in enumerate(names):
            path = final_folder(folder, r) / name / "results.json"
            out[r, j] = json.loads(path.read_text())["test_accuracy"]
    return out


def hypervolumes(rows: list[dict], acc: np.ndarray, reference: np.ndarray, kinds: tuple[str, ...]) -> np.ndarray:
    """Per seed, the hypervolume of the rows of ``kinds`` in (test error, BitOps), each divided
    by its coordinate of ``reference`` (so the reference is (1, 1) and the volume a share of
    the box below it)."""
    keep = [j for j, r in enumerate(rows) if r["kind"] in kinds]
    bitops = np.array([float(rows[j]["bitops"]) for j in keep])
    return np.array([nsga3.hypervolume(np.stack([1.0 - acc[r, keep], bitops], axis=1) / reference, np.ones(2))
                     for r in range(acc.shape[0])])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=pathlib.Path)
    parser.add_argument("--float-from", required=True, type=pathlib.Path, help="a finished qevo.train run folder")
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--reference", required=True, help="hypervolume reference point: test error,BitOps")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated, of {list(PROTOCOLS)}")
    parser.add_argument("--seeds", type=int, default=3, help="final.seeds: trainings of every final model")
    parser.add_argument("--rungs", default=RUNGS, help=f"search.rungs of the protocols with rungs (default {RUNGS})")
    parser.add_argument("--extra", action="append", default=[], help="one more --config override for every protocol")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    names = args.protocols.split(",")
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        parser.error(f"--protocols: unknown {unknown}; choose from {list(PROTOCOLS)}")
    reference = np.array([float(v) for v in args.reference.split(",")])
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or common.result_path("protocols")
    report = {"benchmark": "search protocols: hypervolume of the tested fronts and paired differences at the "
                           "baselines' BitOps, over final-training seeds",
              **common.environment(),
              "inputs": {"config": str(args.config), "float_from": str(args.float_from), "seeds": args.seeds,
                         "rungs": args.rungs,
                         "reference": reference.tolist(), "extra": args.extra},
              "protocols": {}}
    for name in names:
        done = run_protocol(name, args)
        rows = done["rows"]
        tested = [r for r in rows if r["kind"] != "float"]
        acc = seed_accuracies(args.workdir / name, [r["name"] for r in tested], args.seeds)
        front_hv = hypervolumes(tested, acc, reference, ("front",))
        all_hv = hypervolumes(tested, acc, reference, ("front", "baseline"))
        r = done["results"]
        report["protocols"][name] = {
            "overrides": done["overrides"],
            "wall_seconds": done["seconds"],
            "stage_seconds": r["seconds"],
            "evaluations": r["evaluations"],
            "throughput": r["throughput"],
            # to 5 decimals: the protocols differ in the third
            "hypervolume_front": common.spread(front_hv, decimals=5),
            "hypervolume_front_and_baselines": common.spread(all_hv, decimals=5),
            "against_baselines": r["against_baselines"],
            "final": [{k: row[k] for k in ("name", "kind", "w_bits", "a_bits", "bitops", "test_accuracy",
                                           "test_accuracy_std")} for row in tested],
        }
        common.write(report, out, echo=False)
    return common.write(report, out)


if __name__ == "__main__":
    main()
