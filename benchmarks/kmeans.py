"""Benchmark: every (layer, k) clustering of LeNet-5, qevo's one batched call against the
seed's way, a scikit-learn ``KMeans(n_clusters=k, n_init=10)`` Python loop.

    python -m benchmarks.kmeans [--quick] [--params PARAMS.npz] [--out PATH]

Weights: LeNet-5's five weight tensors (conv1 150, conv2 2400, fc1 48000, fc2 10080, fc3
840 weights), random with a fixed seed and shaped like trained weights (normal/Laplace core
with 0.5 % outliers), or the kernels (arrays with >= 2 dimensions, in file order) of a saved
params ``.npz``.  k runs over 1..50 (``--quick``: 2, 5, 16, 50).

qevo: one jitted ``kmeans`` call over all pairs; compile time reported apart, then the
median of 3 timed runs (``block_until_ready``).  scikit-learn: one pass of the loop,
``random_state=0``.  Also reported: SSE agreement (qevo SSE / scikit-learn inertia per pair).
Prints JSON and writes ``benchmarks/results/kmeans_<device>[_quick]/kmeans.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

from benchmarks import common
from qevo.sharing.kmeans import kmeans, pack_layers

LENET5_SIZES = {"conv1": 150, "conv2": 2400, "fc1": 48000, "fc2": 10080, "fc3": 840}
K_MAX = 50
SEED = 0


def trained_like(n: int, rng: np.random.Generator) -> np.ndarray:
    """n float32 weights: half N(0, 0.05), half Laplace(0.03), 0.5 % shifted by +-0.15..0.4."""
    w = 0.5 * rng.standard_normal(n) * 0.05 + 0.5 * rng.laplace(size=n) * 0.03
    idx = rng.choice(n, max(1, n // 200), replace=False)
    w[idx] += rng.choice([-1.0, 1.0], idx.size) * rng.uniform(0.15, 0.4, idx.size)
    return w.astype(np.float32)


def load_layers(params: str | None) -> dict[str, np.ndarray]:
    """Layer name -> flat float32 weights."""
    if params is None:
        rng = np.random.default_rng(SEED)
        return {name: trained_like(n, rng) for name, n in LENET5_SIZES.items()}
    with np.load(params) as data:
        layers = {key: np.asarray(data[key], np.float32).reshape(-1) for key in data.files if data[key].ndim >= 2}
    if not layers:
        raise SystemExit(f"{params}: no arrays with >= 2 dimensions (kernels) found")
    return layers


def measure(params: str | None, quick: bool, repeats: int) -> dict:
    """qevo's batched k-means over every (layer, k) pair against scikit-learn's loop."""
    layers = load_layers(params)
    ks = (2, 5, 16, 50) if quick else tuple(range(1, K_MAX + 1))
    pairs = [(name, k) for name, w in layers.items() for k in ks if k <= w.size]
    values, mask = pack_layers([layers[name] for name, _ in pairs])
    k = jnp.asarray([k for _, k in pairs], jnp.int32)

    t0 = time.perf_counter()
    result = jax.block_until_ready(kmeans(values, mask, k, K_MAX))
    first_call = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = jax.block_until_ready(kmeans(values, mask, k, K_MAX))
        times.append(time.perf_counter() - t0)
    qevo_seconds = statistics.median(times)

    inertia = []
    t0 = time.perf_counter()
    for name, kk in pairs:
        inertia.append(KMeans(n_clusters=kk, n_init=10, random_state=0).fit(layers[name][:, None]).inertia_)
    sklearn_seconds = time.perf_counter() - t0

    ratio = np.asarray(result.sse, np.float64) / np.maximum(np.asarray(inertia), 1e-30)
    exact = np.asarray(inertia) <= 1e-12  # k = n: both zero
    ratio[exact] = 1.0
    worst = int(np.argmax(ratio))
    report = {
        "benchmark": "kmeans: all (layer, k) pairs of LeNet-5",
        "inputs": {"weights": params or f"random, trained-like, seed {SEED}",
                   "layers": {name: int(w.size) for name, w in layers.items()},
                   "k": [min(ks), max(ks)] if not quick else list(ks), "pairs": len(pairs), "k_max": K_MAX,
                   "qevo": "kmeans(values [pairs, n_max], mask, k, k_max=50), defaults (n_iter 50, n_bins 256)",
                   "sklearn": "KMeans(n_clusters=k, n_init=10, random_state=0).fit loop over pairs"},
        "seconds": {"qevo_median": qevo_seconds, "qevo_runs": times, "qevo_first_call_with_compile": first_call,
                    "sklearn_loop": sklearn_seconds},
        "speedup_sklearn_over_qevo": sklearn_seconds / qevo_seconds,
        "sse_ratio_qevo_over_sklearn": {
            "max": float(ratio.max()), "median": float(np.median(ratio)), "min": float(ratio.min()),
            "pairs_above_1.01": int(np.sum(ratio > 1.01)), "pairs_above_1.0001": int(np.sum(ratio > 1.0001)),
            "worst_pair": list(pairs[worst]),
        },
        "qevo_lloyd_iterations": {"max": int(np.max(result.n_iter_run)), "median": float(np.median(result.n_iter_run))},
    }
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kmeans", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="k in (2, 5, 16, 50) instead of 1..50")
    parser.add_argument("--params", help="saved params .npz; its >=2-D arrays are the layers")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/kmeans_<device>[_quick]/kmeans.json)")
    parser.add_argument("--repeats", type=int, default=3, help="timed qevo runs (median reported)")
    args = parser.parse_args(argv)
    report = {**common.environment(), **measure(args.params, args.quick, args.repeats)}
    return common.write(report, pathlib.Path(args.out) if args.out else common.result_path("kmeans", args.quick))


if __name__ == "__main__":
    main()
