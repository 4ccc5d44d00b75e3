"""What quantized networks compute with: bit widths, quantizer settings, qevo's CPU
convolutions and a BatchNorm with a fast gradient.

A bit configuration (:class:`Bits`) gives each quantizable layer of a network a weight and
an activation width as traced arrays, so a population of configurations is one compiled
program; :mod:`qevo.quant.interception` applies them to any Flax network's layers. Two Flax
collections carry side information out of a quantized model's ``apply``, per layer under
:func:`layer_key`:

* ``"calibration"``: the 99.99th percentile of ``|input|`` (for the clip ranges);
* ``"layer_stats"``: ``[MACs per image, weight count]`` (for the cost model).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qevo.config import CONV_KERNELS, PRECISIONS
from qevo.errors import ConfigError
from qevo.quant import onednn, quantizers

CALIBRATION_QUANTILE = 0.9999


def default_conv(platform: str) -> str:
    """The convolution kernels for devices of ``platform`` (``jax.Device.platform``): qevo's
    CPU kernels on ``"cpu"``, XLA's convolution elsewhere.  :func:`qevo.models.zoo.get_model`
    and :func:`qevo.models.inputs.build_model` choose with it, from the devices a run computes on."""
    return "cpu" if platform == "cpu" else "xla"


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """Static settings shared by every layer of a model.

    Attributes:
      per_channel: per-output-channel weight scales (else per tensor).
      mode: ``"absmax"``, ``"mse"`` or ``"dorefa"`` (see :mod:`qevo.quant.quantizers`).
      conv: the convolution kernels, ``"xla"`` (XLA's convolution, any device) or ``"cpu"``
        (qevo's kernels for CPU devices, see :func:`conv2d`); see :func:`default_conv`.
      batch_axis: the mapped axis (``shard_map``) a training batch is split over, or None;
        every normalization layer with an unset ``axis_name`` (qevo's and Flax's BatchNorm)
        reduces its batch statistics over it (data-parallel training,
        :class:`qevo.train.trainer.Trainer`), so a split batch normalizes as the whole batch would.
      precision: the products of the float network's convolutions (the path without
        bit widths: float training and evaluation; fake-quantized networks are always
        float32): ``"float32"``, or ``"bfloat16"``: operands rounded to bfloat16, products
        summed in float32 (see :func:`conv2d`).
    """

    per_channel: bool = True
    mode: str = "absmax"
    conv: str = "xla"
    batch_axis: str | None = None
    precision: str = "float32"

    def __post_init__(self):
        if self.mode not in quantizers.MODES:
            raise ConfigError(f"unknown quantization mode {self.mode!r}; use one of {quantizers.MODES}")
        if self.conv not in CONV_KERNELS:
            raise ConfigError(f"unknown convolution kernels {self.conv!r}; use one of {CONV_KERNELS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown convolution precision {self.precision!r}; use one of {PRECISIONS}")


@struct.dataclass
class Bits:
    """One bit configuration: ``w`` and ``a`` are int32 ``[L]`` (32 = float), JAX or numpy arrays."""

    w: jax.Array | np.ndarray
    a: jax.Array | np.ndarray


def layer_key(index: int) -> str:
    """The key a layer's sown values take in the ``calibration`` and ``layer_stats`` collections."""
    return f"layer_{index:03d}"


def _xla_conv2d(x, kernel, strides: int, padding: str, groups: int, precision: str = "float32") -> jax.Array:
    bf16 = precision == "bfloat16"
    if bf16:
        x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        preferred_element_type=jnp.float32 if bf16 else None,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shifted_conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: str) -> jax.Array:
    """Convolution as a sum of ``K*K`` shifted, scaled copies of the input.

    For kernels with one input channel per group (depthwise):
    ``x [N, H, W, C]``, ``kernel [K, K, 1, O]`` with ``C == O``.
    On CPUs the forward pass is several times faster than XLA's convolution for these
    shapes; the backward pass is XLA's (faster than differentiating the sum).
    """
    k = kernel.shape[0]
    y = jnp.asarray(0.0)  # weakly typed, as 0.0: the sum keeps the inputs' dtype
    for window, tap in zip(conv_windows(x, k, strides, padding), kernel.reshape(k * k, -1), strict=True):
        y = y + window * tap
    return y


