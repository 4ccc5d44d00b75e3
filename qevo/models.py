"""Flax models with a fixed order of quantizable layers.

Every model is called as ``model.apply(variables, images, bits, train=...)`` where
``images`` is float ``[N, H, W, C]`` (normalised), ``bits`` a :class:`qevo.layers.Bits`
with int32 ``[L]`` widths or ``None`` for the float network, and returns logits
``[N, num_classes]``. Variables hold ``params``, ``batch_stats`` (ResNet, MobileNetV2) and
``quant`` (``a_clip``: float32 ``[L]``, the activation clip range of each layer).

``num_layers`` is ``L``; ``layer_names`` names each entry; layer 0 is the first
convolution and layer ``L-1`` the classifier, which stay float by default.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qevo.errors import ConfigError
from qevo.layers import BatchNorm, Bits, QConv, QDense, QuantContext, QuantOptions, default_conv


def _context(module: nn.Module, bits: Bits | None, n_layers: int) -> QuantContext:
    clip = module.variable("quant", "a_clip", lambda: jnp.ones((n_layers,), jnp.float32))
    return QuantContext(bits=bits, a_clip=clip.value)


def _batch_norm(train: bool, options: QuantOptions) -> BatchNorm:
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=options.batch_axis)


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 MNIST: conv6@5x5 (same), pool, conv16@5x5, pool, 120, 84, classes.

    Attributes:
      num_classes: output classes.
      activation: ``"relu"`` or ``"tanh"`` (the weight-sharing seed uses both).
      options: static quantizer settings.
    """

    num_classes: int = 10
    activation: str = "relu"
    options: QuantOptions = QuantOptions()

    @property
    def layer_names(self) -> tuple[str, ...]:
        return ("conv1", "conv2", "fc1", "fc2", "fc3")

    @property
    def num_layers(self) -> int:
        return 5

    @nn.compact
    def __call__(self, x: jax.Array, bits: Bits | None = None, train: bool = False) -> jax.Array:
        if self.activation not in ("relu", "tanh"):
            raise ConfigError(f"LeNet5 activation must be 'relu' or 'tanh', got {self.activation!r}")
        act = nn.relu if self.activation == "relu" else jnp.tanh
        signed = self.activation == "tanh"
        ctx = _context(self, bits, self.num_layers)
        opt = self.options
        x = act(QConv(6, 5, index=0, use_bias=True, signed_input=True, options=opt)(x, ctx))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = act(QConv(16, 5, index=1, padding="VALID", use_bias=True, signed_input=signed, options=opt)(x, ctx))
        x = nn.max_pool(x, (2, 2), (2, 2)).reshape((x.shape[0], -1))
        x = act(QDense(120, index=2, signed_input=signed, options=opt)(x, ctx))
        x = act(QDense(84, index=3, signed_input=signed, options=opt)(x, ctx))
        return QDense(self.num_classes, index=4, signed_input=signed, options=opt)(x, ctx)


class _BasicBlock(nn.Module):
    """CIFAR ResNet basic block; a 1x1 projection shortcut shares ``index``'s widths."""

    features: int
    strides: int
    index: int
    options: QuantOptions

    @nn.compact
    def __call__(self, x, ctx: QuantContext, train: bool):
        y = QConv(self.features, 3, index=self.index, strides=self.strides, options=self.options)(x, ctx)
        y = nn.relu(_batch_norm(train, self.options)(y))
        y = QConv(self.features, 3, index=self.index + 1, options=self.options)(y, ctx)
        y = _batch_norm(train, self.options)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = QConv(self.features, 1, index=self.index, strides=self.strides, options=self.options)(x, ctx)
            x = _batch_norm(train, self.options)(x)
        return nn.relu(x + y)


