"""What every benchmark report records about its run (the command line, the git commit, the
device, host and versions), and how a report is written."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "evosax", "numpy", "pymoo", "scikit-learn", "moocore")


def package_version(name: str) -> str | None:
    """Installed version of a distribution, None if it is absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The host CPU's model name (Linux ``/proc/cpuinfo``), else the machine type."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def command() -> str:
    """This process's command line from ``sys.argv``: ``python -m <module> <args>`` when it was
    started with ``-m`` (``python -m benchmarks.nsga3 --quick``), else ``python <argv>``;
    arguments quoted as a POSIX shell needs them."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return shlex.join(["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def git_state(root: pathlib.Path = REPO) -> dict | None:
    """The checkout at ``root``: ``{"commit": <git rev-parse HEAD>, "dirty": <tracked files
    differ from it>}``; None where ``root`` is no git checkout (or git is missing)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance() -> dict:
    """What produced a report: the command line (:func:`command`) and the git checkout of
    this repository (:func:`git_state`)."""
    return {"command": command(), "git": git_state()}


def device_tag() -> str:
    """The device part of a results folder's name: ``cpu``, or the first device's kind in lower
    case with ``_`` between words (``nvidia_h100_80gb_hbm3``)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")


def result_path(benchmark: str, quick: bool = False) -> pathlib.Path:
    """Where ``python -m benchmarks.<benchmark>`` writes its report unless told otherwise:
    ``benchmarks/results/<benchmark>_<device>[_quick]/<benchmark>.json``, one folder per run as
    ``benchmarks/results/README.md`` names them."""
    return RESULTS / f"{benchmark}_{device_tag()}{'_quick' if quick else ''}" / f"{benchmark}.json"


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after one call to compile and
    warm up; JAX results are waited for (``jax.block_until_ready``)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def spread(values, decimals: int | None = None) -> dict:
    """Repeated measurements as a report records them: the values (2 decimals), their mean and
    sample standard deviation (3 decimals; None for one value), in the values' own unit;
    ``decimals`` rounds all three alike."""
    v = np.asarray(values, np.float64)
    each, summary = (2, 3) if decimals is None else (decimals, decimals)
    return {"values": [round(float(x), each) for x in v], "mean": round(float(v.mean()), summary),
            "std": round(float(v.std(ddof=1)), summary) if v.size > 1 else None}


def environment() -> dict:
    """The command line and git commit (:func:`provenance`), device, host (with the load
    average now) and package versions of this run."""
    device = jax.devices()[0]
    return {**provenance(),
            "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()},
            "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine(),
                     "load_avg_at_start": list(os.getloadavg())},
            "versions": {**{name: package_version(name) for name in PACKAGES}, "python": platform.python_version()},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def write(report: dict, out: pathlib.Path, echo: bool = True) -> dict:
    """Record the command line and git commit if ``report`` lacks them (:func:`provenance`)
    and the load average at the end, write ``report`` as JSON to ``out`` and, with ``echo``,
    print it."""
    for key, value in provenance().items():
        report.setdefault(key, value)
    if "host" in report:
        report["host"]["load_avg_at_end"] = list(os.getloadavg())
    text = json.dumps(report, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    if echo:
        print(text)
    return report
