"""Population evaluation throughput: images x individuals per second.

``python -m benchmarks.population [--quick] [--models lenet5,resnet20] [--sizes 1,8,32,128]``

For each model and population size P, times the evaluator's strategies (``vmap``,
``map`` sequential, ``map`` in chunks of 8, ``auto``) and a per-individual Python loop
over one jitted forward pass (the baseline), all in the same run on random bit
configurations and random-initialised, calibrated weights (throughput does not depend on
the weights). Prints JSON and writes ``benchmarks/results/population_<platform>.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from qevo.calibration import calibrate
from qevo.layers import Bits
from qevo.models import get_model, init_variables
from qevo.population import PopulationEvaluator, batch_eval_set, batched_accuracy

SHAPES = {"lenet5": (28, 28, 1), "resnet20": (32, 32, 3)}
RESULTS = pathlib.Path(__file__).parent / "results"


def _interleaved_medians(fns: dict, repeats: int) -> dict:
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


def bench_model(name: str, sizes: list[int], n_images: int, repeats: int) -> list[dict]:
    shape = SHAPES[name]
    model = get_model(name, 10)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (n_images, *shape), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, n_images).astype(np.int32))
    mean, std = (0.5,) * shape[-1], (0.25,) * shape[-1]
    variables = init_variables(model, jax.random.key(0), shape)
    variables = calibrate(model, variables, (images[:64].astype(jnp.float32) / 255 - 0.5) / 0.25)
    batches = batch_eval_set(images, labels, n_images)
    one = jax.jit(lambda v, w, a: batched_accuracy(lambda x: model.apply(v, (x / 255 - 0.5) / 0.25, Bits(w, a)), batches))
    rows = []
    for p in sizes:
        w = rng.choice([2, 4, 8], size=(p, model.num_layers)).astype(np.int32)
        a = rng.choice([2, 4, 8], size=(p, model.num_layers)).astype(np.int32)
        row = {"model": name, "population": p, "images": n_images}
        fns = {"loop": lambda: [one(variables, w[i], a[i]) for i in range(p)]}
        for label, strategy, chunk in (("vmap", "vmap", None), ("map", "map", None), ("map8", "map", 8), ("auto", "auto", None)):
            ev = PopulationEvaluator(model, mean, std, eval_batch_size=n_images, strategy=strategy, chunk_size=chunk)
            fns[label] = functools.partial(ev, variables, w, a, images, labels)
        for label, seconds in _interleaved_medians(fns, repeats).items():
            row[label] = n_images * p / seconds
        fastest = max(row[k] for k in ("vmap", "map", "map8"))
        row["auto_vs_fastest"] = row["auto"] / fastest
        row["auto_vs_loop"] = row["auto"] / row["loop"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="P in {1, 8, 32}, fewer images and repeats")
    parser.add_argument("--models", default="lenet5,resnet20")
    parser.add_argument("--sizes", default=None, help="comma-separated population sizes")
    args = parser.parse_args()
    jax.config.update("jax_threefry_partitionable", False)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([1, 8, 32] if args.quick else [1, 8, 32, 128])
    images = {"lenet5": 512 if args.quick else 1000, "resnet20": 64 if args.quick else 256}
    repeats = 5 if args.quick else 7
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, sizes, images[name], repeats)
    device = jax.devices()[0]
    report = {
        "benchmark": "population",
        "unit": "images x individuals per second",
        "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "quick": args.quick,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"population_{device.platform}{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
