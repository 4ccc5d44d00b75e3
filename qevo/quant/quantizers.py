"""Fake quantization with traced bit widths.

Bit widths are JAX integer arrays, not Python ints, so one compiled function serves every
bit configuration and ``jax.vmap`` runs a whole population of configurations at once.
A width of 32 (``FLOAT_BITS``) means "not quantized". Gradients pass straight through
the rounding (STE); the activation clip range receives the PACT gradient.

Three modes:

* ``"absmax"`` (default): weights symmetric with levels ``-(2^(b-1)-1) .. 2^(b-1)-1`` times
  a per-output-channel (or per-tensor) absmax scale; ``b = 1`` is ``sign(w) * mean|w|``.
  Activations unsigned in ``0 .. 2^b-1`` over ``[0, clip]`` (or signed symmetric over
  ``[-clip, clip]`` for layers whose input can be negative).
* ``"mse"``: as ``"absmax"``, but each channel's weight scale is clipped to the ratio of
  :data:`MSE_CLIP_RATIOS` (of the absmax) that minimises the squared quantization error of
  that channel; at 2 and 3 bits the absmax scale rounds most weights to zero. Activations
  as ``"absmax"``.
* ``"dorefa"``: the QuantEA reference: weights ``tanh``-normalised to ``[-1, 1]`` then
  quantized uniformly on ``2^b - 1`` steps; activations clipped to ``[0, 1]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qevo.config import QUANT_MODES as MODES
from qevo.errors import ConfigError

FLOAT_BITS = 32
MSE_CLIP_RATIOS = np.round(np.linspace(1.0, 0.2, 17), 6).astype(np.float32)  # of the absmax, searched by "mse"


def _ste(x: jax.Array, q: jax.Array) -> jax.Array:
    """Exactly ``q`` in the forward pass, identity gradient to ``x`` in the backward pass."""
    return jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))


def _max_level(bits: jax.Array, signed: bool) -> jax.Array:
    """Largest integer level as float32 (exact): ``2^(b-1)-1`` signed, ``2^b-1`` unsigned.

    Widths above 24 saturate (float32 cannot hold more levels); 32 is handled as float.
    """
    shift = jnp.clip(bits - 1 if signed else bits, 0, 24)
    return (jnp.left_shift(jnp.int32(1), shift) - 1).astype(jnp.float32)


def _reciprocal(scale: jax.Array) -> jax.Array:
    """``1/scale`` (0 where ``scale`` is 0, so an all-zero channel stays zero).

    Scales are applied as multiplications by reciprocals, the form XLA compiles divisions
    by a broadcast value into anyway, so eager, jitted and numpy results agree bit for bit.
    """
    return jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)


def _channel_axes(x: jax.Array, per_channel: bool) -> tuple[int, ...]:
    """Axes reduced for the scale: all but the last (output channel) axis, or all."""
    return tuple(range(x.ndim - 1)) if per_channel else tuple(range(x.ndim))


def mse_scale(w: jax.Array, absmax: jax.Array, n: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """The weight scale of the ``"mse"`` mode: ``ratio * absmax / n`` with ``ratio`` in
    :data:`MSE_CLIP_RATIOS` (the first of equal errors) giving the least squared error
    ``sum((Q(w) - w)^2)`` over ``axes`` (``absmax`` and the result keep those axes as 1).

    One ratio at a time (``lax.scan``), so memory stays at one copy of ``w``."""
    base = absmax * (1.0 / jnp.maximum(n, 1.0))

    def step(best, ratio):
        scale = base * ratio
        err = jnp.sum(jnp.square(jnp.clip(jnp.round(w * _reciprocal(scale)), -n, n) * scale - w),
                      axis=axes, keepdims=True)
        better = err < best[0]
        return (jnp.where(better, err, best[0]), jnp.where(better, scale, best[1])), None

    start = (jnp.full_like(base, jnp.inf), base)
    return jax.lax.scan(step, start, jnp.asarray(MSE_CLIP_RATIOS, w.dtype))[0][1]


def quantize_weight(
    w: jax.Array, bits: jax.Array, *, per_channel: bool = True, mode: str = "absmax"
) -> jax.Array:
    """Fake-quantize a weight tensor.

    Args:
      w: float weights, output channels on the last axis (``HWIO`` conv, ``[in, out]`` dense).
      bits: int scalar array in 1..32; 32 returns ``w`` unchanged.
      per_channel: one scale per output channel (else one per tensor).
      mode: one of :data:`MODES`.

    Returns:
      Array shaped like ``w``: quantized values forward, identity gradient backward.
    """
    bits = jnp.asarray(bits, jnp.int32)
    if mode == "dorefa":
        t = jnp.tanh(w)
        t = t / jnp.maximum(jnp.max(jnp.abs(t)), 1e-12)
        n = _max_level(bits, signed=False)
        q = 2.0 * (jnp.round((t + 1.0) * 0.5 * n) / n) - 1.0
        return _ste(w, jnp.where(bits >= FLOAT_BITS, w, q))
    if mode not in ("absmax", "mse"):
        raise ConfigError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    axes = _channel_axes(w, per_channel)
    absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    n = _max_level(bits, signed=True)
    scale = mse_scale(w, absmax, n, axes) if mode == "mse" else absmax * (1.0 / jnp.maximum(n, 1.0))
    q = jnp.clip(jnp.round(w * _reciprocal(scale)), -n, n) * scale
    binary = jnp.sign(w) * jnp.mean(jnp.abs(w), axis=axes, keepdims=True)
    out = jnp.where(bits >= FLOAT_BITS, w, jnp.where(bits == 1, binary, q))
    return _ste(w, out)


def quantize_activation(
    x: jax.Array,
    bits: jax.Array,
    clip: jax.Array,
    *,
    signed: bool = False,
    mode: str = "absmax",
) -> jax.Array:
    """Fake-quantize activations over a calibrated (or learned, PACT) clip range.

    Args:
      x: float activations, any shape.
      bits: int scalar array in 1..32; 32 returns ``x`` unchanged.
      clip: float scalar, the top of the range (ignored in ``"dorefa"`` mode, which uses 1).
      signed: symmetric levels over ``[-clip, clip]`` for inputs that can be negative;
        a signed 1-bit activation is ``sign(x) * clip``.
      mode: one of :data:`MODES` (``"mse"`` quantizes activations as ``"absmax"``).

    Returns:
      Array shaped like ``x``; gradient is the STE inside the range and flows to ``clip``.
    """
    bits = jnp.asarray(bits, jnp.int32)
    if mode == "dorefa":
        clip, signed = jnp.ones((), x.dtype), False
    elif mode not in ("absmax", "mse"):
        raise ConfigError(f"unknown quantization mode {mode!r}; use one of {MODES}")
    lo = -clip if signed else jnp.zeros_like(clip)
    xc = jnp.clip(x, lo, clip)
    n = _max_level(bits, signed)
    step = clip * (1.0 / jnp.maximum(n, 1.0))
    q = jnp.round(xc * _reciprocal(step)) * step
    if signed:
        q = jnp.where(bits == 1, jnp.sign(xc) * clip, q)
    return jnp.where(bits >= FLOAT_BITS, x, _ste(xc, q))


def validate_bits(w_bits, a_bits, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Check a bit configuration (or a population of them) given as concrete arrays.

    Args:
      w_bits (array-like): integer widths ``[L]`` or ``[P, L]``.
      a_bits (array-like): integer widths of the same shape.
      n_layers: the model's number of quantizable layers ``L``.

    Returns:
      Both as int32 numpy arrays of the same shape.

    Raises:
      ValueError: wrong shape, non-integer values, or widths outside 1..32.
    """
    out = []
    for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
        arr = np.asarray(bits)
        if arr.ndim not in (1, 2) or arr.shape[-1] != n_layers:
            raise ConfigError(
                f"{name} has shape {arr.shape}; expected [{n_layers}] or [population, {n_layers}]"
                f" (one width per quantizable layer of the model)"
            )
        if not np.issubdtype(arr.dtype, np.integer) and (
            not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))
        ):
            raise ConfigError(f"{name} holds non-integer widths {arr.ravel()[:8]}; use whole numbers of bits")
        bad = arr[(arr < 1) | (arr > FLOAT_BITS)]
        if bad.size:
            raise ConfigError(
                f"{name} holds impossible bit widths {sorted(set(bad.astype(int).tolist()))};"
                f" each width must be in 1..{FLOAT_BITS} (32 = float, not quantized)"
            )
        out.append(arr.astype(np.int32))
    if out[0].shape != out[1].shape:
        raise ConfigError(f"w_bits shape {out[0].shape} differs from a_bits shape {out[1].shape}")
    return out[0], out[1]
