"""Any Flax Linen network, unchanged, as a qevo model: its layers found and quantized from outside.

:func:`quantize` traces a user's ``flax.linen`` module once and finds its quantizable
layers: every ``nn.Conv`` (grouped and depthwise included), ``nn.Dense`` and
``nn.DenseGeneral`` it calls, in call order. The :class:`QuantizedModel` it returns has
the interface of qevo's own models (``apply(variables, x, bits, train=...)``, ``init``,
``num_layers``, ``layer_names``), so every engine piece that takes a qevo model (the
population evaluator, training, calibration, the cost table) takes it too.

Nothing in the network is rewritten. While qevo calls it, ``flax.linen.intercept_methods``
catches each found layer's ``__call__``: the layer's input is fake-quantized with that
layer's activation width, and the layer's own operation (``lax.conv_general_dilated`` or
``lax.dot_general``, which Flax lets a module take as a field) is swapped for one that
fake-quantizes the kernel with its weight width before calling it. The bit widths are
traced arrays, so a whole population of bit configurations is one compiled program.
A found 2-D convolution runs through qevo's CPU kernels (:func:`qevo.layers.conv2d`) when
its options ask for them and its geometry allows it.

Modules with parameters that are not such layers (``nn.Embed``, ``nn.ConvTranspose``, a
user's own kernel) stay float; normalization layers are float by design.
"""

from __future__ import annotations

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qevo import quant
from qevo.errors import ConfigError
from qevo.layers import Bits, QuantOptions, conv2d

QUANTIZABLE = (nn.Conv, nn.Dense, nn.DenseGeneral)
NORMALIZATION = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
NHWC = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One quantizable layer of a network, as the discovery trace saw it.

    Attributes:
      path: the module's path, ``"/"``-joined (``params[path...]["kernel"]`` is its kernel).
      kind: ``"conv"`` or ``"dense"``.
      kernel_shape: the kernel's shape (``HWIO`` for a 2-D convolution, ``[in, out]`` dense).
      groups: feature groups of a convolution (its input channels when depthwise); 1 for dense.
      macs: multiply-accumulates per example, summed over every call of the module.
      weights: the kernel's element count.
      signed: its input took negative values in the discovery trace (no ReLU before it), so
        activations quantize to symmetric levels.
    """

    path: str
    kind: str
    kernel_shape: tuple[int, ...]
    groups: int
    macs: int
    weights: int
    signed: bool


def _takes(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(type(module).__call__).parameters


def _path(module: nn.Module) -> str:
    return "/".join(module.path)


def _dot_macs(lhs, out, dimension_numbers) -> int:
    (contracting, _), _ = dimension_numbers
    return int(np.prod(out.shape[1:], dtype=np.int64) * np.prod([lhs.shape[d] for d in contracting], dtype=np.int64))


def _conv_macs(rhs, out, dimension_numbers) -> int:
    rhs_spec = jax.lax.conv_dimension_numbers((1,) * rhs.ndim, rhs.shape, dimension_numbers).rhs_spec
    per_output = rhs.size // rhs.shape[rhs_spec[0]]
    return int(np.prod(out.shape[1:], dtype=np.int64) * per_output)


def _nhwc(lhs, rhs, dimension_numbers) -> bool:
    """Whether a 2-D convolution's dimension numbers are NHWC images and HWIO kernels."""
    given = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return given == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)


def _quantized_conv(original, quantize_kernel, options: QuantOptions, record):
    """A ``lax.conv_general_dilated`` whose kernel is fake-quantized first; 2-D NHWC/HWIO
    convolutions without dilation take :func:`qevo.layers.conv2d` (qevo's CPU kernels)."""

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None):
        rhs = quantize_kernel(rhs)
        plain = (lhs.ndim == 4 and _nhwc(lhs, rhs, dimension_numbers) and len(set(window_strides)) == 1
                 and isinstance(padding, str) and padding in ("SAME", "VALID") and batch_group_count == 1
                 and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))))
        if plain and preferred_element_type is None and lhs.dtype == rhs.dtype == jnp.float32:
            out = conv2d(lhs, rhs, window_strides[0], padding, feature_group_count, options.conv)
        else:
            out = original(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                           dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                           batch_group_count=batch_group_count, precision=precision,
                           preferred_element_type=preferred_element_type)
        record("conv", rhs, _conv_macs(rhs, out, dimension_numbers or NHWC), feature_group_count)
        return out

    return conv


