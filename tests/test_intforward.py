"""Integer forward pass: levels equal the fake quantizers, int8 operands with int32 sums,
and integer logits equal to the fake-quant logits (LeNet-5 on the MNIST test set, ResNet)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from qevo import checkpoint
from qevo.data.datasets import load_dataset, normalize
from qevo.harness import MODEL
from qevo.models.inputs import uniform_bits
from qevo.models.zoo import get_model, init_variables
from qevo.quant import intforward, quantizers
from qevo.quant.calibration import calibrate
from qevo.quant.layers import Bits, QuantOptions


@pytest.mark.parametrize("per_channel, mode", [(True, "absmax"), (False, "absmax"), (True, "mse")])
def test_weight_levels_times_scale_is_the_fake_quantizer(per_channel, mode):
    rng = np.random.default_rng(0)
    for shape in ((5, 5, 6, 16), (400, 120)):
        kernel = rng.normal(0, 0.1, shape).astype(np.float32)
        kernel[..., 3] = 0.0  # an all-zero channel keeps scale 0
        for bits in range(2, 9) if mode == "absmax" else (2, 3, 8):
            k = intforward.weight_levels(jnp.asarray(kernel), bits, per_channel, mode)
            n = intforward.max_level(bits)
            assert k.q.dtype == jnp.int8 and k.q.shape == shape and k.scale.shape == (shape[-1],)
            assert int(jnp.max(jnp.abs(k.q))) == n
            want = quantizers.quantize_weight(jnp.asarray(kernel), bits, per_channel=per_channel, mode=mode)
            np.testing.assert_array_equal(intforward.dequantize(k), want)
    wide = intforward.weight_levels(jnp.asarray(kernel), 16, per_channel, mode)
    assert wide.q.dtype == jnp.int16 and int(jnp.max(jnp.abs(wide.q))) == intforward.max_level(16)
    np.testing.assert_array_equal(intforward.dequantize(wide),
                                  quantizers.quantize_weight(jnp.asarray(kernel), 16, per_channel=per_channel,
                                                              mode=mode))
    with pytest.raises(ValueError, match=r"width in 2\.\.16"):
        intforward.weight_levels(jnp.ones((3, 3)), 17)
    with pytest.raises(ValueError, match="symmetric quantizer"):
        intforward.weight_levels(jnp.ones((3, 3)), 4, mode="dorefa")


@pytest.mark.parametrize("signed", [True, False])
def test_activation_levels_times_step_is_the_fake_quantizer(signed):
    x = jax.random.normal(jax.random.key(0), (4096,)) * 3.0
    clip = jnp.float32(2.5)
    for bits in range(2, 9):
        levels, step = intforward.activation_levels(x, jnp.int32(bits), clip, signed)
        top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        assert int(levels.max()) == top and int(levels.min()) == (-top if signed else 0)
        np.testing.assert_array_equal(levels * step,
                                      quantizers.quantize_activation(x, jnp.int32(bits), clip, signed=signed))


@pytest.mark.parametrize("k, strides, padding, groups",
                         [(5, 1, "SAME", 1), (3, 2, "SAME", 1), (5, 1, "VALID", 1), (1, 2, "VALID", 1),
                          (3, 1, "SAME", 8)])
def test_int_conv_is_the_exact_integer_convolution(k, strides, padding, groups):
    """Unsigned 8-bit levels stored with offset 128 and signed ones without, against a float
    convolution of the same small integers (exact in float32)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.integers(-7, 8, (k, k, 8 // groups, 8)), jnp.int8)
    for offset, lo, hi in ((128, 0, 256), (0, -127, 128)):
        levels = rng.integers(lo, hi, (2, 9, 9, 8))
        x8 = jnp.asarray(levels - offset, jnp.int8)
        got = intforward.int_conv(x8, jnp.int32(offset), q, strides, padding, groups)
        want = jax.lax.conv_general_dilated(jnp.asarray(levels, jnp.float32), q.astype(jnp.float32), (strides, strides),
                                            padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, want.astype(jnp.int32))


def _int8_dots(jaxpr) -> list:
    """Every dot_general of a jaxpr (nested ones included) with int8 operands: its output dtype."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and all(v.aval.dtype == jnp.int8 for v in eqn.invars):
            out.append(eqn.outvars[0].aval.dtype)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    out += _int8_dots(getattr(sub, "jaxpr", sub))
    return out


@pytest.fixture(scope="module")
def mnist_lenet(tiny_lenet5_float, data_dir):
    """The tiny float LeNet-5, calibrated, with the integer layers' paths, the MNIST test set,
    and both forward passes compiled once for every width (``fake(v, bits, x)``, ``integer(v, kernels, bits, x)``)."""
    ds = load_dataset("mnist", data_dir)
    model = get_model("lenet5", 10)
    variables, _ = checkpoint.load(pathlib.Path(tiny_lenet5_float) / MODEL,
                                   init_variables(model, jax.random.key(0), (28, 28, 1)))
    variables = calibrate(model, variables, normalize(ds.train_images[:512], ds.mean, ds.std))
    layers = intforward.quantized_layers(model)
    fake = jax.jit(lambda v, bits, x: model.apply(v, x, bits))
    integer = jax.jit(lambda v, kernels, bits, x: intforward.apply(model, v, kernels, bits, x))
    return model, variables, layers, normalize(ds.test_images, ds.mean, ds.std), fake, integer


def test_integer_layers_use_int8_operands_and_int32_sums(mnist_lenet):
    model, variables, layers, *_ = mnist_lenet
    assert layers == {"QConv_0": 0, "QConv_1": 1, "QDense_0": 2, "QDense_1": 3, "QDense_2": 4}
    bits = uniform_bits(5, 4, 8)
    kernels = intforward.integer_kernels(variables, layers, np.asarray(bits.w))
    assert sorted(kernels) == ["QConv_1", "QDense_0", "QDense_1"]  # first and last stay float
    jaxpr = jax.make_jaxpr(lambda k, x: intforward.apply(model, variables, k, bits, x))(kernels,
                                                                                       jnp.zeros((2, 28, 28, 1)))
    assert _int8_dots(jaxpr.jaxpr) == [jnp.int32] * 3


@pytest.mark.parametrize("w_bits", [2, 4, 8])
def test_integer_logits_equal_fake_quant_on_mnist_test(mnist_lenet, w_bits):
    """All 10,000 test images: logits equal up to float rounding (1e-5 of their size) on at
    least 99% of the images, and on the rest (an activation on a rounding tie lands one level
    apart) within one activation quantization step; the argmax is the same everywhere except
    where the rounding decides a tie of the top two logits (at most 0.1% of the images; none
    with the fully trained float model, see the slow test of ``test_coevolve``)."""
    _, variables, layers, x, fake_fn, integer_fn = mnist_lenet
    bits = uniform_bits(5, w_bits, 8)
    kernels = intforward.integer_kernels(variables, layers, np.asarray(bits.w))
    fake = np.asarray(fake_fn(variables, bits, x))
    integer = np.asarray(integer_fn(variables, kernels, bits, x))
    diff = np.abs(integer - fake).max(axis=1)
    assert np.mean(diff <= 1e-5 * np.abs(fake).max(axis=1)) >= 0.99
    step = float(jnp.max(variables["quant"]["a_clip"])) / 255
    assert diff.max() <= step, (diff.max(), step)
    top = np.sort(fake, axis=1)
    other = np.argmax(integer, 1) != np.argmax(fake, 1)
    assert np.mean(other) <= 0.001 and np.all(top[other, -1] - top[other, -2] <= 2 * diff[other])


def test_evolved_levels_equal_fake_quant_of_their_weights(mnist_lenet):
    """Levels moved off round-to-nearest (so a channel's absmax scale no longer matches) run
    as the network with kernels ``q * scale`` and only the activations fake-quantized."""
    model, variables, layers, x, fake_fn, integer_fn = mnist_lenet
    bits = uniform_bits(5, 3, 8)
    kernels = intforward.integer_kernels(variables, layers, np.asarray(bits.w))
    rng = np.random.default_rng(2)
    moved = {}
    for path, k in kernels.items():
        step = rng.integers(-1, 2, k.q.shape) * (rng.random(k.q.shape) < 0.3)
        moved[path] = intforward.IntKernel(q=jnp.clip(k.q + step, -3, 3).astype(jnp.int8), scale=k.scale)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    for path, k in moved.items():
        flat[f"{path}/kernel"] = intforward.dequantize(k)
    dequantized = {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}
    float_weights = Bits(w=jnp.full(5, 32, jnp.int32), a=bits.a)
    fake = np.asarray(fake_fn(dequantized, float_weights, x))
    integer = np.asarray(integer_fn(variables, moved, bits, x))
    np.testing.assert_array_equal(np.argmax(integer, 1), np.argmax(fake, 1))
    assert np.mean(np.abs(integer - fake).max(axis=1) <= 1e-5 * np.abs(fake).max(axis=1)) >= 0.99
    # arithmetic="float" (how the coevolution scores candidates) is exactly that network.
    in_float = np.asarray(jax.jit(lambda k, x: intforward.apply(model, variables, k, bits, x, "float"))(moved, x))
    np.testing.assert_allclose(in_float, fake, rtol=1e-6, atol=1e-6 * np.abs(fake).max())


@pytest.mark.parametrize("conv", ["cpu", "xla"])
def test_resnet_integer_forward_equals_fake_quant(conv):
    """A ResNet-8 (SAME padding of unsigned 8-bit inputs, BatchNorm, projection shortcuts
    sharing their block's widths): same argmax, logits equal up to float rounding but for
    near-ties: an activation within float rounding of a rounding boundary may round the
    other way in float arithmetic than in exact integer sums, and its images hold ~25k
    activations each.  Measured: 14 (XLA's convolution) and 15 (oneDNN) of the 16 images
    agree to 4e-7 of their largest logit, the others to 3e-4 and 1.2e-3; at least 12 must
    agree to 1e-5."""
    model = get_model("resnet8", 10, QuantOptions(conv=conv), (16, 16, 3))
    x = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
    variables = init_variables(model, jax.random.key(0), (16, 16, 3))
    keys = iter(jax.random.split(jax.random.key(2), 64))
    stats = jax.tree_util.tree_map(lambda s: s + 0.1 * jnp.abs(jax.random.normal(next(keys), s.shape)),
                                   variables["batch_stats"])
    variables = {**variables, "batch_stats": stats, "quant": {"a_clip": jnp.full(model.num_layers, 3.0)}}
    layers = intforward.quantized_layers(model)
    assert layers["_BasicBlock_1/QConv_2"] == layers["_BasicBlock_1/QConv_0"]  # the shortcut shares the widths
    bits = uniform_bits(model.num_layers, 4, 8)
    kernels = intforward.integer_kernels(variables, layers, np.asarray(bits.w))
    assert len(kernels) == len(layers) - 2
    fake = np.asarray(jax.jit(lambda v, x: model.apply(v, x, bits))(variables, x))
    integer = np.asarray(jax.jit(lambda v, k, x: intforward.apply(model, v, k, bits, x))(variables, kernels, x))
    np.testing.assert_array_equal(np.argmax(integer, 1), np.argmax(fake, 1))
    assert np.sum(np.abs(integer - fake).max(axis=1) <= 1e-5 * np.abs(fake).max(axis=1)) >= 12
    np.testing.assert_allclose(integer, fake, atol=0.005 * np.abs(fake).max())


def _resnet8_integer(w_bits: int):
    """A randomly initialised ResNet-8 (16 x 16 inputs) with round-to-nearest ``w_bits``-bit
    kernels and 8-bit activations, and a batch of 64 normal images for it."""
    model = get_model("resnet8", 10, input_shape=(16, 16, 3))
    x = jax.random.normal(jax.random.key(1), (64, 16, 16, 3))
    variables = init_variables(model, jax.random.key(0), (16, 16, 3))
    variables = {**variables, "quant": {"a_clip": jnp.full(model.num_layers, 3.0)}}
    layers = intforward.quantized_layers(model)
    bits = uniform_bits(model.num_layers, w_bits, 8)
    return model, variables, intforward.integer_kernels(variables, layers, np.asarray(bits.w)), bits, x


def test_reestimated_batch_statistics_make_inference_equal_training_mode():
    """With statistics re-estimated on a batch, the inference-mode network gives on that batch
    the logits of the training-mode network (each BatchNorm normalised by the batch's own
    statistics), here the fake-quantized ResNet-8 with the dequantized kernels."""
    model, variables, kernels, bits, x = _resnet8_integer(2)
    stats = jax.jit(lambda k, x: intforward.batch_statistics(model, variables, k, bits, x))(kernels, x)
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    for path, k in kernels.items():
        flat[f"{path}/kernel"] = intforward.dequantize(k)
    dequantized = {**variables, "params": traverse_util.unflatten_dict(flat, sep="/")}
    float_weights = Bits(w=jnp.where(bits.w < 32, 32, bits.w), a=bits.a)
    training, _ = model.apply(dequantized, x, float_weights, train=True, mutable=["batch_stats"])
    before = intforward.apply(model, variables, kernels, bits, x, "float")
    after = intforward.apply(model, {**variables, "batch_stats": stats}, kernels, bits, x, "float")
    np.testing.assert_allclose(after, training, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(training))))
    assert float(jnp.max(jnp.abs(before - training))) > 0.1 * float(jnp.max(jnp.abs(training)))


def test_reestimated_batch_statistics_absorb_per_channel_weight_scales():
    """Every quantized convolution of a CIFAR ResNet feeds a BatchNorm, so once the statistics
    are re-estimated (as the coevolution does after every cycle) each kernel's per-channel
    scales drop out: scaling them by any positive factors leaves the logits unchanged up to
    BatchNorm's epsilon and the few 8-bit activation roundings that such last-bit
    differences flip (scaling by 1.0001 alone moves them by 0.1% of the largest logit).
    Without re-estimation the same factors change the logits by more than 10% of it."""
    model, variables, kernels, bits, x = _resnet8_integer(4)
    rng = np.random.default_rng(2)
    scaled = {p: k.replace(scale=k.scale * rng.uniform(0.5, 2.0, k.scale.shape).astype(np.float32))
              for p, k in kernels.items()}

    def logits(ks, stats):
        return intforward.apply(model, {**variables, "batch_stats": stats}, ks, bits, x, "float")

    def reestimated(ks):
        return logits(ks, intforward.batch_statistics(model, variables, ks, bits, x))

    logits, reestimated = jax.jit(logits), jax.jit(reestimated)
    base = reestimated(kernels)
    top = float(jnp.max(jnp.abs(base)))
    np.testing.assert_allclose(reestimated(scaled), base, atol=0.01 * top)
    np.testing.assert_array_equal(np.argmax(reestimated(scaled), 1), np.argmax(base, 1))
    stats = variables["batch_stats"]
    assert float(jnp.max(jnp.abs(logits(scaled, stats) - logits(kernels, stats)))) > 0.1 * top
