"""Population evaluation throughput: images x individuals per second, scoring and QAT.

``python -m benchmarks.population [--quick] [--models lenet5,resnet20] [--sizes 1,8,32,128]
[--qat-steps 10] [--memory]``

For each model and population size P, on random bit configurations and random-initialised,
calibrated weights (throughput does not depend on the weights), all in the same run:

* **scoring**: the evaluator's ``auto`` strategy against a per-individual Python loop over
  the evaluator compiled for one individual (the baseline); at P = 8, 32 and 64
  (``--quick``: 8) also the explicit strategies (``vmap``, ``map`` sequential, ``map`` in
  chunks of 8). The loop runs up to ``--loop-max`` individuals.
* **QAT** (``--qat-steps K > 0``): ``K`` quantization-aware SGD steps per individual, then
  scoring, by the same strategies against the same loop.
* achieved FLOP/s (2 x MACs per image x images x P / seconds) and, on a GPU, its fraction
  of the device's peak;
* with ``--memory``: the device memory the compiled scoring program needs at each P (XLA's
  memory analysis), the largest P that fits by a linear fit of it, and a run at that P.

Prints JSON and writes ``benchmarks/results/population_<device>[_quick]/population.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from qevo.data.datasets import normalize
from qevo.evolution.population import PopulationEvaluator, QATConfig
from qevo.models.cost import layer_table
from qevo.models.zoo import get_model, init_variables
from qevo.quant.calibration import calibrate

SHAPES = {"lenet5": (28, 28, 1), "resnet20": (32, 32, 3)}
MEAN, STD = 0.5, 0.25
# Dense peak FLOP/s of the SXM parts (NVIDIA data sheets): float32 on CUDA cores, and the
# TF32 tensor cores that XLA may use for float32 convolutions at default precision.
PEAK_FLOPS = {"H100": {"fp32": 66.9e12, "tf32": 494.7e12}, "H200": {"fp32": 66.9e12, "tf32": 494.7e12}}


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds per callable, timed round-robin so that load drift hits all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile and warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def peak_flops() -> dict | None:
    """The first device's dense peak FLOP/s by precision, if it is in the table."""
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS.items() if name in kind), None)


