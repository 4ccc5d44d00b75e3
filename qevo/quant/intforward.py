"""Integer forward pass of a qevo model: int8 weights and activations, int32 accumulation.

A quantized layer's kernel is held as integer levels ``q`` (int8, the kernel's shape) and one
float32 scale per output channel, so its weight is ``q * scale`` (:class:`IntKernel`).
:func:`weight_levels` gives the round-to-nearest levels whose product is exactly
:func:`qevo.quant.quantizers.quantize_weight`'s fake quantization (``"absmax"`` or ``"mse"`` scales).

:func:`apply` runs ``model`` with every layer of ``kernels`` replaced by its integer
version: the layer's input is quantized to its activation levels (the same rounding as
:func:`qevo.quant.quantizers.quantize_activation`), held as int8, multiplied with the int8 kernel by
``jax.lax.dot_general(..., preferred_element_type=int32)``, and the int32 accumulator is
rescaled per output channel. Unsigned levels ``0..2^b-1`` (after a ReLU) are stored shifted
by ``-2^(b-1)`` so that 8-bit activations fit int8; the shift is undone exactly in int32 by
adding ``2^(b-1)`` times the kernel's input sums. Convolutions run as strided-slice patches
times the kernel (depthwise ones as int32 shifted sums), on every backend.

Float arithmetic is left only where integer hardware keeps it too:

* the rescale of each integer layer's int32 output by ``activation step * scale`` (one
  float32 per output channel) and the float bias;
* what the model does between quantized layers on those rescaled values: ReLU and max
  pooling (exact on integers), BatchNorm (a per-channel affine that folds into the rescale),
  residual additions and global average pooling;
* the layers the bit configuration keeps in float (width 32; the first and last by default).

The result equals the fake-quant forward (``model.apply(variables, x, bits)`` with the
kernels ``q * scale``) up to the float rounding of sums: the integer sums are exact.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from jax.typing import ArrayLike

from qevo.errors import ConfigError
from qevo.quant import quantizers
from qevo.quant.interception import NORMALIZATION, Call
from qevo.quant.layers import Bits, conv_windows

MAX_WEIGHT_BITS = 8  # of the integer forward pass (int8 operands)
MAX_LEVEL_BITS = 16  # of :func:`weight_levels` (int16 levels above 8 bits, for the ONNX export)
MIN_ACTIVATION_BITS = 2
WEIGHT_MODES = ("absmax", "mse")


@struct.dataclass
class IntKernel:
    """One integer layer: ``q`` int8 levels (int16 for widths above 8 bits) shaped like the
    float kernel (``HWIO`` or ``[in, out]``) and ``scale`` float32 ``[O]``; the weight is
    ``q * scale``."""

    q: jax.Array | np.ndarray
    scale: jax.Array | np.ndarray


def max_level(bits: int) -> int:
    """Largest symmetric weight level of a ``bits``-wide width: ``2^(bits-1) - 1``."""
    return (1 << (bits - 1)) - 1


def weight_levels(kernel: jax.Array, bits: int, per_channel: bool = True, mode: str = "absmax") -> IntKernel:
    """Round-to-nearest integer levels of a float kernel.

    Args:
      kernel: float32 kernel, output channels on the last axis.
      bits: weight width in 2..16 (levels ``-(2^(b-1)-1) .. 2^(b-1)-1``, int8 up to 8 bits,
        else int16; the integer forward pass takes 2..8).
      per_channel: one scale per output channel (else one per tensor, repeated per channel).
      mode: ``"absmax"`` (scale ``absmax / (2^(b-1)-1)``) or ``"mse"`` (that scale clipped
        to the ratio of :data:`qevo.quant.quantizers.MSE_CLIP_RATIOS` with the least squared error).

    Returns:
      :class:`IntKernel` with ``q * scale == quantize_weight(kernel, bits, per_channel=..., mode=...)``
      exactly (an all-zero channel gets scale 0 and levels 0).
    """
    if not 2 <= bits <= MAX_LEVEL_BITS:
        raise ConfigError(f"integer weights need a width in 2..{MAX_LEVEL_BITS}, got {bits}")
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"integer weights need a symmetric quantizer, one of {WEIGHT_MODES}; got {mode!r}")
    axes = tuple(range(kernel.ndim - 1)) if per_channel else tuple(range(kernel.ndim))
    absmax = jnp.max(jnp.abs(kernel), axis=axes, keepdims=True)
    n = jnp.float32(max_level(bits))
    # The very scale search of quantize_weight, so that q * scale is its output bit for bit.
    scale = quantizers.mse_scale(kernel, absmax, n, axes) if mode == "mse" else absmax * (1.0 / jnp.maximum(n, 1.0))
    inverse = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
    q = jnp.clip(jnp.round(kernel * inverse), -n, n).astype(jnp.int8 if bits <= MAX_WEIGHT_BITS else jnp.int16)
    return IntKernel(q=q, scale=jnp.broadcast_to(scale, (1,) * (kernel.ndim - 1) + kernel.shape[-1:]).reshape(-1))


def dequantize(k: IntKernel) -> jax.Array:
    """The float kernel ``q * scale`` (float32, the kernel's shape)."""
    return jnp.asarray(k.q, jnp.float32) * k.scale


def quantized_layers(model) -> dict[str, int]:
    """``{module path: layer index}`` of every quantizable layer of a qevo model, in call order.

    The path names the layer's parameters (``params[path...]["kernel"]``) as ``"a/b"``; a
    layer's shared modules (a ResNet shortcut convolution) have their own paths and the
    index of the layer they share widths with.
    """
    index = {path: i for i, layer in enumerate(model.layers) for path in layer.paths}
    return {path: index[path] for path in model.paths}


def integer_kernels(variables: dict, layers: dict[str, int], w_bits, per_channel: bool = True,
                    mode: str = "absmax") -> dict[str, IntKernel]:
    """Round-to-nearest :class:`IntKernel` of every layer whose width ``w_bits[index] < 32``.

    Args:
      variables: the model's float variables.
      layers: :func:`quantized_layers`.
      w_bits (array-like): concrete int widths ``[L]``.
      per_channel: per-output-channel scales.
      mode: the weight scale, ``"absmax"`` or ``"mse"`` (:func:`weight_levels`).
    """
    flat: dict = traverse_util.flatten_dict(variables["params"], sep="/")
    w_bits = np.asarray(w_bits)
    return {path: weight_levels(flat[f"{path}/kernel"], int(w_bits[i]), per_channel, mode)
            for path, i in layers.items() if w_bits[i] < 32}


def activation_levels(x: jax.Array, bits: jax.Array, clip: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
    """Integer levels of activations, as :func:`qevo.quant.quantizers.quantize_activation` rounds them.

    Args:
      x: float activations.
      bits: int scalar width in 2..8 (traced).
      clip: float32 scalar, the top of the range.
      signed: levels ``-(2^(b-1)-1) .. 2^(b-1)-1`` over ``[-clip, clip]`` (else ``0 .. 2^b-1``
        over ``[0, clip]``).

    Returns:
      ``(levels, step)``: int32 levels shaped like ``x`` and the float32 step, with
      ``levels * step`` equal to the fake-quantized activations.
    """
    lo = -clip if signed else jnp.zeros_like(clip)
    step, inverse = activation_step(bits, clip, signed)
    return jnp.round(jnp.clip(x, lo, clip) * inverse).astype(jnp.int32), step


def activation_step(bits: ArrayLike, clip: ArrayLike, signed: bool) -> tuple[jax.Array, jax.Array]:
    """``(step, inverse)`` of :func:`activation_levels`: float32 scalars, the value of one
    level (``clip / (2^(b-1)-1)`` signed, ``clip / (2^b-1)`` unsigned, as
    :func:`qevo.quant.quantizers.quantize_activation` computes it) and the float32 reciprocal the clipped
    activations are multiplied by before rounding (0 where the step is 0)."""
    bits = jnp.asarray(bits, jnp.int32)
    n = (jnp.left_shift(jnp.int32(1), bits - 1 if signed else bits) - 1).astype(jnp.float32)
    step = jnp.asarray(clip) * (1.0 / jnp.maximum(n, 1.0))
    inverse = jnp.where(step > 0, 1.0 / jnp.where(step > 0, step, 1.0), 0.0)
    return step, inverse


def _int8_input(x, bits, clip, signed):
    """int8 operand, its zero-point offset (int32 scalar: the stored value is level - offset) and the step."""
    levels, step = activation_levels(x, bits, clip, signed)
    offset = jnp.where(signed, 0, jnp.left_shift(jnp.int32(1), jnp.asarray(bits, jnp.int32) - 1))
    return (levels - offset).astype(jnp.int8), offset, step


def _int_matmul(x8: jax.Array, q: jax.Array | np.ndarray) -> jax.Array:
    """int8 ``[..., K] @ [K, O]`` accumulated in int32."""
    return jax.lax.dot_general(x8, q, (((x8.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def int_conv(x8: jax.Array, offset: jax.Array, q: jax.Array | np.ndarray, strides: int, padding: str,
             groups: int) -> jax.Array:
    """int32 convolution of stored int8 activations (level - ``offset``) with int8 levels ``q [K, K, C/groups, O]``.

    Padding holds level 0; the offset is added back through the kernel's input sums, so the
    result is the exact integer convolution of the levels.
    """
    k, _, c, o = q.shape
    pad_value = (-offset).astype(jnp.int8)
    windows = conv_windows(x8, k, strides, padding, pad_value)
    if groups == 1:
        acc = _int_matmul(jnp.concatenate(windows, axis=-1), q.reshape(k * k * c, o))
        return acc + offset * jnp.sum(q.astype(jnp.int32), axis=(0, 1, 2))
    if c == 1 and groups == o == x8.shape[-1]:
        taps = q.reshape(k * k, o).astype(jnp.int32)
        acc = sum(w.astype(jnp.int32) * taps[t] for t, w in enumerate(windows))
        return acc + offset * jnp.sum(taps, axis=0)
    raise ConfigError(f"integer convolution supports dense and depthwise kernels, not {groups} groups of {c} channels")


ARITHMETICS = ("integer", "float")


def apply(model, variables: dict, kernels: dict[str, IntKernel], bits: Bits, images: jax.Array,
          arithmetic: str = "integer") -> jax.Array:
    """Logits of ``model`` with the layers of ``kernels`` in integer arithmetic.

    Args:
      model (QuantizedModel | QuantizedNNX): a qevo model (:class:`qevo.quant.interception.QuantizedModel`
        or ``QuantizedNNX``).
      variables: its variables (``params`` for the float layers and biases, ``batch_stats``,
        calibrated ``quant/a_clip``); the kernels of the integer layers are not read.
      kernels: ``{module path: IntKernel}`` (:func:`integer_kernels`, or evolved levels).
      bits: int32 ``[L]`` widths; an integer layer's activation width must be in 2..8.
      images: normalised float32 ``[N, H, W, C]``.
      arithmetic: ``"integer"`` (int8 operands, int32 sums), or ``"float"``: the same network
        in float32, each integer layer's input fake-quantized at its width and multiplied
        with the dequantized kernel ``q * scale`` by the model's own convolution (oneDNN on
        CPUs). Both give the same logits up to the rounding of float sums; ``"float"`` is
        the faster way to score many candidate networks.

    Returns:
      float32 logits ``[N, num_classes]``.

    Raises:
      ConfigError: an unknown ``arithmetic``, or an integer layer that is not a plain 2-D
        convolution or dense layer (:class:`qevo.quant.interception.Call`'s ``plain``).
    """
    if arithmetic not in ARITHMETICS:
        raise ConfigError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    return model.apply(variables, images, bits, train=False, override=integer_layers(kernels, arithmetic))


def integer_layers(kernels: dict[str, IntKernel], arithmetic: str):
    """An ``override`` of a qevo model's ``apply`` that runs the layers of ``kernels`` on their
    integer levels (:func:`apply`); the model adds their biases."""

    def integer(call: Call):
        k = kernels.get(call.path)
        if k is None:
            return None
        assert call.bits is not None and call.a_clip is not None  # integer layers have widths
        a_bits, clip = call.bits.a[call.index], call.a_clip[call.index]
        if arithmetic == "float":
            xq = quantizers.quantize_activation(call.lhs, a_bits, clip, signed=call.signed, mode=call.options.mode)
            return call.compute(xq, dequantize(k))
        if not call.plain:
            raise ConfigError(f"layer {call.path} is no plain 2-D NHWC convolution or [.., in] @ [in, out] dense "
                              "layer; integer arithmetic takes only those (use arithmetic='float')")
        x8, offset, step = _int8_input(call.lhs, a_bits, clip, call.signed)
        if call.kind == "conv":
            acc = int_conv(x8, offset, k.q, call.params["window_strides"][0], call.params["padding"],
                           call.params["feature_group_count"])
        else:
            acc = _int_matmul(x8, k.q) + offset * jnp.sum(k.q.astype(jnp.int32), axis=0)
        return acc.astype(jnp.float32) * (step * k.scale)

    return integer


def batch_statistics(model, variables: dict, kernels: dict[str, IntKernel], bits: Bits,
                     images: jax.Array) -> dict:
    """BatchNorm statistics of the integer network, re-estimated on ``images``.

    One forward pass in training mode (float arithmetic, as :func:`apply` with
    ``arithmetic="float"``) with every normalization layer's momentum at 0: each BatchNorm
    normalises with the mean and (biased) variance of its input over ``images`` and keeps
    them as its statistics. Integer levels shift each channel's output distribution away
    from the float model's; this moves the normalisation (the per-channel scale and offset
    after each convolution) with them. No derivative is taken. (Flax Linen networks; an NNX
    network's BatchNorms keep their momentum.)

    Args:
      model (QuantizedModel | QuantizedNNX): as :func:`apply`.
      variables: as :func:`apply`.
      kernels: as :func:`apply`.
      bits: as :func:`apply`.
      images: normalised float32 ``[N, H, W, C]`` (a large batch: 1,024 images or more).

    Returns:
      the ``batch_stats`` collection (``variables["batch_stats"]``'s structure).
    """

    def no_momentum(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, NORMALIZATION) \
                or not hasattr(module, "momentum"):
            return next_fun(*args, **kwargs)
        momentum = module.momentum
        object.__setattr__(module, "momentum", 0.0)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "momentum", momentum)

    with nn.intercept_methods(no_momentum):
        _, updates = model.apply(variables, images, bits, train=True, mutable=["batch_stats"],
                                 override=integer_layers(kernels, "float"))
    return updates["batch_stats"]