def _quantized_dot(original, quantize_kernel, record):
    """A ``lax.dot_general`` whose right operand (the kernel) is fake-quantized first."""

    def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        rhs = quantize_kernel(rhs)
        out = original(lhs, rhs, dimension_numbers, precision=precision,
                       preferred_element_type=preferred_element_type, **kwargs)
        record("dense", rhs, _dot_macs(lhs, out, dimension_numbers), 1)
        return out

    return dot


class _Calls:
    """What one traced call of a network recorded: per found layer's path its inputs and its
    operations ``(kind, kernel shape, MACs per example, groups)``; every called module's type."""

    def __init__(self):
        self.inputs: dict[str, list] = {}
        self.ops: dict[str, list] = {}
        self.modules: dict[str, type] = {}


def _interceptor(index: dict[str, int] | None, bits: Bits | None, a_clip, options: QuantOptions,
                 signed: tuple[bool, ...], calls: _Calls):
    """The ``intercept_methods`` function of one call. ``index`` maps the known layer paths
    to their positions (None: discovery, every quantizable layer is recorded, none quantized)."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        calls.modules.setdefault(_path(module), type(module))
        if context.method_name != "__call__" or not isinstance(module, QUANTIZABLE) or not args:
            return next_fun(*args, **kwargs)
        path = _path(module)
        if index is not None and path not in index:
            return next_fun(*args, **kwargs)
        x = args[0]
        calls.inputs.setdefault(path, []).append(x)
        ops = calls.ops.setdefault(path, [])
        if bits is None:
            quantize_kernel = lambda k: k  # noqa: E731
        else:
            i = index[path]
            x = quant.quantize_activation(x, bits.a[i], a_clip[i], signed=signed[i], mode=options.mode)
            quantize_kernel = lambda k: quant.quantize_weight(  # noqa: E731
                k, bits.w[i], per_channel=options.per_channel, mode=options.mode)
        record = lambda kind, k, macs, groups: ops.append((kind, tuple(k.shape), macs, groups))  # noqa: E731
        is_conv = isinstance(module, nn.Conv)
        field = "conv_general_dilated" if is_conv else "dot_general"
        original = (getattr(module, f"{field}_cls")() if getattr(module, f"{field}_cls") is not None
                    else getattr(module, field) or getattr(jax.lax, field))
        swapped = (_quantized_conv(original, quantize_kernel, options, record) if is_conv
                   else _quantized_dot(original, quantize_kernel, record))
        saved = getattr(module, field), getattr(module, f"{field}_cls")
        object.__setattr__(module, field, swapped)
        object.__setattr__(module, f"{field}_cls", None)
        try:
            return next_fun(x, *args[1:], **kwargs)
        finally:
            object.__setattr__(module, field, saved[0])
            object.__setattr__(module, f"{field}_cls", saved[1])

    return intercept


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
    """A Flax Linen network with qevo's model interface (made by :func:`quantize`).

    ``apply(variables, x, bits, train=False, mutable=False, rngs=None)`` runs the network
    with its found layers fake-quantized to ``bits`` (:class:`qevo.layers.Bits`, int32
    ``[L]`` each; None: float). ``variables`` are the network's own collections plus
    ``quant`` (``{"a_clip": float32 [L]}``, the activation clip ranges,
    :func:`qevo.calibration.calibrate`). Two collections a qevo model reports are computed
    here rather than stored: ``"calibration"`` (the 99.99th percentile of each layer's
    ``|input|``) and ``"layer_stats"`` (``[MACs per example, weights]`` per layer), under
    ``layer_<index>`` keys, when they are listed in ``mutable``.

    Attributes:
      model: the user's module, unchanged.
      layers: the found layers, in call order (:class:`Layer`).
      options: quantizer settings (``per_channel``, ``mode``) and the convolution kernels.
      float_others: the modules with parameters that stay float, ``(path, type name)``.
    """

    model: nn.Module
    layers: tuple[Layer, ...]
    options: QuantOptions = QuantOptions()
    float_others: tuple[tuple[str, str], ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    def clone(self, **updates) -> QuantizedModel:
        """A copy with ``updates`` (``options=...``) replaced."""
        return dataclasses.replace(self, **updates)

    def _call(self, variables: dict, x, bits: Bits | None, train: bool, mutable, rngs, calls: _Calls):
        own = {k: v for k, v in variables.items() if k != "quant"}
        a_clip = variables["quant"]["a_clip"] if bits is not None else None
        index = {layer.path: i for i, layer in enumerate(self.layers)}
        signed = tuple(layer.signed for layer in self.layers)
        kwargs = {"train": train} if _takes(self.model, "train") else {}
        with nn.intercept_methods(_interceptor(index, bits, a_clip, self.options, signed, calls)):
            return self.model.apply(own, x, **kwargs, mutable=mutable, rngs=rngs)

    def apply(self, variables: dict, x, bits: Bits | None = None, train: bool = False, mutable=False,
              rngs=None):
        """Logits (and the updated collections when ``mutable`` lists any), as ``nn.Module.apply``."""
        wanted = [mutable] if isinstance(mutable, str) else list(mutable or [])
        reported = [c for c in wanted if c in ("calibration", "layer_stats")]
        own = [c for c in wanted if c not in reported]
        calls = _Calls()
        out = self._call(variables, x, bits, train, own or False, rngs, calls)
        if not wanted:
            return out
        y, state = out if own else (out, {})
        state = dict(state)
        if "calibration" in reported:
            state["calibration"] = {
                _key(i): tuple(jnp.quantile(jnp.abs(v), CALIBRATION_QUANTILE) for v in calls.inputs[layer.path])
                for i, layer in enumerate(self.layers)}
        if "layer_stats" in reported:
            state["layer_stats"] = {_key(i): jnp.array([layer.macs, layer.weights], jnp.int32)
                                    for i, layer in enumerate(self.layers)}
        return y, state

    def init(self, key: jax.Array, x, bits: Bits | None = None, train: bool = False) -> dict:
        """The network's variables for inputs like ``x``, plus ``quant/a_clip`` (ones, ``[L]``)."""
        params_key, dropout_key = jax.random.split(key)
        kwargs = {"train": train} if _takes(self.model, "train") else {}
        variables = self.model.init({"params": params_key, "dropout": dropout_key}, x, **kwargs)
        return {**variables, "quant": {"a_clip": jnp.ones((self.num_layers,), jnp.float32)}}


