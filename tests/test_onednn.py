"""oneDNN's CPU convolutions against XLA's reference convolution and its ``jax.grad``."""

import platform
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qevo.models.losses import cross_entropy
from qevo.models.zoo import get_model, init_variables
from qevo.quant import layers, onednn
from qevo.quant.layers import QuantOptions

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
    status = onednn.status()
    assert status.available, status.reason
    assert re.fullmatch(r"3\.\d+\.\d+", status.version)
    assert set(status.implementations["bfloat16"]) == set(onednn.PRIMITIVES)


def test_a_bridge_not_built_at_install_is_reported_with_its_reason(monkeypatch, tmp_path):
    """Without the bridge, the reason the install wrote (``onednn_build.txt``) is the error."""
    reason = tmp_path / onednn.NOT_BUILT
    reason.write_text("no working C++ compiler (install g++ or set CXX, then reinstall qevo)\n")
    monkeypatch.setattr(onednn, "_dist_file", lambda dist, suffix: reason if suffix.endswith(reason.name) else None)
    with pytest.raises(onednn.OneDNNUnavailable, match=r"installed: no working C\+\+ compiler \(install g\+\+"):
        onednn._bridge()


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


# float32's unit roundoff, and the error bound of a float32 ResNet-20 gradient against float64:
# a sum of K products is off by about sqrt(K) roundoffs of the sum of their magnitudes
# (Higham and Mary's probabilistic bound, with a factor 2), and the errors of the 19
# convolutions of the forward pass and the 38 of the backward pass add up.
UNIT_ROUNDOFF = 2.0 ** -24
RESNET20_GRADIENT_TOLERANCE = 2 * (19 + 38) * np.sqrt(3 * 3 * 64) * UNIT_ROUNDOFF


@pytest.mark.parametrize("cpu_without_onednn", [False, True])
def test_resnet20_training_step_matches_float64(cpu_without_onednn, monkeypatch):
    """The loss and gradients of one ResNet-20 training step (BatchNorm in training mode,
    strided shortcuts) through qevo's CPU kernels (oneDNN, or the paths taken without it)
    equal XLA's convolution in float64 within float32's rounding error.

    ReLU is replaced by softplus: a ReLU's gradient jumps where its input crosses zero, so
    rounding differences of 1e-7 (a different summation order on another CPU or thread
    count) switch single gradient terms on or off. The smooth network keeps every
    convolution path and has a gradient that float32 rounding moves by a bounded amount."""
    if cpu_without_onednn:
        monkeypatch.setattr(onednn, "available", lambda: False)
    monkeypatch.setattr(nn, "relu", jax.nn.softplus)
    cpu, xla = (get_model("resnet20", 10, QuantOptions(conv=conv)) for conv in ("cpu", "xla"))
    variables = init_variables(xla, jax.random.key(0), (32, 32, 3))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 32, 32, 3)).astype(np.float32)
    y = jnp.asarray(rng.integers(0, 10, 8))

    def loss_and_grads(model, variables, x):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, None, train=True, mutable=["batch_stats"])
            return cross_entropy(logits, y)
        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    loss, grads = loss_and_grads(cpu, variables, jnp.asarray(x))
    with jax.enable_x64(True):
        as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
        loss64, grads64 = jax.tree.map(np.asarray, loss_and_grads(xla, as64(variables), as64(x)))
    assert abs(float(loss) - loss64) <= RESNET20_GRADIENT_TOLERANCE * abs(loss64)
    for path, got, want in zip(jax.tree_util.tree_leaves_with_path(grads64), jax.tree.leaves(grads),
                               jax.tree.leaves(grads64), strict=True):
        error = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
        assert error <= RESNET20_GRADIENT_TOLERANCE, (jax.tree_util.keystr(path[0]), error)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(onednn.DISABLE_ENV, "0")
    with pytest.raises(onednn.OneDNNUnavailable, match="QEVO_ONEDNN=0"):
        onednn._bridge()


def test_same_padding_matches_xla():
    """The explicit padding handed to oneDNN is the padding XLA's ``"SAME"`` uses."""
    for size, k, s in [(32, 3, 2), (15, 3, 2), (28, 5, 1), (16, 1, 2), (7, 4, 3)]:
        want = jax.lax.padtype_to_pads((size,), (k,), (s,), "SAME")[0]
        assert onednn.same_padding(size, k, s) == tuple(want)


