"""qevo's own networks by name, quantized through the same path as any user's network.

:func:`get_model` builds a network of :mod:`qevo.models.networks` and quantizes it with
:func:`qevo.quant.interception.quantize`, so the result is a :class:`~qevo.quant.interception.QuantizedModel`
like a user's: ``model.apply(variables, images, bits, train=...)`` with ``images`` float
``[N, H, W, C]`` (normalised) and ``bits`` a :class:`qevo.quant.layers.Bits` (int32 ``[L]``
widths, or ``None`` for the float network) returns logits ``[N, num_classes]``. Variables
hold ``params``, ``batch_stats`` (ResNet, MobileNetV2) and ``quant`` (``a_clip``: float32
``[L]``, the activation clip range of each layer).

``num_layers`` is ``L``; ``layer_names`` names each entry; layer 0 is the first
convolution and layer ``L-1`` the classifier, which stay float by default. A CIFAR ResNet's
projection shortcut takes the widths of its block's first convolution.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp

from qevo.errors import ConfigError
from qevo.models import networks
from qevo.quant.interception import QuantizedModel, quantize
from qevo.quant.layers import QuantOptions, default_conv

INPUT_SHAPES = {"lenet5": (28, 28, 1), "resnet": (32, 32, 3), "mobilenetv2": (224, 224, 3)}


def _resnet(depth: int):
    def build(num_classes: int, **kwargs):
        return (networks.CifarResNet(depth=depth, num_classes=num_classes, **kwargs),
                networks.resnet_layer_names(depth))
    return build


MODELS = {
    "lenet5": lambda nc, **kw: (networks.LeNet5(num_classes=nc, **kw), networks.LeNet5.LAYER_NAMES),
    "resnet20": _resnet(20),
    "resnet32": _resnet(32),
    "resnet56": _resnet(56),
    "mobilenetv2": lambda nc, **kw: (networks.MobileNetV2(num_classes=nc, **kw), networks.mobilenet_layer_names()),
}

_RESNET = re.compile(r"^resnet(\d+)$")
_SHORTCUT = re.compile(r"^(.*_BasicBlock_\d+)/QConv_2$")


def resnet_shortcut(path: str) -> str | None:
    """The layer a CIFAR ResNet's projection shortcut (``_BasicBlock_<b>/QConv_2``) shares
    its widths with: its block's first convolution (``_BasicBlock_<b>/QConv_0``)."""
    match = _SHORTCUT.match(path)
    return f"{match.group(1)}/QConv_0" if match else None


@functools.lru_cache(maxsize=32)
def get_model(name: str, num_classes: int, options: QuantOptions | None = None,
              input_shape: tuple[int, ...] | None = None, **kwargs) -> QuantizedModel:
    """A network by name (``lenet5``, ``resnet20/32/56`` or any ``resnet<6n+2>``, ``mobilenetv2``), quantized.

    Args:
      name: the network.
      num_classes: output classes.
      options: quantizer settings; None: the defaults, with the convolution kernels of the
        default devices (:func:`qevo.quant.layers.default_conv`).
      input_shape: ``(H, W, C)`` of the images the layers are found on (their MACs);
        default :data:`INPUT_SHAPES`.
      **kwargs (Any): the network's own settings (``activation`` of LeNet-5, ``dropout`` of MobileNetV2).

    Models are immutable: a call with the same arguments returns the same model, found once.
    """
    resnet = _RESNET.match(name)
    if name not in MODELS and not resnet:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)} (or resnet<6n+2>)")
    if options is None:
        options = QuantOptions(conv=default_conv(jax.devices()[0].platform))
    build = _resnet(int(resnet.group(1))) if resnet else MODELS[name]
    module, names = build(num_classes, **kwargs)
    shape = input_shape or INPUT_SHAPES["resnet" if resnet else name]
    sample = jax.random.normal(jax.random.key(0), (2, *shape), jnp.float32)
    share = resnet_shortcut if resnet else None
    return quantize(module, sample, options=options, share=share, names=names)


VARIABLE_COLLECTIONS = ("params", "batch_stats", "quant")


def init_variables(model, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """Initialise a qevo model for images of ``input_shape`` (HWC); keeps only the stored collections."""
    def init(key):
        variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), None, train=False)
        return {k: v for k, v in variables.items() if k in VARIABLE_COLLECTIONS}

    return jax.jit(init)(key)