class Bench:
    """One model's random population problem: weights, data and evaluators by strategy."""

    def __init__(self, name: str, n_images: int, qat_steps: int, qat_batch: int):
        self.name, self.n_images = name, n_images
        shape = SHAPES[name]
        self.channels = shape[-1]
        self.model = get_model(name, 10)
        self.rng = np.random.default_rng(0)
        self.images = jnp.asarray(self.rng.integers(0, 256, (n_images, *shape), dtype=np.uint8))
        self.labels = jnp.asarray(self.rng.integers(0, 10, n_images).astype(np.int32))
        variables = init_variables(self.model, jax.random.key(0), shape)
        self.variables = calibrate(self.model, variables,
                                   normalize(self.images[:64], (MEAN,) * self.channels, (STD,) * self.channels))
        self.macs = int(layer_table(self.model, self.variables, shape).macs.sum())
        self.qat = QATConfig(steps=qat_steps, batch_size=qat_batch, learning_rate=0.01)

    def evaluator(self, strategy="auto", chunk=None, qat=False, devices=None) -> PopulationEvaluator:
        return PopulationEvaluator(self.model, (MEAN,) * self.channels, (STD,) * self.channels,
                                   eval_batch_size=self.n_images, strategy=strategy, chunk_size=chunk,
                                   qat=self.qat if qat else QATConfig(), devices=devices)

    def population(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (p, self.model.num_layers)
        w = self.rng.choice([2, 4, 8], size=shape).astype(np.int32)
        a = self.rng.choice([2, 4, 8], size=shape).astype(np.int32)
        return w, a

    def call(self, ev: PopulationEvaluator, w, a):
        kwargs = {}
        if ev.qat.steps:
            kwargs = {"key": jax.random.key(1), "train_images": self.images, "train_labels": self.labels}
        return lambda: ev(self.variables, w, a, self.images, self.labels, **kwargs)

    def loop(self, ev_one: PopulationEvaluator, w, a):
        calls = [self.call(ev_one, w[i : i + 1], a[i : i + 1]) for i in range(w.shape[0])]
        return lambda: [c() for c in calls]

    def flops(self, p: int, seconds: float, qat: bool) -> float:
        """Achieved FLOP/s: forward 2 MACs per image; a QAT step counts 3x forward (forward + backward)."""
        forward_images = self.n_images * p
        if qat:
            forward_images += 3 * self.qat.steps * self.qat.batch_size * p
        return 2 * self.macs * forward_images / seconds


def time_sizes(bench: Bench, sizes, repeats: int, loop_max: int, compare_at, qat: bool) -> list[dict]:
    """Rows of throughput (images x individuals per second) by strategy for each population size."""
    peak = peak_flops()
    one = bench.evaluator(qat=qat, devices=jax.devices()[:1])
    rows = []
    for p in sizes:
        w, a = bench.population(p)
        fns = {"auto": bench.call(bench.evaluator(qat=qat), w, a)}
        if p in compare_at:
            for label, strategy, chunk in (("vmap", "vmap", None), ("map", "map", None), ("map8", "map", 8)):
                fns[label] = bench.call(bench.evaluator(strategy, chunk, qat=qat), w, a)
        if p <= loop_max:
            fns["loop"] = bench.loop(one, w, a)
        try:
            seconds = interleaved_medians(fns, repeats)
        except jax.errors.JaxRuntimeError as err:  # out of device memory: the sizes above fit no better
            rows.append({"model": bench.name, "mode": "qat" if qat else "score", "population": p,
                         "error": str(err).splitlines()[0][:300]})
            print(json.dumps(rows[-1]), flush=True)
            break
        row = {"model": bench.name, "mode": "qat" if qat else "score", "population": p, "images": bench.n_images,
               "qat_steps": bench.qat.steps if qat else 0, "seconds": seconds,
               "throughput": {k: bench.n_images * p / s for k, s in seconds.items()}}
        row["auto_tflops"] = bench.flops(p, seconds["auto"], qat) / 1e12
        if peak:
            row["auto_fraction_of_peak"] = {k: bench.flops(p, seconds["auto"], qat) / v for k, v in peak.items()}
        if "loop" in seconds:
            row["auto_vs_loop"] = seconds["loop"] / seconds["auto"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def device_bytes_limit() -> int | None:
    """The memory XLA may allocate on the first device (None where it does not say, as on CPU)."""
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def memory_probe(bench: Bench, sizes, repeats: int) -> dict:
    """Bytes the compiled scoring program needs at each P, the largest P that fits, a run there."""
    limit = device_bytes_limit()
    ev = bench.evaluator()
    need = {}
    for p in sizes:
        w, a = bench.population(p)
        m = ev.lower(bench.variables, w, a, bench.images, bench.labels).compile().memory_analysis()
        need[p] = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    out = {"bytes_limit": limit, "bytes_needed": {str(p): b for p, b in need.items()}}
    if limit is None or len(need) < 2:
        return out
    slope, intercept = np.polyfit(list(need), list(need.values()), 1)
    largest = min(int((0.9 * limit - intercept) // slope) // 64 * 64, 16 * max(sizes))
    out.update(bytes_per_individual=float(slope), largest_fitting_estimate=largest)
    print(json.dumps({"model": bench.name, "memory_estimate": out}), flush=True)
    while largest >= 64:
        w, a = bench.population(largest)
        try:
            seconds = interleaved_medians({"auto": bench.call(ev, w, a)}, repeats)["auto"]
        except jax.errors.JaxRuntimeError as err:  # out of device memory
            out.setdefault("failed", []).append({"population": largest, "error": str(err).splitlines()[0][:200]})
            largest //= 2
            continue
        out["largest_run"] = {"population": largest, "seconds": seconds,
                              "throughput": bench.n_images * largest / seconds,
                              "tflops": bench.flops(largest, seconds, False) / 1e12}
        break
    print(json.dumps({"model": bench.name, "memory": out}), flush=True)
    return out


def measure(plan: dict, repeats: int, loop_max: int, compare_at, qat_steps: int, qat_batch: int, memory: bool) -> dict:
    """The whole population benchmark as one JSON-able report.

    ``plan`` maps a model name to ``{"sizes": [P...], "qat_sizes": [P...], "images": N}``.
    """
    report = {"benchmark": "population", "unit": "images x individuals per second", "rows": [], "memory": {},
              "inputs": {"plan": plan, "repeats": repeats, "loop_max": loop_max, "compare_at": list(compare_at),
                         "qat_steps": qat_steps, "qat_batch": qat_batch,
                         "default_matmul_precision": jax.config.jax_default_matmul_precision},
              "peak_flops": peak_flops(), "macs_per_image": {}}
    for name, sizes in plan.items():
        bench = Bench(name, sizes["images"], qat_steps, qat_batch)
        report["macs_per_image"][name] = bench.macs
        report["rows"] += time_sizes(bench, sizes["sizes"], repeats, loop_max, compare_at, qat=False)
        if qat_steps and sizes["qat_sizes"]:
            report["rows"] += time_sizes(bench, sizes["qat_sizes"], repeats, loop_max, compare_at, qat=True)
        if memory:
            probe_sizes = [s for s in sizes["sizes"] if s >= 64] or sizes["sizes"]
            report["memory"][name] = memory_probe(bench, probe_sizes, repeats)
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.population", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="P in {1, 8, 32}, fewer images and repeats")
    p.add_argument("--models", default="lenet5,resnet20")
    p.add_argument("--sizes", default=None, help="comma-separated population sizes")
    p.add_argument("--qat-steps", type=int, default=None, help="QAT steps per individual (0 = scoring only)")
    p.add_argument("--memory", action="store_true", help="probe the largest population that fits the device")
    p.add_argument("--loop-max", type=int, default=64)
    p.add_argument("--out", default=None)
    return p


def options(args) -> dict:
    """measure()'s arguments from the command line's."""
    gpu = jax.default_backend() != "cpu"
    if args.quick:
        plan = {"lenet5": {"sizes": [1, 8, 32], "qat_sizes": [1, 8], "images": 512},
                "resnet20": {"sizes": [1, 8], "qat_sizes": [1, 4], "images": 32}}
    elif gpu:
        plan = {"lenet5": {"sizes": [1, 8, 64, 256, 1024], "qat_sizes": [1, 8, 64, 256], "images": 1000},
                "resnet20": {"sizes": [1, 8, 64, 256, 1024], "qat_sizes": [1, 8, 64], "images": 256}}
    else:
        plan = {"lenet5": {"sizes": [1, 8, 32, 128], "qat_sizes": [1, 8, 32], "images": 1000},
                "resnet20": {"sizes": [1, 8, 32, 128], "qat_sizes": [1, 8], "images": 256}}
    plan = {name: plan[name] for name in args.models.split(",")}
    if args.sizes:
        for sizes in plan.values():
            sizes["sizes"] = [int(s) for s in args.sizes.split(",")]
    qat_steps = args.qat_steps if args.qat_steps is not None else (2 if args.quick else 10)
    return {"plan": plan, "repeats": 3 if args.quick else 7, "loop_max": args.loop_max,
            "compare_at": (8,) if args.quick else (8, 32, 64), "qat_steps": qat_steps,
            "qat_batch": 16 if args.quick else 128, "memory": args.memory}


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    jax.config.update("jax_threefry_partitionable", False)
    report = {**common.environment(), **measure(**options(args)), "quick": args.quick}
    return common.write(report, pathlib.Path(args.out) if args.out else common.result_path("population", args.quick))


if __name__ == "__main__":
    main()
