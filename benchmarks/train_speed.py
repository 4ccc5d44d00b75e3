"""Training and forward throughput: qevo against PyTorch on the same cores, in the same run.

``python -m benchmarks.train_speed [--quick] [--models resnet20,mobilenetv2,lenet5] [--with-xla]``

For each model, images/s of

* ``float``: a training step (SGD with Nesterov momentum and weight decay 5e-4,
  BatchNorm in training mode, cross-entropy): qevo's own compiled epoch
  (:class:`qevo.train.trainer.Trainer`, the path ``python -m qevo.train`` runs, no augmentation),
  ``--steps`` steps per timed call;
* ``float_bf16``: the same step with the convolutions' products in bfloat16
  (``model.precision="bfloat16"``: oneDNN's AMX/AVX512-BF16 kernels, float32 sums; PyTorch
  under ``torch.autocast("cpu", torch.bfloat16)``);
* ``qat_w4a4``: the float step with fake quantization at w4a4 on every layer but the first
  and last (qevo's QAT);
* ``forward``: inference on ``--forward-images`` images in one call;

for ResNet-20 (32x32, batch 128), MobileNetV2 (128x128, batch 64) and LeNet-5 (28x28,
batch 128), on random inputs. PyTorch runs first, in a child process
(:mod:`benchmarks.torch_baseline`: NCHW, channels_last and ``torch.compile``, the best of
the three counts), then qevo in this one; ``qevo_over_torch`` is the ratio. With
``--with-xla`` qevo is also measured with ``QEVO_ONEDNN=0`` (XLA's convolutions, the path
before oneDNN) in another child. Medians of ``--repeats`` timed calls after a warm-up.

Prints JSON and a table; writes ``benchmarks/results/train_speed_<device>[_quick]/train_speed.json``.
``--quick`` (3 repeats, fewer steps, no ``torch.compile``) takes about 6 minutes on a
2-core CPU; the full run about 15.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np

from benchmarks import common
from qevo import config as config_lib
from qevo.data.datasets import Dataset, normalize
from qevo.models.inputs import uniform_bits
from qevo.models.zoo import get_model, init_variables
from qevo.quant import onednn
from qevo.quant.layers import QuantOptions, default_conv
from qevo.train.trainer import Trainer

# model: (input [H, W, C], training batch, forward images)
MODELS = {"resnet20": ((32, 32, 3), 128, 1000), "mobilenetv2": ((128, 128, 3), 64, 256),
          "lenet5": ((28, 28, 1), 128, 1000)}
MODES = ("float", "float_bf16", "qat_w4a4", "forward")


def train_config(name: str, batch: int):
    """The benchmark's training recipe as a qevo config (the PyTorch side matches it)."""
    cfg = config_lib.defaults()
    cfg.model.name = name
    cfg.train.update({"epochs": 1, "batch_size": batch, "optimizer": "sgd", "learning_rate": 0.01, "momentum": 0.9,
                      "nesterov": True, "weight_decay": 5e-4, "augment": False})
    return cfg


def measure_qevo(name: str, repeats: int, steps: int) -> dict:
    """qevo's images/s of each mode for one model (``MODES``)."""
    shape, batch, forward_images = MODELS[name]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (steps * batch, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, steps * batch).astype(np.int32)
    empty = images[:0]
    mean, std = (0.5,) * shape[-1], (0.25,) * shape[-1]
    ds = Dataset(name="random", train_images=images, train_labels=labels, val_images=empty, val_labels=labels[:0],
                 test_images=empty, test_labels=labels[:0], num_classes=10, class_names=tuple(map(str, range(10))),
                 mean=mean, std=std)
    cfg = train_config(name, batch)
    model = get_model(name, 10)
    conv = default_conv(jax.devices()[0].platform)
    variables = init_variables(model, jax.random.key(0), shape)
    images_d, labels_d = jax.device_put(images), jax.device_put(labels)
    result = {}
    for mode in ("float", "float_bf16", "qat_w4a4"):
        bits = uniform_bits(model.num_layers, 4, 4) if mode == "qat_w4a4" else None
        net = get_model(name, 10, QuantOptions(conv=conv, precision="bfloat16")) if mode == "float_bf16" else model
        trainer = Trainer(cfg, ds, net, quantized=bits is not None)
        state = trainer.init_state(variables)

        def epoch(trainer=trainer, state=state, bits=bits):
            return trainer.epoch(state, bits, jax.random.key(1), images_d, labels_d)

        seconds = common.median_seconds(epoch, repeats)
        result[mode] = steps * batch / seconds
    x = jax.device_put(rng.integers(0, 256, (forward_images, *shape), dtype=np.uint8))
    forward = jax.jit(lambda v, x: model.apply(v, normalize(x, mean, std), None, train=False))
    result["forward"] = forward_images / common.median_seconds(lambda: forward(variables, x), repeats)
    return {"images_per_second": result, "convolutions": "onednn" if onednn.available() else "xla",
            "onednn_status": dataclasses.asdict(onednn.status())}


