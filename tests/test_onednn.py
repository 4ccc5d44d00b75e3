"""oneDNN's CPU convolutions against XLA's reference convolution and its ``jax.grad``."""

import pathlib
import platform
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qevo import layers, onednn
from qevo.layers import QuantOptions
from qevo.models import get_model, init_variables
from qevo.population import cross_entropy

ONEDNN_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"
pytestmark = pytest.mark.skipif(not ONEDNN_PLATFORM, reason="oneDNN's wheel is installed on x86-64 Linux only")


@pytest.fixture(autouse=True)
def _registered():
    """Register oneDNN's FFI targets (built on first use), whichever test of the file runs first."""
    onednn.available()


def xla_conv(x, k, strides, padding, groups):
    """XLA's reference convolution, exact in float32 (the products of bfloat16-rounded operands too)."""
    return jax.lax.conv_general_dilated(x, k, (strides, strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)


def test_available_on_x86_64_linux():
    assert onednn.status() is None


@pytest.mark.parametrize("shape, kernel, strides, padding, groups", [
    ((3, 32, 32, 3), (3, 3, 3, 16), 1, "SAME", 1),     # ResNet stem
    ((3, 16, 16, 16), (3, 3, 16, 32), 2, "SAME", 1),   # strided, odd padding at the bottom/right
    ((3, 16, 16, 16), (1, 1, 16, 32), 2, "SAME", 1),   # strided 1x1 shortcut
    ((3, 15, 13, 8), (3, 3, 8, 8), 2, "SAME", 1),      # odd, non-square image
    ((3, 28, 28, 1), (5, 5, 1, 6), 1, "SAME", 1),      # one input channel (LeNet-5)
    ((3, 14, 14, 6), (5, 5, 6, 16), 1, "VALID", 1),
    ((3, 15, 15, 24), (3, 3, 1, 24), 2, "SAME", 24),   # depthwise (MobileNetV2)
    ((3, 12, 12, 8), (3, 3, 1, 8), 1, "SAME", 8),
    ((3, 9, 9, 8), (3, 3, 4, 6), 1, "VALID", 2),       # grouped
])
def test_forward_and_gradients_equal_xla(shape, kernel, strides, padding, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    k = jnp.asarray(rng.standard_normal(kernel).astype(np.float32))
    mine = jax.jit(onednn.conv2d, static_argnums=(2, 3, 4))
    np.testing.assert_allclose(mine(x, k, strides, padding, groups), xla_conv(x, k, strides, padding, groups),
                               rtol=1e-5, atol=1e-4)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides, padding, groups)))

    got = jax.jit(jax.grad(loss(onednn.conv2d), argnums=(0, 1)))(x, k)
    want = jax.grad(loss(xla_conv), argnums=(0, 1))(x, k)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)


def test_vmap_over_images_and_kernels_equals_xla():
    """A population: per-individual kernels and images, forward and kernel gradients."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 2, 10, 10, 8)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((4, 3, 3, 8, 5)).astype(np.float32))

    def per_individual(conv):
        return jax.vmap(lambda x, k: (conv(x, k, 1, "SAME", 1),
                                      jax.grad(lambda k: jnp.sum(conv(x, k, 1, "SAME", 1) ** 2))(k)))

    got = jax.jit(per_individual(onednn.conv2d))(x, k)
    want = per_individual(xla_conv)(x, k)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)


def test_conv2d_takes_onednn_on_cpu_for_float32_only():
    x, k = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    calls = lambda x, k, kernels="cpu": str(jax.make_jaxpr(  # noqa: E731
        lambda x, k: layers.conv2d(x, k, 1, "SAME", 1, kernels))(x, k))
    assert onednn.TARGETS["forward"] in calls(x, k)
    assert onednn.TARGETS["forward"] not in calls(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert onednn.TARGETS["forward"] not in calls(x, k, "xla")


@pytest.mark.parametrize("cpu_without_onednn", [False, True])
def test_resnet20_training_step_equals_xla_paths(cpu_without_onednn, monkeypatch):
    """The loss and gradients of one ResNet-20 training step (BatchNorm, strided shortcuts)
    through qevo's CPU kernels (oneDNN, or the paths taken without it) and through XLA's
    convolution (``model.conv``)."""
    if cpu_without_onednn:
        monkeypatch.setattr(onednn, "available", lambda: False)
    cpu, xla = (get_model("resnet20", 10, QuantOptions(conv=conv)) for conv in ("cpu", "xla"))
    variables = init_variables(xla, jax.random.key(0), (32, 32, 3))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((8, 32, 32, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 8))

    def grads(model):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, None, train=True, mutable=["batch_stats"])
            return cross_entropy(logits, y)
        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    loss_dnn, g_dnn = grads(cpu)
    loss_xla, g_xla = grads(xla)
    np.testing.assert_allclose(loss_dnn, loss_xla, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_dnn), jax.tree.leaves(g_xla), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    step = lambda g: optax.apply_updates(variables["params"], tx.update(g, tx.init(g))[0])  # noqa: E731
    for a, b in zip(jax.tree.leaves(step(g_dnn)), jax.tree.leaves(step(g_xla)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(onednn.DISABLE_ENV, "0")
    with pytest.raises(onednn.OneDNNUnavailable, match="QEVO_ONEDNN=0"):
        onednn._load()


def test_same_padding_matches_xla():
    """The explicit padding handed to oneDNN is the padding XLA's ``"SAME"`` uses."""
    for size, k, s in [(32, 3, 2), (15, 3, 2), (28, 5, 1), (16, 1, 2), (7, 4, 3)]:
        want = jax.lax.padtype_to_pads((size,), (k,), (s,), "SAME")[0]
        assert onednn.same_padding(size, k, s) == tuple(want)


