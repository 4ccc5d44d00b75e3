"""Codebook formats and compression rates of weight sharing (docs/spec.md#compression-rate,
docs/spec.md#codebook-formats).

A shared layer stores, per weight, a key of ``b_key = max(ceil(log2 k), 1)`` bits into a
codebook of ``k`` values of ``b_red`` bits (32, 16 or 8).  The seed's compression rate of
a layer with ``n_w`` float32 weights is

    CR_l = n_w * 32 / (n_w * b_key + k * (b_red + b_key)).

Codebook formats (``quantize_codebook``), each a round trip back to float32:

- ``float32``: unchanged.
- ``float16``: IEEE half precision, round to nearest even.
- ``float8``: e4m3 (``jnp.float8_e4m3fn``: 3 mantissa bits, largest finite value 448).
  Each codebook is first divided by a per-layer float32 scale ``max|c| / 448`` so that its
  largest entry lands on 448: small weights (|w| < 2^-6 = 0.0156 is common in trained
  layers) would otherwise fall into e4m3's subnormal range and lose their precision.
- ``int8``: symmetric per-layer absmax scale ``max|c| / 127``, values rounded (half to
  even) to -127..127.

The per-layer float32 scale of float8 and int8 is *not* counted in the compression rate:
we keep the seed's formula (docs/spec.md#compression-rate) as it is.  Counting it would
lower CR_l by up to 16 % on LeNet-5's conv1 (150 weights, k = 2: 168 bits become 200),
under 0.1 % on fc1 (48000 weights), and a size-weighted LeNet-5 model CR by under 0.3 %.

A codebook whose entries are all 0 stays all 0 in every format.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qevo.errors import ConfigError

CODEBOOK_BITS = {"float32": 32, "float16": 16, "float8": 8, "int8": 8}

_FLOAT8_MAX = 448.0
_INT8_MAX = 127.0


def check_format(fmt: str) -> None:
    """Raise ``ConfigError`` for a codebook format not in :data:`CODEBOOK_BITS`."""
    if fmt not in CODEBOOK_BITS:
        raise ConfigError(f"unknown codebook format {fmt!r}; choose one of {sorted(CODEBOOK_BITS)}")


def quantize_codebook(centroids, fmt: str) -> jax.Array:
    """Round every codebook to the format ``fmt`` and back to float32.

    centroids: float [..., k], one codebook per row (the last axis); entries a layer does
    not use should be 0 so that they do not change its scale.  Returns float32 [..., k].
    Raises ConfigError for an unknown format.
    """
    check_format(fmt)
    c = jnp.asarray(centroids, jnp.float32)
    if fmt == "float32":
        return c
    if fmt == "float16":
        return c.astype(jnp.float16).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(c), axis=-1, keepdims=True)
    if fmt == "float8":
        scale = jnp.where(absmax > 0, absmax / _FLOAT8_MAX, 1.0)
        return (c / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale
    scale = jnp.where(absmax > 0, absmax / _INT8_MAX, 1.0)
    return jnp.clip(jnp.round(c / scale), -_INT8_MAX, _INT8_MAX) * scale


def key_bits(k):
    """b_key = max(ceil(log2 k), 1), exact in integer arithmetic; int array of k's shape."""
    xp = jnp if isinstance(k, jax.Array) else np
    k = xp.asarray(k).astype(xp.int32) - 1
    bits = sum((k >> t) > 0 for t in range(31))
    return xp.maximum(xp.asarray(bits, xp.int32), 1)


def layer_compression_rate(n_w, k, codebook_bits):
    """CR_l = n_w * 32 / (n_w * b_key + k * (b_red + b_key)), elementwise.

    n_w, k: integer arrays (broadcastable); codebook_bits: b_red (32, 16, 8 or an array).
    NumPy inputs give float64 NumPy output and are validated (ValueError unless
    n_w >= 1 and 1 <= k <= n_w); with a JAX array among the inputs (jit-friendly) the
    output is a float32 JAX array and the caller must guarantee those preconditions.
    """
    xp = _validate(n_w, k, codebook_bits)
    n_w, k, b_red = (xp.asarray(a) for a in (n_w, k, codebook_bits))
    b_key = key_bits(k)
    dtype = xp.float32 if xp is jnp else xp.float64
    stored = n_w.astype(dtype) * b_key + k.astype(dtype) * (b_red + b_key)
    return n_w.astype(dtype) * 32 / stored


def model_compression_rates(n_w, k, codebook_bits):
    """Model compression rates of per-layer cluster counts, for a whole population.

    n_w: int [L] weights per layer; k: int [..., L] clusters per layer (leading axes: e.g.
    the population); codebook_bits: b_red.  Returns (mean_cr, weighted_cr), each [...]:
    the seed's plain mean of the layer CRs, and the size-weighted
    sum(n_w * 32) / sum(n_w * b_key + k * (b_red + b_key)) (the headline figure).
    Validation and array type as in ``layer_compression_rate``.
    """
    if np.ndim(n_w) != 1 or np.shape(k)[-1:] != np.shape(n_w):
        raise ValueError(f"model_compression_rates: n_w must be [L] and k [..., L], "
                         f"got {np.shape(n_w)} and {np.shape(k)}")
    xp = _validate(n_w, k, codebook_bits)
    n_w, k, b_red = (xp.asarray(a) for a in (n_w, k, codebook_bits))
    mean_cr = xp.mean(layer_compression_rate(n_w, k, b_red), axis=-1)
    dtype = xp.float32 if xp is jnp else xp.float64
    b_key = key_bits(k)
    stored = n_w.astype(dtype) * b_key + k.astype(dtype) * (b_red + b_key)
    weighted_cr = xp.sum(n_w.astype(dtype)) * 32 / xp.sum(stored, axis=-1)
    return mean_cr, weighted_cr


def _validate(n_w, k, codebook_bits):
    """The array module for the inputs; NumPy inputs are checked (ValueError)."""
    if any(isinstance(a, jax.Array) for a in (n_w, k, codebook_bits)):
        return jnp
    n_w, k, b_red = (np.asarray(a) for a in (n_w, k, codebook_bits))
    for name, a in (("n_w", n_w), ("k", k), ("codebook_bits", b_red)):
        if a.dtype.kind not in "iuf" or not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must hold whole numbers, got {a!r}")
    if np.any(n_w < 1):
        raise ValueError(f"every layer needs n_w >= 1 weights, got n_w={n_w}")
    if np.any(k < 1):
        raise ValueError(f"every layer needs k >= 1 clusters, got k={k}")
    if np.any(k > n_w):
        raise ValueError(f"k may not exceed the layer's weight count: k={k}, n_w={n_w}")
    if np.any(b_red < 1):
        raise ValueError(f"codebook_bits must be >= 1, got {b_red}")
    return np


@dataclasses.dataclass(frozen=True)
class SharedKernel:
    """A weight-shared kernel: ``indices`` (uint8/uint16, the kernel's shape) into
    ``codebook`` (float32 ``[k]``, the decoded values the model computes with)."""

    indices: np.ndarray
    codebook: np.ndarray
