"""qevo's own networks as plain Flax Linen modules: LeNet-5, CIFAR ResNets, MobileNetV2.

Nothing here knows about quantization. Each module is called as
``module.apply(variables, images, train=...)`` with float ``images [N, H, W, C]``
(normalised) and returns logits ``[N, num_classes]``, like any user's network; qevo
quantizes them from outside through :func:`qevo.quant.interception.quantize`
(:func:`qevo.models.zoo.get_model` does it by name). Convolutions and dense layers are
``flax.linen.Conv`` and ``flax.linen.Dense`` (their kernels initialised as He et al. and
LeCun normal); normalization is :class:`qevo.quant.layers.BatchNorm` (``flax.linen.BatchNorm``'s
variables, a faster gradient).

The convolutions and dense layers are named ``QConv_<i>`` and ``QDense_<i>`` in creation
order within each module, the names of the layers qevo built these networks from before
they were plain Flax. Flax draws each module's initial weights from a stream keyed by its
name, so the networks initialize exactly as before, and models saved before load unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qevo.errors import ConfigError
from qevo.quant.layers import BatchNorm

_HE = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
_LECUN = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


class _Names:
    """``QConv_<i>`` and ``QDense_<i>``, counted within one module's call (see the module docstring)."""

    def __init__(self):
        self.convs = self.denses = 0

    def conv(self) -> str:
        self.convs += 1
        return f"QConv_{self.convs - 1}"

    def dense(self) -> str:
        self.denses += 1
        return f"QDense_{self.denses - 1}"


def _conv(names: _Names, features: int, size: int, strides: int = 1, groups: int = 1, padding: str = "SAME",
          bias: bool = False) -> nn.Conv:
    return nn.Conv(features, (size, size), (strides, strides), padding=padding, feature_group_count=groups,
                   use_bias=bias, kernel_init=_HE, name=names.conv())


def _dense(names: _Names, features: int) -> nn.Dense:
    return nn.Dense(features, kernel_init=_LECUN, name=names.dense())


def _batch_norm(train: bool) -> BatchNorm:
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 MNIST: conv6@5x5 (same), pool, conv16@5x5, pool, 120, 84, classes.

    Attributes:
      num_classes: output classes.
      activation: ``"relu"`` or ``"tanh"`` (the weight-sharing seed uses both).
    """

    num_classes: int = 10
    activation: str = "relu"

    LAYER_NAMES = ("conv1", "conv2", "fc1", "fc2", "fc3")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.activation not in ("relu", "tanh"):
            raise ConfigError(f"LeNet5 activation must be 'relu' or 'tanh', got {self.activation!r}")
        act = nn.relu if self.activation == "relu" else jnp.tanh
        names = _Names()
        x = act(_conv(names, 6, 5, bias=True)(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = act(_conv(names, 16, 5, padding="VALID", bias=True)(x))
        x = nn.max_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
        x = act(_dense(names, 120)(x))
        x = act(_dense(names, 84)(x))
        return _dense(names, self.num_classes)(x)


class _BasicBlock(nn.Module):
    """CIFAR ResNet basic block; a 1x1 projection shortcut (``QConv_2``) where the shape changes."""

    features: int
    strides: int

    @nn.compact
    def __call__(self, x, train: bool):
        names = _Names()
        y = _conv(names, self.features, 3, self.strides)(x)
        y = nn.relu(_batch_norm(train)(y))
        y = _conv(names, self.features, 3)(y)
        y = _batch_norm(train)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = _conv(names, self.features, 1, self.strides)(x)
            x = _batch_norm(train)(x)
        return nn.relu(x + y)


def resnet_blocks(depth: int) -> int:
    """Basic blocks per stage of a CIFAR ResNet of ``depth`` (6n+2)."""
    if (depth - 2) % 6 or depth < 8:
        raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
    return (depth - 2) // 6


def resnet_layer_names(depth: int) -> tuple[str, ...]:
    """``conv0``, ``stage<s>.block<b>.conv<c>`` and ``fc``: the ``depth`` quantized layers
    (a block's shortcut takes its first convolution's widths)."""
    n = resnet_blocks(depth)
    mid = [f"stage{s + 1}.block{b + 1}.conv{c + 1}" for s in range(3) for b in range(n) for c in range(2)]
    return ("conv0", *mid, "fc")


class CifarResNet(nn.Module):
    """ResNet-20/32/56 for 32x32 CIFAR (He et al. 2016), projection shortcuts.

    Attributes:
      depth: 6n+2 (20, 32, 56, ...).
      num_classes: output classes.
    """

    depth: int = 20
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        blocks = resnet_blocks(self.depth)
        names = _Names()
        x = _conv(names, 16, 3)(x)
        x = nn.relu(_batch_norm(train)(x))
        for stage, features in enumerate((16, 32, 64)):
            for block in range(blocks):
                x = _BasicBlock(features, 2 if stage > 0 and block == 0 else 1)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return _dense(names, self.num_classes)(x)


MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))


def mobilenet_layer_names() -> tuple[str, ...]:
    """``conv0``, ``block<b>.expand|depthwise|project``, ``conv_last`` and ``fc``, in call order."""
    names = ["conv0"]
    block = 0
    for expand, _, repeats, _ in MOBILENET_V2_STAGES:
        for _ in range(repeats):
            block += 1
            if expand != 1:
                names.append(f"block{block}.expand")
            names += [f"block{block}.depthwise", f"block{block}.project"]
    return (*names, "conv_last", "fc")


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), width 1.0, for ImageNet-style inputs (Imagenette).

    Attributes:
      num_classes: output classes.
      dropout: dropout rate before the classifier (training only).
    """

    num_classes: int = 10
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        names = _Names()
        x = _conv(names, 32, 3, 2)(x)
        x = nn.relu6(_batch_norm(train)(x))
        for expand, features, repeats, first_stride in MOBILENET_V2_STAGES:
            for r in range(repeats):
                strides = first_stride if r == 0 else 1
                y = x
                hidden = x.shape[-1] * expand
                if expand != 1:
                    y = nn.relu6(_batch_norm(train)(_conv(names, hidden, 1)(y)))
                y = nn.relu6(_batch_norm(train)(_conv(names, hidden, 3, strides, groups=hidden)(y)))
                y = _batch_norm(train)(_conv(names, features, 1)(y))
                x = x + y if strides == 1 and x.shape[-1] == features else y
        x = nn.relu6(_batch_norm(train)(_conv(names, 1280, 1)(x)))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return _dense(names, self.num_classes)(x)
