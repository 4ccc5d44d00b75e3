"""Scaling over devices and processes: population scoring and data-parallel training.

    python -m benchmarks.scaling [--quick] [--out benchmarks/results/scaling_<device>[_quick]/scaling.json]

Three layouts, each in fresh processes on this host's CPU:

* ``1x1``: one process with one device;
* ``1x2``: one process with two forced host devices (``--xla_force_host_platform_device_count=2``);
* ``2x1``: two processes with one device each, joined over the loopback address with JAX's
  gloo collectives (:mod:`qevo.distributed`), as hosts of a cluster would be.

In each layout, on random weights and images:

* a search generation's scoring: the population of ``configs/lenet5.py`` (16 individuals,
  20 QAT steps of 32 images each, then 1,000 validation images) through
  :class:`qevo.PopulationEvaluator`, the population split over every device;
* a training step (batch 128) of LeNet-5 and of ResNet-20 through :class:`qevo.train.trainer.Trainer`,
  the batch split over every device;
* an epoch (10 steps of 128 images) of 4 LeNet-5 QAT models side by side, as a search's
  final models train (:class:`qevo.train.trainer.PopulationTrainer`), the models spread over every device.

Times are medians of repeats after compilation. Bytes communicated are the summed sizes of
the collective operations (all-reduce, all-gather, ...) in the compiled program of one
generation or one step, per device; a ring all-reduce sends about twice its size. The host's
cores bound what more devices can gain: on a 2-core machine each layout shares the same
two cores. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

from benchmarks import common

WORKER = "--worker"
LAYOUTS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # processes, devices per process
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "s8": 1, "u8": 1, "pred": 1, "s64": 8}


def collective_bytes(hlo: str) -> int:
    """Summed sizes (bytes) of the results of the collective operations in compiled HLO text
    (an asynchronous collective counted once, at its ``-start``)."""
    total = 0
    for line in hlo.splitlines():
        op = re.search(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if op is None:
            continue
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", op.group(1)):
            if dtype in DTYPE_BYTES:
                size = 1
                for d in filter(None, dims.split(",")):
                    size *= int(d)
                total += DTYPE_BYTES[dtype] * size
    return total


def _train_step(name: str, repeats: int) -> dict:
    """Seconds and bytes communicated per training step (batch 128) of model ``name``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.population import Bench
    from qevo.data.datasets import Dataset
    from qevo.search.config import defaults
    from qevo.train import trainer as training

    bench = Bench(name, 128, 0, 1)
    cfg = defaults()
    cfg.model.name, cfg.train.batch_size, cfg.train.augment = name, 128, name != "lenet5"
    images, labels = np.asarray(bench.images), np.asarray(bench.labels)
    c = images.shape[-1]
    ds = Dataset("random", images, labels, images, labels, images, labels, 10, tuple("0123456789"),
                 (0.5,) * c, (0.25,) * c)
    trainer = training.Trainer(cfg, ds, bench.model, quantized=False)  # one epoch is one step
    state, key = trainer.init_state(bench.variables), jax.random.key(2)
    step = jax.jit(lambda t, v, x, y: trainer._gradients(t, v, None, x, y, key))
    hlo = step.lower({"params": bench.variables["params"]}, bench.variables, jnp.asarray(images),
                     jnp.asarray(labels)).compile().as_text()
    seconds = common.median_seconds(lambda: trainer.epoch(state, None, key, images, labels), repeats)
    return {"batch": 128, "seconds_per_step": seconds, "bytes_communicated": collective_bytes(hlo)}


