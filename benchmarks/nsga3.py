"""NSGA-III survival speed, qevo (jitted JAX) against pymoo 0.6, on the same inputs.

For each population size N and objective count M, a merged population of 2N uniform random
objective vectors is reduced to N survivors by ``qevo.nsga3.survive`` (float32, compiled
and warmed up, timed with ``block_until_ready``) and by pymoo's ReferenceDirectionSurvival
(float64); each time is the median of several repeats from a fresh normalisation state.

    python -m benchmarks.nsga3 [--quick]

Prints JSON and writes it to ``benchmarks/results/nsga3_<platform>[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import pymoo
from pymoo.algorithms.moo.nsga3 import ReferenceDirectionSurvival
from pymoo.core.population import Population
from pymoo.core.problem import Problem

from qevo import nsga3

PARTITIONS = {2: 99, 3: 12, 5: 6}  # Das-Dennis divisions: 100, 91 and 210 reference directions
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def time_qevo(F: np.ndarray, ref_dirs: np.ndarray, n_survive: int, repeats: int) -> float:
    """Median seconds of one compiled ``survive`` call (after a warm-up call)."""
    F_dev = jnp.asarray(F, jnp.float32)
    ref_dev = jnp.asarray(ref_dirs, jnp.float32)
    state = nsga3.init_state(F.shape[1])
    keys = jax.random.split(jax.random.key(0), repeats + 1)
    jax.block_until_ready(nsga3.survive(F_dev, ref_dev, n_survive, state, keys[0]))
    times = []
    for key in keys[1:]:
        start = time.perf_counter()
        jax.block_until_ready(nsga3.survive(F_dev, ref_dev, n_survive, state, key))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_pymoo(F: np.ndarray, ref_dirs: np.ndarray, n_survive: int, repeats: int) -> float:
    """Median seconds of pymoo's ReferenceDirectionSurvival on the same population."""
    problem = Problem(n_var=1, n_obj=F.shape[1])
    times = []
    for seed in range(repeats):
        survival = ReferenceDirectionSurvival(ref_dirs)
        pop = Population.new("F", F)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        survival.do(problem, pop, n_survive=n_survive, random_state=rng)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {100, 1000} only, fewer repeats")
    args = parser.parse_args()
    sizes = [100, 1000] if args.quick else [100, 1000, 10000]
    device = jax.devices()[0]
    report = {
        "benchmark": "NSGA-III survival, 2N uniform random objective vectors -> N survivors",
        "device": str(device),
        "device_kind": device.device_kind,
        "platform": jax.default_backend(),
        "host_cpu": platform.processor() or platform.machine(),
        "versions": {"jax": jax.__version__, "pymoo": pymoo.__version__, "numpy": np.__version__},
        "qevo_dtype": "float32",
        "pymoo_dtype": "float64",
        "timing": "median seconds per survival call; qevo compiled, warmed up, block_until_ready",
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "results": [],
    }
    for n in sizes:
        repeats = 3 if n >= 10000 else (5 if args.quick else 9)
        for n_obj, n_partitions in PARTITIONS.items():
            ref_dirs = nsga3.das_dennis(n_obj, n_partitions)
            F = np.random.default_rng(n * 10 + n_obj).random((2 * n, n_obj))
            qevo_s = time_qevo(F, ref_dirs, n, repeats)
            pymoo_s = time_pymoo(F, ref_dirs, n, repeats)
            row = {
                "N": n, "merged": 2 * n, "M": n_obj, "ref_dirs": len(ref_dirs), "repeats": repeats,
                "qevo_s": qevo_s, "pymoo_s": pymoo_s, "pymoo_over_qevo": pymoo_s / qevo_s,
            }
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"nsga3_{report['platform']}{suffix}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