def _child(argv: list[str], env: dict | None = None) -> dict:
    """Run a measurement in a child process; its last stdout line is the JSON report."""
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})}, cwd=pathlib.Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(models: list[str], repeats: int, steps: int, compile_: bool, with_xla: bool) -> list[dict]:
    rows = []
    for name in models:
        torch = _child(["benchmarks.torch_baseline", "--model", name, "--repeats", str(repeats), "--steps", str(steps),
                        "--forward-images", str(MODELS[name][2]), *(["--no-compile"] * (not compile_))])
        qevo = measure_qevo(name, repeats, steps)
        row = {"model": name, "input_hwc": list(MODELS[name][0]), "batch": MODELS[name][1],
               "forward_images": MODELS[name][2], "steps_per_call": steps, "qevo": qevo, "torch": torch,
               "qevo_over_torch": {m: qevo["images_per_second"][m] / torch[m]["best_images_per_second"] for m in MODES}}
        if with_xla:
            xla = _child(["benchmarks.train_speed", "--child-qevo", name, "--repeats", str(repeats),
                          "--steps", str(steps)], {onednn.DISABLE_ENV: "0"})
            row["qevo_xla"] = xla
            row["onednn_over_xla"] = {m: qevo["images_per_second"][m] / xla["images_per_second"][m] for m in MODES}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<12} {'mode':<10} {'qevo img/s':>11} {'PyTorch best':>13} {'(layout)':<14} {'qevo/PyTorch':>12}"
             + ("  qevo XLA img/s" if any("qevo_xla" in r for r in rows) else "")]
    for r in rows:
        for m in MODES:
            t = r["torch"][m]
            line = (f"{r['model']:<12} {m:<10} {r['qevo']['images_per_second'][m]:11,.1f} "
                    f"{t['best_images_per_second']:13,.1f} {'(' + t['best'] + ')':<14} "
                    f"{r['qevo_over_torch'][m]:11.2f}x")
            if "qevo_xla" in r:
                line += f"  {r['qevo_xla']['images_per_second'][m]:14,.1f}"
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, fewer steps per call, no torch.compile")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 5, --quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed call (default 10, --quick 5)")
    parser.add_argument("--with-xla", action="store_true",
                        help="also measure qevo with XLA's convolutions (QEVO_ONEDNN=0)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/train_speed_<device>[_quick]/train_speed.json)")
    parser.add_argument("--child-qevo", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    steps = args.steps or (5 if args.quick else 10)
    jax.config.update("jax_threefry_partitionable", False)
    if args.child_qevo:
        report = measure_qevo(args.child_qevo, repeats, steps)
        print(json.dumps(report))
        return report
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(MODELS)}")
    out = pathlib.Path(args.out) if args.out else common.result_path("train_speed", args.quick)
    report = {**common.environment(), "quick": args.quick, "repeats": repeats}
    start = time.perf_counter()
    report["rows"] = measure(models, repeats, steps, not args.quick, args.with_xla)
    report["seconds"] = time.perf_counter() - start
    common.write(report, out, echo=False)
    print(table(report["rows"]))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