def _shifted_fwd(x, kernel, strides, padding):
    return shifted_conv2d(x, kernel, strides, padding), (x, kernel)


def _shifted_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, k: _xla_conv2d(x, k, strides, padding, x.shape[-1]), x, kernel)
    return vjp(g)


shifted_conv2d.defvjp(_shifted_fwd, _shifted_bwd)


def _pad_same(x: jax.Array, k: int, strides: int, pad_value: int | jax.Array = 0) -> jax.Array:
    """``x [N, H, W, C]`` padded on H and W as a ``"SAME"`` convolution of size ``k`` needs."""
    pads = [onednn.same_padding(x.shape[d], k, strides) for d in (1, 2)]
    return jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=pad_value)


def conv_windows(x: jax.Array, k: int, strides: int, padding: str, pad_value: int | jax.Array = 0) -> list[jax.Array]:
    """The ``k*k`` strided ``[N, H', W', C]`` windows of ``x [N, H, W, C]``, row-major over
    the kernel; ``"SAME"`` padding holds ``pad_value``."""
    if padding == "SAME":
        x = _pad_same(x, k, strides, pad_value)
    out_h = (x.shape[1] - k) // strides + 1
    out_w = (x.shape[2] - k) // strides + 1
    return [
        jax.lax.slice(x, (0, i, j, 0),
                      (x.shape[0], i + (out_h - 1) * strides + 1, j + (out_w - 1) * strides + 1, x.shape[3]),
                      (1, strides, strides, 1))
        for i in range(k) for j in range(k)
    ]


def patch_conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: str) -> jax.Array:
    """Dense convolution as image patches times the reshaped kernel (im2col).

    ``x [N, H, W, C]``, ``kernel [K, K, C, O]`` -> ``[N, H', W', O]``. The patches are
    ``K*K`` strided slices concatenated on the channel axis, so the forward pass and both
    gradients are data movement plus one matrix product. On CPUs XLA's own convolution is
    slow for these small-channel shapes and its gradients far slower (a ResNet-20
    training step took 54 s with XLA's convolution, 3.7 s with patches).
    """
    k, _, c, o = kernel.shape
    if k == 1 and strides == 1:
        return x @ kernel.reshape(c, o)
    patches = jnp.concatenate(list(conv_windows(x, k, strides, padding)), axis=-1)
    return patches @ kernel.reshape(k * k * c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: str) -> jax.Array:
    """Dense convolution with XLA's forward pass and :func:`patch_conv2d`'s gradients.

    ``x [N, H, W, C]``, ``kernel [K, K, C, O]`` -> ``[N, H', W', O]``. On CPUs XLA's
    forward convolution beats im2col (a ResNet-20 forward pass of 1,000 images: 2.0 s
    against 5.2 s), while its gradients are far slower than im2col's; this takes the
    faster of each.
    """
    return _xla_conv2d(x, kernel, strides, padding, 1)


def _dense_fwd(x, kernel, strides, padding):
    return dense_conv2d(x, kernel, strides, padding), (x, kernel)


def _dense_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, k: patch_conv2d(x, k, strides, padding), x, kernel)
    return vjp(g)


dense_conv2d.defvjp(_dense_fwd, _dense_bwd)


# Single-channel inputs at most this wide (padded) convolve as row products on CPU: a 5x5,
# 6-filter layer with ReLU and 2x2 max pooling, 2-core CPU, against XLA's convolution:
# 28x28 (1,000 images) 21 against 73 ms, 60x60 (250) 37 against 92 ms, 92x92 (100) 90
# against 76 ms.
TOEPLITZ_MAX_WIDTH = 64


