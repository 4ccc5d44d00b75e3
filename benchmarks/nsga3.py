"""NSGA-III survival speed, qevo (jitted JAX) against pymoo 0.6, on the same inputs.

For each population size N and objective count M, a merged population of 2N uniform random
objective vectors is reduced to N survivors by ``qevo.evolution.nsga3.survive`` (float32, compiled
and warmed up, timed with ``block_until_ready``) and by pymoo's ReferenceDirectionSurvival
(float64); each time is the median of several repeats from a fresh normalisation state,
the two libraries' calls interleaved so that both see the same machine load.

    python -m benchmarks.nsga3 [--quick]

Prints JSON and writes it to ``benchmarks/results/nsga3_<device>[_quick]/nsga3.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from pymoo.algorithms.moo.nsga3 import ReferenceDirectionSurvival
from pymoo.core.population import Population
from pymoo.core.problem import Problem

from benchmarks import common
from qevo.evolution import nsga3

PARTITIONS = {2: 99, 3: 12, 5: 6}  # Das-Dennis divisions: 100, 91 and 210 reference directions


def qevo_call(F: np.ndarray, ref_dirs: np.ndarray, n_survive: int):
    """A warmed-up ``key -> seconds`` timer of one compiled ``survive`` call."""
    F_dev = jnp.asarray(F, jnp.float32)
    ref_dev = jnp.asarray(ref_dirs, jnp.float32)
    state = nsga3.init_state(F.shape[1])

    def timed(key):
        start = time.perf_counter()
        jax.block_until_ready(nsga3.survive(F_dev, ref_dev, n_survive, state, key))
        return time.perf_counter() - start

    timed(jax.random.key(0))
    return timed


def pymoo_call(F: np.ndarray, ref_dirs: np.ndarray, n_survive: int):
    """A ``seed -> seconds`` timer of pymoo's ReferenceDirectionSurvival on a fresh state."""
    problem = Problem(n_var=1, n_obj=F.shape[1])

    def timed(seed):
        survival = ReferenceDirectionSurvival(ref_dirs)
        pop = Population.new("F", F)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        survival.do(problem, pop, n_survive=n_survive, random_state=rng)
        return time.perf_counter() - start

    return timed


def compare(F: np.ndarray, ref_dirs: np.ndarray, n_survive: int, repeats: int) -> tuple[float, float]:
    """Median seconds of qevo and of pymoo, their calls interleaved so both see the same load."""
    qevo, theirs = qevo_call(F, ref_dirs, n_survive), pymoo_call(F, ref_dirs, n_survive)
    keys = jax.random.split(jax.random.key(1), repeats)
    times = [(qevo(keys[i]), theirs(i)) for i in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def rank_tilings(F: np.ndarray, repeats: int) -> list[dict]:
    """Median seconds of ``non_dominated_rank`` alone under several (block, chunk) tilings."""
    F_dev = jnp.asarray(F, jnp.float32)
    rows = []
    for block, chunk in ((256, 1), (256, None), (1024, None), (2048, None), (4096, None)):
        rank = functools.partial(nsga3.non_dominated_rank, block_size=block, chunk_blocks=chunk or 10**6)
        jax.block_until_ready(rank(F_dev))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(rank(F_dev))
            times.append(time.perf_counter() - start)
        rows.append({"block_size": block, "chunk_blocks": chunk or "all", "seconds": statistics.median(times)})
    return rows


def measure(sizes: list[int], repeats_small: int, tilings: bool) -> dict:
    """qevo's and pymoo's survival time for every N in ``sizes`` and M in (2, 3, 5)."""
    report = {
        "benchmark": "NSGA-III survival, 2N uniform random objective vectors -> N survivors",
        "note": ("pymoo 0.6.2 ranks with moocore.pareto_rank (compiled C); "
                 "qevo ranks with O(N^2 M / 2) comparisons on fixed shapes"),
        "qevo_dtype": "float32",
        "pymoo_dtype": "float64",
        "timing": ("median seconds per survival call, qevo and pymoo calls interleaved; "
                   "qevo compiled, warmed up, block_until_ready; pymoo on the host CPU"),
        "inputs": {"sizes": sizes, "partitions": PARTITIONS},
        "results": [],
    }
    for n in sizes:
        repeats = 3 if n >= 10000 else repeats_small
        for n_obj, n_partitions in PARTITIONS.items():
            ref_dirs = nsga3.das_dennis(n_obj, n_partitions)
            F = np.random.default_rng(n * 10 + n_obj).random((2 * n, n_obj))
            qevo_s, pymoo_s = compare(F, ref_dirs, n, repeats)
            row = {
                "N": n, "merged": 2 * n, "M": n_obj, "ref_dirs": len(ref_dirs), "repeats": repeats,
                "qevo_s": qevo_s, "pymoo_s": pymoo_s, "pymoo_over_qevo": pymoo_s / qevo_s,
            }
            report["results"].append(row)
            print(json.dumps(row), flush=True)
    if tilings:
        F = np.random.default_rng(2).random((2 * max(sizes), 2))
        report["rank_tilings_M2"] = rank_tilings(F, 5)
        print(json.dumps({"rank_tilings_M2": report["rank_tilings_M2"]}), flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nsga3", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {100, 1000} only, fewer repeats")
    parser.add_argument("--tilings", action="store_true", help="also time the ranking alone under several tilings")
    args = parser.parse_args(argv)
    sizes = [100, 1000] if args.quick else [100, 1000, 10000]
    report = {**common.environment(), **measure(sizes, 5 if args.quick else 9, args.tilings)}
    return common.write(report, common.result_path("nsga3", args.quick))


if __name__ == "__main__":
    main()
