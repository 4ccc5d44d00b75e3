"""Layer building blocks against XLA's own convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qevo.quant import onednn
from qevo.quant.layers import conv2d, dense_conv2d, patch_conv2d, shifted_conv2d, toeplitz_conv2d


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("channels, features, groups", [(1, 6, 1), (8, 8, 8)])
def test_shifted_conv_equals_xla(padding, strides, channels, features, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 15, 15, channels)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((5, 5, 1, features)).astype(np.float32))
    want = jax.lax.conv_general_dilated(
        x, k, (strides, strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )
    np.testing.assert_allclose(shifted_conv2d(x, k, strides, padding), want, rtol=1e-5, atol=1e-5)


def test_shifted_conv_gradients_equal_xla():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 4)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 4)).astype(np.float32))
    xla = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
    )
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
    got = jax.grad(loss(lambda x, k: shifted_conv2d(x, k, 2, "SAME")), argnums=(0, 1))(x, k)
    want = jax.grad(loss(xla), argnums=(0, 1))(x, k)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("kernel, channels", [(5, 1), (3, 6), (1, 16)])
@pytest.mark.parametrize("conv", [patch_conv2d, dense_conv2d])
def test_dense_convs_and_gradients_equal_xla(padding, strides, kernel, channels, conv):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 11, 11, channels)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((kernel, kernel, channels, 7)).astype(np.float32))
    xla = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (strides, strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    mine = lambda x, k: conv(x, k, strides, padding)  # noqa: E731
    np.testing.assert_allclose(mine(x, k), xla(x, k), rtol=1e-5, atol=1e-4)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
    got = jax.grad(loss(mine), argnums=(0, 1))(x, k)
    want = jax.grad(loss(xla), argnums=(0, 1))(x, k)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("kernel, channels", [(5, 1), (3, 3), (1, 2)])
def test_toeplitz_conv_and_gradients_equal_xla(padding, kernel, channels):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 12, 10, channels)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((kernel, kernel, channels, 6)).astype(np.float32))
    xla = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    mine = lambda x, k: toeplitz_conv2d(x, k, padding)  # noqa: E731
    np.testing.assert_allclose(mine(x, k), xla(x, k), rtol=1e-5, atol=1e-4)
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
    for g, w in zip(jax.grad(loss(mine), argnums=(0, 1))(x, k), jax.grad(loss(xla), argnums=(0, 1))(x, k), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, kernel, strides, groups", [
    ((2, 28, 28, 1), (5, 5, 1, 6), 1, 1),     # row products (LeNet-5's first layer)
    ((2, 28, 28, 1), (5, 5, 1, 6), 2, 1),     # strided: im2col gradients
    ((2, 70, 70, 1), (3, 3, 1, 4), 1, 1),     # too wide for row products
    ((2, 9, 9, 4), (3, 3, 1, 4), 1, 4),       # depthwise
])
def test_conv2d_equals_xla_on_every_path_without_onednn(shape, kernel, strides, groups, monkeypatch):
    """The CPU paths qevo takes where oneDNN is not available."""
    monkeypatch.setattr(onednn, "available", lambda: False)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    k = jnp.asarray(rng.standard_normal(kernel).astype(np.float32))
    want = jax.lax.conv_general_dilated(x, k, (strides, strides), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)
    np.testing.assert_allclose(jax.jit(conv2d, static_argnums=(2, 3, 4, 5))(x, k, strides, "SAME", groups, "cpu"),
                               want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_equals_flax(train):
    """Outputs, running statistics and gradients (through a ReLU, as the models use it) of
    :class:`qevo.quant.layers.BatchNorm` against ``flax.linen.BatchNorm`` on the same variables."""
    import flax.linen as nn

    from qevo.quant.layers import BatchNorm

    rng = np.random.default_rng(5)
    x = jnp.asarray(3 + 2 * rng.standard_normal((4, 6, 5, 7)).astype(np.float32))
    ours = BatchNorm(use_running_average=not train)
    flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, 7), jnp.float32),
                            "bias": jnp.asarray(rng.standard_normal(7), jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(rng.standard_normal(7), jnp.float32),
                                 "var": jnp.asarray(rng.uniform(0.5, 2, 7), jnp.float32)}}
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)

    def loss(module):
        def f(params, x):
            y, stats = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(nn.relu(y))), stats
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    (got, got_stats), got_grads = loss(ours)(variables["params"], x)
    (want, want_stats), want_grads = loss(flax_bn)(variables["params"], x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves((got_stats, got_grads)), jax.tree.leaves((want_stats, want_grads)), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
