"""Benchmark: ONNX exports of finished runs, checked in onnxruntime on the whole test split.

    python -m benchmarks.export --model RUN:NAME [--model RUN:NAME ...] [--float RUN:NAME]
        [--onnx-dir runs/export] [--out benchmarks/results/export_<device>/export.json]

Each ``RUN:NAME`` is exported with :func:`qevo.export.exporter.export` (``NAME`` empty for a run's
single result) to ``<onnx-dir>/<run folder>_<name>.onnx`` and run in onnxruntime (CPU, default
graph optimisations) on the run's test split. Per model: the test accuracy the run
reported, onnxruntime's and qevo's own forward pass's (now), the share of images whose
predicted class agrees between onnxruntime and qevo, the largest logit difference, the
ONNX file's bytes and their ratio to ``--float``'s export, widths, BitOps, size in bits,
how each kernel is stored. Prints JSON (with the package versions) and writes ``--out``.
"""

from __future__ import annotations

import argparse
import pathlib
import time

from benchmarks import common
from qevo.export import exporter


def one(spec: str, onnx_dir: pathlib.Path) -> dict:
    """Export and check ``RUN:NAME``; returns its report entry."""
    run, _, name = spec.rpartition(":")
    folder = pathlib.Path(run)
    out = onnx_dir / f"{folder.name}_{name or 'result'}.onnx"
    start = time.perf_counter()
    record = exporter.export(folder, name or None, out, check=True)
    check = record.pop("verification")
    return {
        "run": str(folder), "name": record["source"]["model"], "command": record["source"]["command"],
        "file": str(out), "bytes": record["bytes"], "opset": record["opset"],
        "w_bits": record["w_bits"], "a_bits": record["a_bits"], "bitops": record["bitops"],
        "size_bits": record["size_bits"], "weights": {layer["name"]: layer["weights"] for layer in record["layers"]},
        "reported_test_accuracy": check["reported_test_accuracy"],
        "onnxruntime_test_accuracy": check["onnxruntime_test_accuracy"],
        "qevo_forward_test_accuracy": check["qevo_forward_test_accuracy"],
        "points_onnxruntime_minus_reported": round(100 * (check["onnxruntime_test_accuracy"]
                                                          - check["reported_test_accuracy"]), 4),
        "prediction_agreement": check["prediction_agreement"],
        "max_abs_logit_difference": check["max_abs_logit_difference"],
        "test_images": check["images"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="RUN:NAME, repeatable")
    parser.add_argument("--float", required=True, help="RUN:NAME of the float model the sizes are compared with")
    parser.add_argument("--onnx-dir", type=pathlib.Path, default=pathlib.Path("runs/export"))
    parser.add_argument("--out", type=pathlib.Path,
                        help="JSON path (default benchmarks/results/export_<device>/export.json)")
    args = parser.parse_args(argv)
    env = common.environment()
    env["versions"].update({name: common.package_version(name) for name in ("onnx", "onnxruntime")})
    reference = one(args.float, args.onnx_dir)
    models = [reference, *(one(spec, args.onnx_dir) for spec in args.model)]
    for m in models:
        m["bytes_over_float"] = round(m["bytes"] / reference["bytes"], 4)
    report = {**env, "benchmark": "export", "float": args.float, "models": models}
    return common.write(report, args.out or common.result_path("export"))


if __name__ == "__main__":
    main()