def _final_training(repeats: int) -> dict:
    """Seconds and bytes communicated per epoch of 4 LeNet-5 QAT models side by side
    (:class:`qevo.train.trainer.PopulationTrainer`, 10 steps of 128 images each), spread over every device."""
    import jax

    from benchmarks.population import Bench
    from qevo.data.datasets import Dataset
    from qevo.quant.layers import Bits
    from qevo.search.config import defaults
    from qevo.train import trainer as training

    bench = Bench("lenet5", 1280, 0, 1)
    cfg = defaults()
    cfg.train.batch_size = 128
    w, a = bench.population(4)
    bits = Bits(w=w, a=a)
    images, labels = np.asarray(bench.images), np.asarray(bench.labels)
    ds = Dataset("random", images, labels, images, labels, images, labels, 10, tuple("0123456789"), (0.5,), (0.25,))
    trainer = training.PopulationTrainer(cfg, ds, bench.model, quantized=True)
    state, key = trainer.init_state(bench.variables, 4), jax.random.key(2)
    hlo = trainer.epoch.lower(state, bits, key, images, labels).compile().as_text()
    seconds = common.median_seconds(lambda: trainer.epoch(state, bits, key, images, labels), repeats)
    return {"models": 4, "steps": trainer.one.steps_per_epoch, "batch": 128, "seconds_per_epoch": seconds,
            "bytes_communicated": collective_bytes(hlo)}


def worker(quick: bool) -> None:
    """Time this layout's generation and training steps; process 0 prints one JSON line."""
    from qevo import distributed

    distributed.initialize()
    import jax

    from benchmarks.population import Bench

    jax.config.update("jax_threefry_partitionable", False)
    repeats = 2 if quick else 5
    row = {"processes": jax.process_count(), "devices": jax.device_count()}

    bench = Bench("lenet5", 1000, 20, 32)
    w, a = bench.population(16)
    evaluator = bench.evaluator(qat=True)
    call = bench.call(evaluator, w, a)
    lowered = evaluator.lower(bench.variables, w, a, bench.images, bench.labels, key=jax.random.key(1),
                              train_images=bench.images, train_labels=bench.labels)
    row["generation"] = {"model": "lenet5", "population": 16, "qat_steps": 20, "eval_images": 1000,
                         "seconds": common.median_seconds(call, repeats),
                         "bytes_communicated": collective_bytes(lowered.compile().as_text())}

    for name in ("lenet5", "resnet20"):
        row[f"train_{name}"] = _train_step(name, repeats)
    row["final_lenet5"] = _final_training(repeats)
    if distributed.is_writer():
        print(json.dumps(row), flush=True)


def run_layout(name: str, quick: bool) -> dict:
    """One layout's row, from its own process(es)."""
    from qevo import distributed

    processes, devices = LAYOUTS[name]
    procs = distributed.start_local(["-m", "benchmarks.scaling", WORKER] + (["--quick"] if quick else []),
                                    processes, devices)
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"layout {name} failed:\n{err[-3000:]}")
    row = json.loads(next(line for line in outs[0][0].splitlines() if line.startswith("{")))
    return {"layout": name, **row}


def measure(quick: bool) -> dict:
    """Every layout's row, with speed-ups against ``1x1``."""
    environment = common.environment()  # the load average before the layouts run
    rows = [run_layout(name, quick) for name in LAYOUTS]
    base = rows[0]
    for row in rows:
        row["generation"]["speedup_vs_1x1"] = base["generation"]["seconds"] / row["generation"]["seconds"]
        for name in ("lenet5", "resnet20"):
            key = f"train_{name}"
            row[key]["speedup_vs_1x1"] = base[key]["seconds_per_step"] / row[key]["seconds_per_step"]
        row["final_lenet5"]["speedup_vs_1x1"] = (base["final_lenet5"]["seconds_per_epoch"]
                                                 / row["final_lenet5"]["seconds_per_epoch"])
    return {"benchmark": "scaling over devices and processes", "rows": rows, **environment}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/scaling_<device>[_quick]/scaling.json)")
    parser.add_argument(WORKER, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.quick)
        return None
    import pathlib

    out = pathlib.Path(args.out) if args.out else common.result_path("scaling", args.quick)
    return common.write(measure(args.quick), out)


if __name__ == "__main__":
    main()
