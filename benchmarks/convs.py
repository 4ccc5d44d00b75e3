"""CPU convolution paths: oneDNN (qevo's default), XLA's convolution, and the row products.

``python -m benchmarks.convs [--repeats 5]``

Same run, timed round-robin (medians), on random inputs: the first layers of LeNet-5
(28x28x1 -> 6, 5x5, then ReLU and 2x2 max pooling, as in the model) and of the CIFAR
ResNets (32x32x3 -> 16, 3x3), LeNet-5's second layer and a ResNet-20 stage-1 layer
(32x32x16 -> 16, 3x3), each through :func:`qevo.quant.onednn.conv2d`, through
``jax.lax.conv_general_dilated`` and, for single-channel inputs, through
:func:`qevo.quant.layers.toeplitz_conv2d`: the forward pass of 1,000 images and the gradients of
a 128-image batch.

Prints JSON and writes ``benchmarks/results/convs_<device>/convs.json``.
"""

from __future__ import annotations

import argparse
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.population import interleaved_medians
from qevo.quant import layers, onednn

# name: (input [H, W, C], kernel [K, K, C, O], padding, followed by 2x2 max pooling)
LAYERS = {
    "lenet5_conv1": ((28, 28, 1), (5, 5, 1, 6), "SAME", True),
    "lenet5_conv2": ((14, 14, 6), (5, 5, 6, 16), "VALID", True),
    "resnet_stem": ((32, 32, 3), (3, 3, 3, 16), "SAME", False),
    "resnet_stage1": ((32, 32, 16), (3, 3, 16, 16), "SAME", False),
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
        paths = {"xla": lambda x, k, p=padding: _xla(x, k, p)}
        if onednn.available():
            paths["onednn"] = lambda x, k, p=padding: onednn.conv2d(x, k, 1, p, 1)
        if shape[-1] == 1:
            paths["row_products"] = lambda x, k, p=padding: layers.toeplitz_conv2d(x, k, p)
        fns = {}
        for path, conv in paths.items():
            block = _block(conv, pool)
            forward = jax.jit(block)
            grads = jax.jit(jax.grad(lambda x, k, b=block: jnp.sum(b(x, k) ** 2), argnums=(0, 1)))
            fns[f"{path}_forward"] = lambda f=forward, x=x, k=kernel: f(x, k)
            fns[f"{path}_gradients"] = lambda g=grads, x=x, k=kernel: g(x[:128], k)
        seconds = interleaved_medians(fns, repeats)
        rows.append({"layer": name, "input": list(shape), "kernel": list(kernel_shape), "padding": padding,
                     "max_pool": pool, "seconds": seconds,
                     "xla_over": {f"{path}_{part}": seconds[f"xla_{part}"] / seconds[f"{path}_{part}"]
                                  for path in paths if path != "xla" for part in ("forward", "gradients")}})
    return rows


def measure(repeats: int) -> dict:
    return {"benchmark": "CPU convolution paths against XLA's convolution", "repeats": repeats,
            "onednn_status": dataclasses.asdict(onednn.status()), "layers": measure_layers(repeats)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    jax.config.update("jax_threefry_partitionable", False)
    report = {**common.environment(), **measure(args.repeats)}
    return common.write(report, common.result_path("convs"))


if __name__ == "__main__":
    main()