def toeplitz_conv2d(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """Stride-1 convolution as ``K`` matrix products of image rows with banded (Toeplitz)
    matrices of the kernel.

    ``x [N, H, W, C]``, ``kernel [K, K, C, O]`` -> ``[N, H', W', O]``: kernel row ``i``
    becomes ``T_i [W_pad * C, W' * O]`` with ``T_i[(w + j) C + c, w O + o] = kernel[i, j, c, o]``,
    and ``y[n, h] = sum_i x[n, h + i] @ T_i``. The products do ``W_pad / K`` times the
    convolution's multiply-adds, but for a single input channel and narrow images they
    beat XLA's CPU convolution, whose cost there is per output pixel: LeNet-5's first
    layer (28x28x1 -> 6, 5x5, then ReLU and 2x2 max pooling) took 28 ms against 80 ms for
    1,000 images and 28 against 35 ms for the gradients of 128 (``python -m
    benchmarks.convs``, 2 cores).
    """
    k, _, c, o = kernel.shape
    if padding == "SAME":
        x = _pad_same(x, k, 1)
    n, h_pad, w_pad, _ = x.shape
    h_out, w_out = h_pad - k + 1, w_pad - k + 1
    # shift[j, a, b] = 1 where input column a feeds output column b through kernel column j
    shift = (jnp.arange(w_pad)[None, :, None] == jnp.arange(w_out)[None, None, :] + jnp.arange(k)[:, None, None])
    rows = x.reshape(n, h_pad, w_pad * c)
    y = jnp.asarray(0.0)  # weakly typed, as 0.0: the sum keeps the inputs' dtype
    for i in range(k):
        band = jnp.einsum("jab,jco->acbo", shift.astype(kernel.dtype), kernel[i]).reshape(w_pad * c, w_out * o)
        y = y + rows[:, i:i + h_out] @ band
    return y.reshape(n, h_out, w_out, o)


def conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: str, groups: int,
           kernels: str = "xla", precision: str = "float32") -> jax.Array:
    """NHWC/HWIO convolution. With ``kernels="cpu"``: oneDNN's kernels for float32 where they
    are available (:mod:`qevo.quant.onednn`), else row products for small single-channel inputs,
    im2col gradients for other dense kernels and shifted sums for depthwise ones (see
    :func:`toeplitz_conv2d`, :func:`dense_conv2d`, :func:`shifted_conv2d`); with ``"xla"``
    XLA's convolution.

    ``precision="bfloat16"`` rounds the operands to bfloat16 and sums the products in
    float32: through oneDNN's bf16 arithmetic (AMX or AVX512-BF16 units, where the CPU has
    them), or XLA's convolution of bfloat16 operands (tensor cores on a GPU); the CPU's
    fallback kernels stay float32."""
    if kernels == "cpu":
        if x.dtype == kernel.dtype == jnp.float32 and onednn.available():
            return onednn.conv2d(x, kernel, strides, padding, groups, precision)
        k = kernel.shape[0]
        width = x.shape[2] + (k - 1 if padding == "SAME" else 0)
        if groups == 1 and kernel.shape[2] == 1 and strides == 1 and width <= TOEPLITZ_MAX_WIDTH:
            return toeplitz_conv2d(x, kernel, padding)
        if groups == 1:
            return dense_conv2d(x, kernel, strides, padding)
        if kernel.shape[2] == 1:
            return shifted_conv2d(x, kernel, strides, padding)
    return _xla_conv2d(x, kernel, strides, padding, groups, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch normalization over every axis but the last, with a hand-written
    gradient of two passes (the per-channel sums of ``dy`` and ``dy * x_hat``, then ``dx``).

    ``x [..., C]``, ``scale``/``bias [C]`` -> ``(y [..., C], mean [C], var [C])``; ``var`` is
    the biased batch variance ``E[x^2] - E[x]^2``. ``mean`` and ``var`` feed the running
    statistics only: no gradient flows back through them. Against differentiating
    ``flax.linen.BatchNorm``, the time a ResNet-20 training step (batch 128, 2-core CPU)
    spends outside its convolutions fell from 95 to 82 ms in one ``jax.profiler`` trace each.

    With ``axis_name`` (inside ``shard_map``, equal shards of one batch per device) the
    statistics and the gradient's sums cover the whole batch. The gradient is that of each
    device's own loss on the whole batch: ``dx`` uses the summed sums, while ``scale`` and
    ``bias`` get this device's part, so averaging every gradient over the axis gives the
    gradient of the mean loss, as one device computing the whole batch would.
    """
    return _batch_norm_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_mean(x, axes, axis_name):
    mean = jnp.mean(x, axes)
    return mean if axis_name is None else jax.lax.pmean(mean, axis_name)


def _batch_norm_stats(x, epsilon, axis_name):
    axes = tuple(range(x.ndim - 1))
    mean = _batch_mean(x, axes, axis_name)
    var = jnp.maximum(_batch_mean(jnp.square(x), axes, axis_name) - jnp.square(mean), 0.0)
    return mean, var, jax.lax.rsqrt(var + epsilon)


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
    mean, var, inv = _batch_norm_stats(x, epsilon, axis_name)
    y = (x - mean) * (scale * inv) + bias
    return (y, mean, var), (x, scale, mean, inv)


def _batch_norm_bwd(epsilon, axis_name, residuals, cotangents):
    x, scale, mean, inv = residuals
    dy = cotangents[0]
    axes = tuple(range(x.ndim - 1))
    x_hat = (x - mean) * inv
    d_bias = jnp.sum(dy, axes)
    d_scale = jnp.sum(dy * x_hat, axes)
    count, sum_dy, sum_dy_x_hat = x.size // x.shape[-1], d_bias, d_scale
    if axis_name is not None:
        count = count * jax.lax.psum(1, axis_name)
        sum_dy, sum_dy_x_hat = jax.lax.psum((d_bias, d_scale), axis_name)
    dx = (scale * inv / count) * (count * dy - sum_dy - x_hat * sum_dy_x_hat)
    return dx, d_scale, d_bias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
    """Batch normalization over every axis but the last, with :func:`batch_norm_train`'s
    gradient; the variables of ``flax.linen.BatchNorm`` (``params``: ``scale``, ``bias``;
    ``batch_stats``: ``mean``, ``var``), so models saved with either load in both.

    Attributes:
      use_running_average: normalize with the running statistics (inference).
      momentum: running statistics decay.
      epsilon: added to the variance.
      axis_name: the mapped axis a training batch is split over (see :func:`batch_norm_train`).
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
        if self.use_running_average:
            return (x - ra_mean.value) * (scale * jax.lax.rsqrt(ra_var.value + self.epsilon)) + bias
        # jax.custom_vjp under functools.partial loses batch_norm_train's return type
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name)  # pyright: ignore[reportGeneralTypeIssues]
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jax.lax.stop_gradient(mean)
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jax.lax.stop_gradient(var)
        return y


def collect_per_layer(tree, n_layers: int, reduce) -> list:
    """Gather sown ``layer_<index>`` values from a collection into a list indexed by layer.

    Args:
      tree: the ``"calibration"`` or ``"layer_stats"`` collection of an ``apply``.
      n_layers: ``L``.
      reduce: combines the values sown under one index (a layer and its shortcut).
    """
    found: dict[int, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [getattr(p, "key", None) for p in path]
        index = next(int(n[len("layer_"):]) for n in names if isinstance(n, str) and n.startswith("layer_"))
        found.setdefault(index, []).append(leaf)
    missing = sorted(set(range(n_layers)) - set(found))
    if missing:
        raise ValueError(f"quantizable layers {missing} recorded nothing; the model's layer indices are inconsistent")
    return [reduce(found[i]) for i in range(n_layers)]