def _bf16_units() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX), which oneDNN's bf16 mode uses."""
    flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _rounded(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("shape, kernel, strides, padding, groups", [
    ((4, 16, 16, 32), (3, 3, 32, 32), 1, "SAME", 1),
    ((4, 16, 16, 16), (3, 3, 16, 32), 2, "SAME", 1),
    ((4, 15, 15, 24), (3, 3, 1, 24), 2, "SAME", 24),  # depthwise: oneDNN may keep float32
])
def test_bfloat16_products_are_rounded_operands_summed_in_float32(shape, kernel, strides, padding, groups):
    """``precision="bfloat16"``: on a CPU with bfloat16 units a dense convolution's forward
    pass equals the exact convolution of the operands rounded to bfloat16 (their products
    are exact in float32), measurably apart from the float32 convolution; oneDNN keeps
    float32 where it has no bfloat16 kernel (depthwise, some gradients, CPUs without the
    units), so every other result equals one of the two, and each gradient stays within
    bfloat16's rounding of the float32 gradient."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    k = jnp.asarray(rng.standard_normal(kernel).astype(np.float32))
    conv = jax.jit(onednn.conv2d, static_argnums=(2, 3, 4, 5))
    got = conv(x, k, strides, padding, groups, "bfloat16")
    exact = xla_conv(x, k, strides, padding, groups)
    scale = float(jnp.max(jnp.abs(exact)))
    rounded = xla_conv(_rounded(x), _rounded(k), strides, padding, groups)
    off = lambda want: float(jnp.max(jnp.abs(got - want))) / scale  # noqa: E731
    assert float(jnp.max(jnp.abs(rounded - exact))) / scale > 1e-4  # the two candidates differ
    if _bf16_units() and groups == 1:
        assert off(rounded) < 1e-5
    else:
        assert min(off(rounded), off(exact)) < 1e-5

    cotangent = jnp.asarray(rng.standard_normal(exact.shape).astype(np.float32))

    def loss(conv, *precision):
        return lambda x, k: jnp.sum(cotangent * conv(x, k, strides, padding, groups, *precision))

    got = jax.jit(jax.grad(loss(onednn.conv2d, "bfloat16"), argnums=(0, 1)))(x, k)
    want = jax.grad(loss(xla_conv), argnums=(0, 1))(x, k)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-2 * float(jnp.max(jnp.abs(w))))


def test_xla_bfloat16_convolution_is_rounded_operands_summed_in_float32():
    """``kernels="xla"`` with ``precision="bfloat16"`` (the GPU path): bfloat16 operands,
    float32 results and gradients."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 8)).astype(np.float32))
    got = layers.conv2d(x, k, 1, "SAME", 1, "xla", "bfloat16")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, xla_conv(_rounded(x), _rounded(k), 1, "SAME", 1), rtol=1e-5, atol=1e-4)
    gx, gk = jax.grad(lambda x, k: jnp.sum(layers.conv2d(x, k, 1, "SAME", 1, "xla", "bfloat16") ** 2),
                      argnums=(0, 1))(x, k)
    assert gx.dtype == gk.dtype == jnp.float32
    wx, wk = jax.grad(lambda x, k: jnp.sum(xla_conv(x, k, 1, "SAME", 1) ** 2), argnums=(0, 1))(x, k)
    for g, w in ((gx, wx), (gk, wk)):
        np.testing.assert_allclose(g, w, atol=2e-2 * float(jnp.max(jnp.abs(w))))


def test_bfloat16_precision_holds_for_the_float_network_only():
    """A model with ``precision="bfloat16"`` asks oneDNN for bfloat16 products on its float
    path and exact float32 ones once it is fake-quantized (bit widths given)."""
    from qevo.train import uniform_bits

    model = get_model("resnet20", 10, QuantOptions(conv="cpu", precision="bfloat16"))
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    x = jnp.zeros((2, 32, 32, 3))
    flags = lambda bits: set(re.findall(r"'bf16', np.int64\((\d)\)", str(jax.make_jaxpr(  # noqa: E731
        lambda v: model.apply(v, x, bits))(variables))))
    assert flags(None) == {"1"}
    assert flags(uniform_bits(model.num_layers, 4, 4)) == {"0"}