def _rounded(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


def _below_bfloat16(rng, shape):
    """Operands whose bfloat16 rounding is known and whose products sum exactly in float32:
    integers of magnitude 2 or 3 plus or minus 2^-8, which bfloat16 (8 significant bits,
    spacing 2^-6 there) rounds to the integer."""
    return (rng.choice([-3.0, -2.0, 2.0, 3.0], shape) + rng.choice([-1.0, 1.0], shape) / 256).astype(np.float32)


def _small_integers(rng, shape):
    """Operands that bfloat16 holds exactly: integers in [-3, 3]."""
    return rng.integers(-3, 4, shape).astype(np.float32)


@pytest.mark.parametrize("shape, kernel, strides, padding, groups", [
    ((4, 16, 16, 32), (3, 3, 32, 32), 1, "SAME", 1),
    ((4, 16, 16, 16), (3, 3, 16, 32), 2, "SAME", 1),
    ((4, 16, 16, 16), (1, 1, 16, 32), 2, "SAME", 1),
    ((4, 15, 15, 24), (3, 3, 1, 24), 2, "SAME", 24),
])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_each_primitive_computes_in_the_precision_onednn_reports(shape, kernel, strides, padding, groups, precision):
    """The forward pass and both gradients each compute exactly the float32 convolution of
    their operands, or exactly that of their operands rounded to bfloat16, whichever
    oneDNN's implementation for this CPU says (:func:`qevo.quant.onednn.rounds_to_bfloat16` of
    :func:`qevo.quant.onednn.implementations`); in float32 mode always the former.

    One operand of each primitive carries bits below bfloat16's precision, the other is a
    small integer, so both candidate results are exact in float32 whatever the order of
    the sums (every partial sum is a multiple of 2^-8 below 2^14), and they differ."""
    rng = np.random.default_rng(3)
    names = onednn.implementations(shape, kernel, strides, padding, groups, precision)
    out_shape = xla_conv(jnp.zeros(shape), jnp.zeros(kernel), strides, padding, groups).shape
    conv = lambda conv, *p: lambda x, k: conv(x, k, strides, padding, groups, *p)  # noqa: E731
    ours, exact = conv(onednn.conv2d, precision), conv(xla_conv)
    # each primitive as a function of its two operands, and the operands it is checked on
    primitives = {
        "forward": (lambda f: f, (_below_bfloat16(rng, shape), _small_integers(rng, kernel))),
        "input_grad": (lambda f: lambda dy, k: jax.vjp(lambda x: f(x, k), jnp.zeros(shape))[1](dy)[0],
                       (_below_bfloat16(rng, out_shape), _small_integers(rng, kernel))),
        "kernel_grad": (lambda f: lambda x, dy: jax.vjp(lambda k: f(x, k), jnp.zeros(kernel))[1](dy)[0],
                        (_below_bfloat16(rng, shape), _small_integers(rng, out_shape))),
    }
    for name, (primitive, (a, b)) in primitives.items():
        got = np.asarray(jax.jit(primitive(ours))(a, b))
        want_exact = np.asarray(primitive(exact)(a, b))
        want_rounded = np.asarray(primitive(exact)(_rounded(a), _rounded(b)))
        assert np.any(want_exact != want_rounded)
        rounds = precision == "bfloat16" and onednn.rounds_to_bfloat16(names[name])
        np.testing.assert_array_equal(got, want_rounded if rounds else want_exact,
                                      err_msg=f"{name} ({names[name]}, rounds to bfloat16: {rounds})")


def test_record_names_the_implementations_of_every_convolution():
    """:func:`qevo.quant.onednn.record` of a program lists the implementations oneDNN picks for
    each of its convolutions, and a program without oneDNN calls as XLA's."""
    shapes = [((2, 16, 16, 8), (3, 3, 8, 16), 2, "SAME", 1), ((2, 8, 8, 16), (3, 3, 1, 16), 1, "SAME", 16)]

    def program(x, k1, k2):
        y = onednn.conv2d(x, k1, 2, "SAME", 1, "bfloat16")
        return onednn.conv2d(y, k2, 1, "SAME", 16, "bfloat16")

    args = [jax.ShapeDtypeStruct(s, np.float32) for s in (shapes[0][0], shapes[0][1], shapes[1][1])]
    got = onednn.record(program, *args)
    want = {n for s in shapes for n in onednn.implementations(*s, precision="bfloat16").values()}
    assert got["kernels"] == f"onednn {onednn.version()}" and got["implementations"] == sorted(want)
    rounded = {onednn.rounds_to_bfloat16(n) for n in want}
    assert got["precision"] == {frozenset({True}): "bfloat16", frozenset({False}): "float32"}.get(
        frozenset(rounded), "mixed")
    assert onednn.record(lambda x, k: xla_conv(x, k, 1, "SAME", 1), *args[:2]) == {"kernels": "xla",
                                                                                   "precision": "float32"}


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
    from qevo.models.inputs import uniform_bits

    model = get_model("resnet20", 10, QuantOptions(conv="cpu", precision="bfloat16"))
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    x = jnp.zeros((2, 32, 32, 3))
    flags = lambda bits: set(re.findall(r"'bf16', np.int64\((\d)\)", str(jax.make_jaxpr(  # noqa: E731
        lambda v: model.apply(v, x, bits))(variables))))
    assert flags(None) == {"1"}
    assert flags(uniform_bits(model.num_layers, 4, 4)) == {"0"}
