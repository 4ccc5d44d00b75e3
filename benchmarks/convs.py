"""CPU convolution paths: qevo's ``conv2d`` against XLA's convolution, and what the row-product path buys.

``python -m benchmarks.convs [--repeats 5]``

Same run, timed round-robin (medians), on random inputs:

* **layers**: the first layers of LeNet-5 (28x28x1 -> 6, 5x5, then ReLU and 2x2 max
  pooling, as in the model) and of the CIFAR ResNets (32x32x3 -> 16, 3x3) and LeNet-5's
  second layer, each through :func:`qevo.layers.conv2d` (the path it picks on this
  backend) and through ``jax.lax.conv_general_dilated``: the forward pass of 1,000 images
  and the gradients of a 128-image batch;
* **scoring**: a LeNet-5 population (P = 4, 5,000 images each) scored by
  :class:`qevo.population.PopulationEvaluator` with the row-product path
  (``TOEPLITZ_MAX_WIDTH``) on and off.

Prints JSON and writes ``benchmarks/results/convs_<platform>.json``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.population import MEAN, STD, interleaved_medians
from qevo import layers
from qevo.calibration import calibrate
from qevo.data import normalize
from qevo.models import get_model, init_variables
from qevo.population import PopulationEvaluator

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# name: (input [H, W, C], kernel [K, K, C, O], padding, followed by 2x2 max pooling)
LAYERS = {
    "lenet5_conv1": ((28, 28, 1), (5, 5, 1, 6), "SAME", True),
    "lenet5_conv2": ((14, 14, 6), (5, 5, 6, 16), "VALID", True),
    "resnet_stem": ((32, 32, 3), (3, 3, 3, 16), "SAME", False),
}


def _xla(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _block(conv, pool):
    """``conv`` then ReLU and, with ``pool``, 2x2 max pooling (the layer as the model runs it)."""
    def block(x, kernel):
        y = nn.relu(conv(x, kernel))
        return nn.max_pool(y, (2, 2), (2, 2)) if pool else y
    return block


def measure_layers(repeats: int) -> list[dict]:
    key_x, key_k = jax.random.split(jax.random.key(0))
    rows = []
    for name, (shape, kernel_shape, padding, pool) in LAYERS.items():
        x = jax.random.normal(key_x, (1000, *shape))
        kernel = jax.random.normal(key_k, kernel_shape)
        paths = {"qevo": lambda x, k, p=padding: layers.conv2d(x, k, 1, p, 1), "xla": lambda x, k, p=padding: _xla(x, k, p)}
        fns = {}
        for path, conv in paths.items():
            block = _block(conv, pool)
            forward = jax.jit(block)
            grads = jax.jit(jax.grad(lambda x, k, b=block: jnp.sum(b(x, k) ** 2), argnums=(0, 1)))
            fns[f"{path}_forward"] = lambda f=forward: f(x, kernel)
            fns[f"{path}_gradients"] = lambda g=grads: g(x[:128], kernel)
        seconds = interleaved_medians(fns, repeats)
        rows.append({"layer": name, "input": list(shape), "kernel": list(kernel_shape), "padding": padding, "max_pool": pool,
                     "seconds": seconds,
                     "forward_xla_over_qevo": seconds["xla_forward"] / seconds["qevo_forward"],
                     "gradients_xla_over_qevo": seconds["xla_gradients"] / seconds["qevo_gradients"]})
    return rows


def measure_scoring(repeats: int) -> dict:
    """LeNet-5 population scoring with the row-product path on and off (set at trace time)."""
    model = get_model("lenet5", 10)
    key_v, key_x, key_y = jax.random.split(jax.random.key(1), 3)
    images = jax.random.randint(key_x, (5000, 28, 28, 1), 0, 256).astype(jnp.uint8)
    labels = jax.random.randint(key_y, (5000,), 0, 10)
    variables = calibrate(model, init_variables(model, key_v, (28, 28, 1)), normalize(images[:256], (MEAN,), (STD,)))
    w = np.array([[32, 4, 4, 2, 32]] * 4)
    a = np.array([[32, 8, 4, 4, 32]] * 4)
    fns, default = {}, layers.TOEPLITZ_MAX_WIDTH
    try:
        for name, width in (("row_products", default), ("xla", 0)):
            layers.TOEPLITZ_MAX_WIDTH = width
            evaluate = PopulationEvaluator(model, (MEAN,), (STD,), eval_batch_size=1000)
            jax.block_until_ready(evaluate(variables, w, a, images, labels))  # traced with this setting
            fns[name] = lambda e=evaluate: e(variables, w, a, images, labels)
    finally:
        layers.TOEPLITZ_MAX_WIDTH = default
    seconds = interleaved_medians(fns, repeats)
    return {"population": 4, "images": 5000, "w_bits": w[0].tolist(), "a_bits": a[0].tolist(), "seconds": seconds,
            "images_per_second": {k: 4 * 5000 / s for k, s in seconds.items()},
            "xla_over_row_products": seconds["xla"] / seconds["row_products"]}


def measure(repeats: int) -> dict:
    return {"benchmark": "CPU convolution paths against XLA's convolution", "repeats": repeats,
            "layers": measure_layers(repeats), "lenet5_scoring": measure_scoring(repeats)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    jax.config.update("jax_threefry_partitionable", False)
    report = {"command": " ".join(["python -m benchmarks.convs", *(argv if argv is not None else sys.argv[1:])]),
              **common.environment(), **measure(args.repeats)}
    return common.write(report, RESULTS / f"convs_{jax.default_backend()}.json")


if __name__ == "__main__":
    main()
