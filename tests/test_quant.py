"""Fake quantization against an independent numpy implementation.

The numpy quantizers scale by multiplying with reciprocals, ``round(w * (1 / (absmax * (1/n))))``,
which is how XLA compiles a division by a broadcast scale; the qevo side runs jitted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qevo.quant import quantizers


def np_quantize_weight(w, b, per_channel):
    """The quantizer written out in numpy, float32 throughout."""
    w = w.astype(np.float32)
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    if b >= 32:
        return w
    if b == 1:
        return np.sign(w) * np.mean(np.abs(w), axis=axes, keepdims=True, dtype=np.float32)
    n = np.float32(2 ** (b - 1) - 1)
    scale = np.max(np.abs(w), axis=axes, keepdims=True) * (np.float32(1) / n)
    return (np.clip(np.round(w * (np.float32(1) / scale)), -n, n) * scale).astype(np.float32)


def np_quantize_weight_mse(w, b, per_channel):
    """The "mse" quantizer in numpy: every clip ratio's error in float64, the least kept."""
    w = w.astype(np.float32)
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    n = np.float32(2 ** (b - 1) - 1)
    absmax = np.max(np.abs(w), axis=axes, keepdims=True)
    candidates = [(absmax * (np.float32(1) / n)) * np.float32(r) for r in np.linspace(1.0, 0.2, 17)]
    quantized = [np.clip(np.round(w * (np.float32(1) / s)), -n, n) * s for s in candidates]
    errors = np.stack([np.sum((q.astype(np.float64) - w) ** 2, axis=axes, keepdims=True) for q in quantized])
    best = np.argmin(errors, axis=0)
    return np.choose(np.broadcast_to(best, w.shape), quantized).astype(np.float32), best


def np_quantize_activation(x, b, clip, signed):
    x = x.astype(np.float32)
    clip = np.float32(clip)
    if b >= 32:
        return x
    xc = np.clip(x, -clip if signed else np.float32(0), clip)
    if signed and b == 1:
        return np.sign(xc) * clip
    n = np.float32(2 ** (b - 1) - 1 if signed else 2**b - 1)
    step = clip * (np.float32(1) / n)
    return (np.round(xc * (np.float32(1) / step)) * step).astype(np.float32)


SHAPES = [(3, 3, 8, 16), (120, 84)]
_weight = jax.jit(quantizers.quantize_weight, static_argnames=("per_channel", "mode"))
_activation = jax.jit(quantizers.quantize_activation, static_argnames=("signed", "mode"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16, 32])
def test_weight_matches_numpy(shape, per_channel, bits):
    w = np.random.default_rng(bits).standard_normal(shape).astype(np.float32) * 0.1
    got = np.asarray(_weight(jnp.asarray(w), jnp.int32(bits), per_channel=per_channel))
    want = np_quantize_weight(w, bits, per_channel)
    if bits == 1:  # a mean: summation order may differ by one ulp
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)
    if 1 < bits < 32:
        scale = np.max(np.abs(w), axis=tuple(range(w.ndim - 1)) if per_channel else None, keepdims=True)
        levels = np.round(got / scale * (2 ** (bits - 1) - 1))
        assert len(np.unique(levels)) <= 2 ** bits - 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_weight_matches_numpy_and_beats_absmax(shape, per_channel, bits):
    w = np.random.default_rng(bits).standard_normal(shape).astype(np.float32) * 0.1
    got = np.asarray(_weight(jnp.asarray(w), jnp.int32(bits), per_channel=per_channel, mode="mse"))
    want, best = np_quantize_weight_mse(w, bits, per_channel)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    absmax = np_quantize_weight(w, bits, per_channel)
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    assert np.all(np.sum((got - w) ** 2, axis=axes) <= np.sum((absmax - w) ** 2, axis=axes))
    if bits <= 3:  # Gaussian weights: the absmax scale is never the best at 2 or 3 bits
        assert np.all(best > 0)


def test_mse_keeps_1_and_32_bits():
    w = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    for bits in (1, 32):
        np.testing.assert_array_equal(_weight(jnp.asarray(w), jnp.int32(bits), mode="mse"),
                                      _weight(jnp.asarray(w), jnp.int32(bits)))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 32])
def test_activation_matches_numpy(signed, bits):
    x = np.random.default_rng(bits).standard_normal((64, 7, 7, 4)).astype(np.float32) * 2
    got = np.asarray(_activation(jnp.asarray(x), jnp.int32(bits), jnp.float32(1.7), signed=signed))
    np.testing.assert_array_equal(got, np_quantize_activation(x, bits, 1.7, signed))


def test_vmapped_population_equals_loop():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 8)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((16, 8)).astype(np.float32))
    bits = jnp.asarray(rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 16, 32], size=(64, 2)).astype(np.int32))

    def both(b):
        return quantizers.quantize_weight(w, b[0]), quantizers.quantize_activation(x, b[1], jnp.float32(2.0))

    qw, qx = jax.jit(jax.vmap(both))(bits)
    single = jax.jit(both)
    for i in range(bits.shape[0]):
        lw, lx = single(bits[i])
        np.testing.assert_array_equal(qw[i], lw)
        np.testing.assert_array_equal(qx[i], lx)


def test_straight_through_gradients():
    w = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    g = jax.grad(lambda w: jnp.sum(quantizers.quantize_weight(w, jnp.int32(2)) * 3.0))(w)
    np.testing.assert_array_equal(g, jnp.full_like(w, 3.0))
    x = jnp.array([-1.0, 0.5, 2.0, 3.0])
    loss = lambda x, c: jnp.sum(quantizers.quantize_activation(x, jnp.int32(4), c))  # noqa: E731
    gx, gclip = jax.grad(loss, argnums=(0, 1))(x, 1.5)
    np.testing.assert_array_equal(gx, [0.0, 1.0, 0.0, 0.0])  # zero outside [0, clip]
    assert gclip == 2.0  # PACT: one per clipped element


def test_dorefa_matches_formula():
    w = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    t = np.tanh(w) / np.max(np.abs(np.tanh(w)))
    want = 2 * np.round((t + 1) / 2 * 15) / 15 - 1
    got = quantizers.quantize_weight(jnp.asarray(w), jnp.int32(4), mode="dorefa")
    np.testing.assert_allclose(got, want, atol=1e-6)
    x = jnp.array([-0.5, 0.2, 0.7, 1.5])
    got_a = quantizers.quantize_activation(x, jnp.int32(2), jnp.float32(9.0), mode="dorefa")
    np.testing.assert_allclose(got_a, [0.0, 1 / 3, 2 / 3, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    "w_bits, a_bits, match",
    [
        ([8, 0, 8], [8, 8, 8], r"impossible bit widths \[0\]"),
        ([8, 33, 8], [8, 8, 8], r"impossible bit widths \[33\]"),
        ([8, 8], [8, 8], r"shape \(2,\); expected \[3\]"),
        ([8, 4.5, 8], [8, 8, 8], "non-integer"),
        ([[8, 8, 8]], [8, 8, 8], "differs"),
    ],
)
def test_validate_bits_rejects(w_bits, a_bits, match):
    with pytest.raises(ValueError, match=match):
        quantizers.validate_bits(w_bits, a_bits, 3)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantizers.quantize_weight(jnp.ones((2, 2)), jnp.int32(4), mode="log")