CALIBRATION_QUANTILE = 0.9999


def _key(index: int) -> str:
    return f"layer_{index:03d}"


def quantize(model: nn.Module, sample: jax.Array | np.ndarray, variables: dict | None = None,
             options: QuantOptions = QuantOptions(), key: jax.Array | None = None) -> QuantizedModel:
    """Find the quantizable layers of a Linen network by tracing it once on ``sample``.

    Args:
      model: a ``flax.linen`` module called as ``model.apply(variables, x)`` (with
        ``train=`` when its ``__call__`` takes it).
      sample: a few inputs ``[N, ...]`` as the network takes them (normalized); their
        signs decide which layers take signed activations.
      variables: the network's variables; None initializes them from ``key``.
      options: quantizer settings and convolution kernels (:class:`qevo.layers.QuantOptions`).
      key: the initialization key when ``variables`` is None (default ``key(0)``).

    Returns:
      the :class:`QuantizedModel`.

    Raises:
      ConfigError: ``model`` is no Linen module, fails on ``sample``, or has no quantizable layer.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a flax.linen Module (NNX modules are not supported yet), "
                          f"got {type(model).__name__}")
    sample = jnp.asarray(sample)
    kwargs = {"train": False} if _takes(model, "train") else {}
    try:
        if variables is None:
            variables = model.init(jax.random.key(0) if key is None else key, sample, **kwargs)
        calls = _Calls()
        with nn.intercept_methods(_interceptor(None, None, None, options, (), calls)):
            model.apply(variables, sample, **kwargs)
    except ConfigError:
        raise
    except Exception as e:  # the user's network on the user's sample: say which, keep the cause
        raise ConfigError(f"the model failed on a sample of shape {tuple(sample.shape)}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not calls.ops:
        raise ConfigError(f"{type(model).__name__} has no quantizable layer (flax.linen Conv, Dense or "
                          "DenseGeneral); qevo quantizes only those")
    layers = tuple(
        Layer(path=path, kind=ops[0][0], kernel_shape=ops[0][1], groups=ops[0][3],
              macs=sum(op[2] for op in ops), weights=int(np.prod(ops[0][1])),
              signed=any(bool(jnp.any(x < 0)) for x in calls.inputs[path]))
        for path, ops in calls.ops.items())
    owners = {path.rpartition("/")[0] for path in traverse_util.flatten_dict(variables.get("params", {}), sep="/")}
    others = tuple((path, calls.modules[path].__name__ if path in calls.modules else "?")
                   for path in sorted(owners - set(calls.ops))
                   if not (path in calls.modules and issubclass(calls.modules[path], NORMALIZATION)))
    return QuantizedModel(model=model, layers=layers, options=options, float_others=others)
