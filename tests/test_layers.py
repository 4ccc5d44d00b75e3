"""Layer building blocks against XLA's own convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qevo.layers import dense_conv2d, patch_conv2d, shifted_conv2d


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
    for g, w in zip(got, want):
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
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
