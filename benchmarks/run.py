"""The performance report: every benchmark in one run, a table, one JSON per device.

    python -m benchmarks.run [--quick] [--only nsga3,population,coevolve,kmeans,scaling,convs,train_speed]
                             [--models lenet5,resnet20] [--out PATH]

Runs, in this order, with each baseline measured in the same run:

* ``nsga3``: NSGA-III survival (2N -> N), N in {100, 1000, 10000} (``--quick``: 100,
  1000), M in {2, 3, 5}, qevo against pymoo 0.6 on the host CPU;
* ``population``: population scoring and vmapped QAT steps of LeNet-5 and ResNet-20
  against a per-individual loop, achieved FLOP/s (and the fraction of peak on a GPU), on
  an accelerator also the memory each population size needs and the largest that fits;
* ``coevolve``: coevolution evaluations per second against a per-candidate Python loop;
* ``kmeans``: every (LeNet-5 layer, k in {2, 5, 16, 50}) clustering in one batched call
  against scikit-learn's ``KMeans`` loop;
* ``scaling`` (CPU only): a search generation's scoring and data-parallel training steps in
  one process with 1 and with 2 forced host devices, and in 2 processes (gloo);
* ``convs`` (CPU only): qevo's CPU convolution paths (oneDNN, row products) against XLA's
  convolution, per layer;
* ``train_speed``: training (float and w4a4 QAT) and forward images/s of ResNet-20,
  MobileNetV2 and LeNet-5 against PyTorch's best layout (needs the ``bench`` extra:
  torch and torchvision; ``--quick`` leaves out ``torch.compile``).

All inputs are random (speed does not depend on them), so no dataset is needed. The
report is rewritten after each benchmark (a cut-short run keeps what finished) to
``benchmarks/results/run_<device>[_quick]/run.json`` or ``--out``. ``--quick`` takes about
12 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax

from benchmarks import coevolve, common, convs, kmeans, nsga3, population, scaling, train_speed

BENCHMARKS = ("nsga3", "population", "coevolve", "kmeans", "scaling", "convs", "train_speed")
CPU_ONLY = ("scaling", "convs")  # forced host devices, and convolution paths that only the CPU takes


def run_one(name: str, quick: bool, gpu: bool, models: str) -> dict:
    """One benchmark's report."""
    if name == "nsga3":
        return nsga3.measure([100, 1000] if quick else [100, 1000, 10000], 5 if quick else 9, tilings=gpu)
    if name == "population":
        args = population.parser().parse_args(["--quick"] * quick + ["--memory"] * gpu + ["--models", models])
        return population.measure(**population.options(args))
    if name == "coevolve":
        return coevolve.measure(None, 4, 4 if quick else 8, 1000, 3)
    if name == "kmeans":
        return kmeans.measure(None, quick=True, repeats=3)
    if name == "convs":
        return convs.measure(3 if quick else 5)
    if name == "train_speed":
        rows = train_speed.measure(list(train_speed.MODELS), 3 if quick else 5, 5 if quick else 10, not quick, False)
        return {"rows": rows}
    return scaling.measure(quick)


def table(report: dict) -> str:
    """The headline figures of a report, one line each."""
    lines = [f"device {report['device']['kind']} ({report['device']['platform']}), host {report['host']['cpu']} "
             f"x{report['host']['cores']}, jax {report['versions']['jax']}"]
    parts = report["benchmarks"]
    for row in parts.get("nsga3", {}).get("results", []):
        lines.append(f"nsga3      N={row['N']:<6} M={row['M']}  qevo {row['qevo_s'] * 1e3:9.2f} ms  "
                     f"pymoo {row['pymoo_s'] * 1e3:9.2f} ms  pymoo/qevo {row['pymoo_over_qevo']:6.2f}x")
    for row in parts.get("population", {}).get("rows", []):
        if "error" in row:
            lines.append(f"population {row['model']:<8} {row['mode']:<5} P={row['population']:<5} {row['error'][:80]}")
            continue
        vs_loop = f"  auto/loop {row['auto_vs_loop']:5.2f}x" if "auto_vs_loop" in row else ""
        others = "  " + " ".join(f"{k} {v:,.0f}" for k, v in row["throughput"].items() if k not in ("auto", "loop"))
        lines.append(f"population {row['model']:<8} {row['mode']:<5} P={row['population']:<5} "
                     f"auto {row['throughput']['auto']:12,.0f} img*ind/s  {row['auto_tflops']:7.3f} TFLOP/s"
                     f"{vs_loop}{others if len(others) > 2 else ''}")
    for name, mem in parts.get("population", {}).get("memory", {}).items():
        if "largest_run" in mem:
            run = mem["largest_run"]
            lines.append(f"population {name:<8} largest P that fits: {run['population']} "
                         f"({mem['bytes_per_individual'] / 2**20:.1f} MiB per individual), "
                         f"{run['throughput']:,.0f} img*ind/s")
    if "coevolve" in parts:
        c = parts["coevolve"]
        lines.append(f"coevolve   {c['evaluations_per_second']['qevo']:8.1f} evals/s against a Python loop's "
                     f"{c['evaluations_per_second']['python_loop']:.1f}: {c['speedup_qevo_over_loop']:.2f}x")
    if "kmeans" in parts:
        k = parts["kmeans"]
        lines.append(f"kmeans     {k['inputs']['pairs']} (layer, k) pairs: qevo {k['seconds']['qevo_median']:.2f} s, "
                     f"scikit-learn loop {k['seconds']['sklearn_loop']:.1f} s: {k['speedup_sklearn_over_qevo']:.1f}x")
    for row in parts.get("scaling", {}).get("rows", []):
        gen = row["generation"]
        steps = "  ".join(f"{name} step {row[f'train_{name}']['seconds_per_step'] * 1e3:6.1f} ms "
                          f"({row[f'train_{name}']['speedup_vs_1x1']:.2f}x)" for name in ("lenet5", "resnet20"))
        lines.append(f"scaling    {row['layout']} generation {gen['seconds']:6.2f} s "
                     f"({gen['speedup_vs_1x1']:.2f}x of 1x1)  {steps}")
    for row in parts.get("convs", {}).get("layers", []):
        lines.append(f"convs      {row['layer']:<13} XLA time / "
                     + ", ".join(f"{k} {v:5.2f}x" for k, v in row["xla_over"].items()))
    if "train_speed" in parts:
        lines += ["train      " + line for line in train_speed.table(parts["train_speed"]["rows"]).splitlines()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: about 7 minutes on a 2-core CPU")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--models", default="lenet5,resnet20", help="models of the population benchmark")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/run_<device>[_quick]/run.json)")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {','.join(BENCHMARKS)}")
    jax.config.update("jax_threefry_partitionable", False)
    gpu = jax.default_backend() != "cpu"
    if gpu:
        names = [name for name in names if name not in CPU_ONLY]
    out = pathlib.Path(args.out) if args.out else common.result_path("run", args.quick)
    report = {**common.environment(), "quick": args.quick, "benchmarks": {}, "seconds": {}}
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        report["benchmarks"][name] = run_one(name, args.quick, gpu, args.models)
        report["seconds"][name] = time.perf_counter() - start
        common.write(report, out, echo=False)
    print(table(report))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