class CifarResNet(nn.Module):
    """ResNet-20/32/56 for 32x32 CIFAR (He et al. 2016), projection shortcuts.

    Attributes:
      depth: 6n+2 (20, 32, 56, ...).
      num_classes: output classes.
      options: static quantizer settings.
    """

    depth: int = 20
    num_classes: int = 10
    options: QuantOptions = QuantOptions()

    @property
    def blocks_per_stage(self) -> int:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {self.depth}")
        return (self.depth - 2) // 6

    @property
    def num_layers(self) -> int:
        return 6 * self.blocks_per_stage + 2

    @property
    def layer_names(self) -> tuple[str, ...]:
        n = self.blocks_per_stage
        mid = [f"stage{s + 1}.block{b + 1}.conv{c + 1}" for s in range(3) for b in range(n) for c in range(2)]
        return ("conv0", *mid, "fc")

    @nn.compact
    def __call__(self, x: jax.Array, bits: Bits | None = None, train: bool = False) -> jax.Array:
        ctx = _context(self, bits, self.num_layers)
        x = QConv(16, 3, index=0, signed_input=True, options=self.options)(x, ctx)
        x = nn.relu(_batch_norm(train, self.options)(x))
        index = 1
        for stage, features in enumerate((16, 32, 64)):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(features, strides, index, self.options)(x, ctx, train)
                index += 2
        x = jnp.mean(x, axis=(1, 2))
        return QDense(self.num_classes, index=index, options=self.options)(x, ctx)


_MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1))


def _mobilenet_layer_names() -> tuple[str, ...]:
    names = ["conv0"]
    block = 0
    for expand, _, repeats, _ in _MOBILENET_V2_STAGES:
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
      options: static quantizer settings.
    """

    num_classes: int = 10
    dropout: float = 0.2
    options: QuantOptions = QuantOptions()

    @property
    def layer_names(self) -> tuple[str, ...]:
        return _mobilenet_layer_names()

    @property
    def num_layers(self) -> int:
        return len(_mobilenet_layer_names())

    @nn.compact
    def __call__(self, x: jax.Array, bits: Bits | None = None, train: bool = False) -> jax.Array:
        ctx = _context(self, bits, self.num_layers)
        opt = self.options
        x = QConv(32, 3, index=0, strides=2, signed_input=True, options=opt)(x, ctx)
        x = nn.relu6(_batch_norm(train, opt)(x))
        index = 1
        for expand, features, repeats, first_stride in _MOBILENET_V2_STAGES:
            for r in range(repeats):
                strides = first_stride if r == 0 else 1
                y = x
                hidden = x.shape[-1] * expand
                if expand != 1:
                    y = QConv(hidden, 1, index=index, signed_input=True, options=opt)(y, ctx)
                    y = nn.relu6(_batch_norm(train, opt)(y))
                    index += 1
                # The first block's depthwise conv reads conv0's ReLU6 output; later ones read an expansion's.
                y = QConv(hidden, 3, index=index, strides=strides, groups=hidden, options=opt)(y, ctx)
                y = nn.relu6(_batch_norm(train, opt)(y))
                y = QConv(features, 1, index=index + 1, options=opt)(y, ctx)
                y = _batch_norm(train, opt)(y)
                index += 2
                x = x + y if strides == 1 and x.shape[-1] == features else y
        x = QConv(1280, 1, index=index, signed_input=True, options=opt)(x, ctx)
        x = nn.relu6(_batch_norm(train, opt)(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return QDense(self.num_classes, index=index + 1, options=opt)(x, ctx)


MODELS = {
    "lenet5": lambda nc, opt, **kw: LeNet5(num_classes=nc, options=opt, **kw),
    "resnet20": lambda nc, opt, **kw: CifarResNet(depth=20, num_classes=nc, options=opt, **kw),
    "resnet32": lambda nc, opt, **kw: CifarResNet(depth=32, num_classes=nc, options=opt, **kw),
    "resnet56": lambda nc, opt, **kw: CifarResNet(depth=56, num_classes=nc, options=opt, **kw),
    "mobilenetv2": lambda nc, opt, **kw: MobileNetV2(num_classes=nc, options=opt, **kw),
}


def get_model(name: str, num_classes: int, options: QuantOptions | None = None, **kwargs) -> nn.Module:
    """Build a model by name (``lenet5``, ``resnet20/32/56``, ``mobilenetv2``).  Without
    ``options``: the defaults, with the convolution kernels of the default devices
    (:func:`qevo.layers.default_conv`)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if options is None:
        options = QuantOptions(conv=default_conv(jax.devices()[0].platform))
    return MODELS[name](num_classes, options, **kwargs)


VARIABLE_COLLECTIONS = ("params", "batch_stats", "quant")


def init_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """Initialise a model for images of ``input_shape`` (HWC); keeps only the stored collections."""
    def init(key):
        variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), None, train=False)
        return {k: v for k, v in variables.items() if k in VARIABLE_COLLECTIONS}

    return jax.jit(init)(key)
