"""Population scoring throughput against the number of forced host (CPU) devices.

    python -m benchmarks.devices [--max-devices 4] [--quick]

For each device count D in 1..``--max-devices``, a fresh Python process with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` scores the same population through
:class:`qevo.PopulationEvaluator` laid over all D devices (the ``pop`` mesh), so the
population is split D ways. Throughput is images x individuals per second (median of
repeats). The host's cores bound what D can gain: on a 2-core machine D > 2 only adds
threads contending for the same cores. Prints JSON rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = "--worker"


def worker(quick: bool) -> None:
    """Time scoring on every visible device; prints one JSON line per model."""
    import jax

    from benchmarks.population import Bench, interleaved_medians

    jax.config.update("jax_threefry_partitionable", False)
    plan = {"lenet5": (32, 512 if quick else 1000), "resnet20": (8, 32 if quick else 128)}
    for name, (p, images) in plan.items():
        bench = Bench(name, images, 0, 32)
        w, a = bench.population(p)
        seconds = interleaved_medians({"auto": bench.call(bench.evaluator(), w, a)}, 3 if quick else 5)["auto"]
        print(json.dumps({"model": name, "devices": jax.device_count(), "population": p, "images": images,
                          "seconds": seconds, "throughput": images * p / seconds}), flush=True)


def measure(max_devices: int, quick: bool) -> dict:
    """Rows of throughput by device count, each from its own process; speed-up against D = 1."""
    rows = []
    for d in range(1, max_devices + 1):
        env = {**os.environ,
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={d}",
               "JAX_PLATFORMS": "cpu"}
        args = [sys.executable, "-m", "benchmarks.devices", WORKER] + (["--quick"] if quick else [])
        done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"device-count worker D={d} failed:\n{done.stderr[-2000:]}")
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["devices"] == 1)
        row["speedup_vs_1"] = row["throughput"] / base["throughput"]
        print(json.dumps(row), flush=True)
    return {"benchmark": "population scoring against forced host device count", "cpu_cores": os.cpu_count(),
            "unit": "images x individuals per second", "rows": rows}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.devices", description=__doc__.splitlines()[0])
    parser.add_argument("--max-devices", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument(WORKER, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.quick)
        return None
    report = measure(args.max_devices, args.quick)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
