"""A user's own Flax Linen network, unchanged, quantized from outside (qevo.quant.interception),
and a user's own arrays (Dataset.from_arrays)."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_quant import np_quantize_activation, np_quantize_weight

import qevo
from qevo.config import ConfigError
from qevo.errors import DataError
from qevo.models import inputs as model_inputs
from qevo.quant.layers import Bits, QuantOptions
from qevo.search import config as search_config
from qevo.search import method as search_method

REPO = pathlib.Path(__file__).resolve().parents[1]


class SeparableNet(nn.Module):
    """A network qevo does not ship: plain, depthwise and pointwise convolutions, BatchNorm, a head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(6, (3, 3))(x))                                   # 12x12x1 -> 12x12x6
        x = nn.Conv(6, (3, 3), strides=2, feature_group_count=6)(x)          # depthwise -> 6x6x6
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.relu(nn.Conv(8, (1, 1), padding="VALID")(x))                  # pointwise -> 6x6x8
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))                                         # 288 -> 16
        return nn.Dense(3)(x)                                                # 16 -> 3


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.relu(nn.Dense(5)(x))
        return nn.Dense(3)(hidden)


def _sample(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_the_layer_table_and_bitops_of_a_users_network_by_hand():
    """Layers in call order with their kernels and MACs per example, counted by hand;
    BitOps at w8a8 and w4a4 (first and last layer float) from those counts."""
    model = qevo.quantize_model(SeparableNet(), _sample((4, 12, 12, 1)))
    macs = [12 * 12 * 6 * 9 * 1, 6 * 6 * 6 * 9 * 1, 6 * 6 * 8 * 6, 288 * 16, 16 * 3]
    assert [(x.path, x.kind, x.kernel_shape, x.groups) for x in model.layers] == [
        ("Conv_0", "conv", (3, 3, 1, 6), 1), ("Conv_1", "conv", (3, 3, 1, 6), 6), ("Conv_2", "conv", (1, 1, 6, 8), 1),
        ("Dense_0", "dense", (288, 16), 1), ("Dense_1", "dense", (16, 3), 1)]
    assert [x.macs for x in model.layers] == macs
    assert [x.signed for x in model.layers] == [True, False, False, False, False]  # only the input is signed
    variables = qevo.init_variables(model, jax.random.key(0), (12, 12, 1))
    table = qevo.layer_table(model, variables, (12, 12, 1))
    assert list(table.macs) == macs and list(table.weights) == [54, 54, 48, 4608, 48]
    params = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
    assert table.other_params == params - (54 + 54 + 48 + 4608 + 48)
    for b in (8, 4):
        bits = model_inputs.uniform_bits(5, b, b)
        want = 32 * 32 * macs[0] + b * b * (macs[1] + macs[2] + macs[3]) + 32 * 32 * macs[4]
        assert float(qevo.bitops(table, bits.w, bits.a)) == want


def test_the_float_path_is_the_network_itself():
    net = SeparableNet()
    x = _sample((3, 12, 12, 1))
    model = qevo.quantize_model(net, x, options=QuantOptions(conv="xla"))
    variables = qevo.init_variables(model, jax.random.key(1), (12, 12, 1))
    own = {k: v for k, v in variables.items() if k != "quant"}
    np.testing.assert_array_equal(model.apply(variables, x, None), net.apply(own, x))


def test_fast_cpu_convolutions_equal_xlas_on_a_users_network():
    """On CPU the found convolutions take qevo's kernels (oneDNN where available); the
    network's output equals XLA's convolutions' in float64, within float32 rounding."""
    x = _sample((3, 12, 12, 1))
    cpu = qevo.quantize_model(SeparableNet(), x, options=QuantOptions(conv="cpu"))
    variables = qevo.init_variables(cpu, jax.random.key(2), (12, 12, 1))
    own = {k: v for k, v in variables.items() if k != "quant"}
    with jax.enable_x64(True):
        want = np.asarray(SeparableNet().apply(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), own),
                                               jnp.asarray(x, jnp.float64)))
    got = np.asarray(cpu.apply(variables, x, None), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))


@pytest.mark.parametrize("w, a", [([8, 4], [8, 4]), ([2, 32], [4, 32]), ([1, 3], [2, 8]), ([32, 32], [32, 32])])
def test_quantized_forward_equals_numpy_fake_quantization(w, a):
    """A two-layer MLP at per-layer widths: each layer's input quantized at its width and
    calibrated clip (signed for the first, whose inputs are negative too), its kernel per
    output channel, written out in numpy."""
    x = _sample((16, 7), seed=3)
    model = qevo.quantize_model(MLP(), x)
    variables = qevo.init_variables(model, jax.random.key(3), (7,))
    variables = qevo.calibrate(model, variables, x)
    bits = Bits(w=jnp.asarray(w), a=jnp.asarray(a))
    got = np.asarray(model.apply(variables, x, bits))

    p = jax.tree.map(np.asarray, variables["params"])
    clip = np.asarray(variables["quant"]["a_clip"])
    h = np_quantize_activation(np.asarray(x), a[0], clip[0], signed=True)
    h = h @ np_quantize_weight(p["Dense_0"]["kernel"], w[0], True) + p["Dense_0"]["bias"]
    h = np_quantize_activation(np.maximum(h, 0), a[1], clip[1], signed=False)
    want = h @ np_quantize_weight(p["Dense_1"]["kernel"], w[1], True) + p["Dense_1"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_calibration_takes_each_layers_input_percentile():
    x = _sample((64, 7), seed=4)
    model = qevo.quantize_model(MLP(), x)
    variables = qevo.calibrate(model, qevo.init_variables(model, jax.random.key(4), (7,)), x)
    p = variables["params"]
    hidden = np.maximum(np.asarray(x) @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"]), 0)
    want = [np.quantile(np.abs(np.asarray(x)), 0.9999), np.quantile(hidden, 0.9999)]
    np.testing.assert_allclose(variables["quant"]["a_clip"], want, rtol=1e-5)


def test_a_population_of_bit_widths_is_one_vmapped_program():
    """Widths are traced: vmapping over a population gives each member's own forward pass."""
    x = _sample((4, 12, 12, 1), seed=5)
    model = qevo.quantize_model(SeparableNet(), x)
    variables = qevo.calibrate(model, qevo.init_variables(model, jax.random.key(5), (12, 12, 1)), x)
    w = jnp.asarray([[32, 8, 4, 2, 32], [32, 2, 2, 8, 32], [32, 4, 4, 4, 32]])
    a = jnp.asarray([[32, 8, 4, 2, 32], [32, 4, 8, 2, 32], [32, 4, 4, 4, 32]])
    together = jax.jit(jax.vmap(lambda w, a: model.apply(variables, x, Bits(w=w, a=a))))(w, a)
    for i in range(3):
        np.testing.assert_allclose(together[i], model.apply(variables, x, Bits(w=w[i], a=a[i])), rtol=1e-5, atol=1e-6)
    assert not np.allclose(together[0], together[1])


def test_modules_with_parameters_that_are_not_layers_stay_float_and_are_listed():
    class WithScale(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4)(x)
            return nn.LayerNorm()(x) * self.param("gain", nn.initializers.ones, (4,))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(WithScale()(x))

    model = qevo.quantize_model(Outer(), _sample((2, 5)))
    assert model.layer_names == ("WithScale_0/Dense_0", "Dense_0")
    assert model.float_others == (("WithScale_0", "WithScale"),)  # its own "gain"; LayerNorm is float by design


class Pool(nn.Module):
    """No quantizable layer: a parameter of its own over pooled features."""

    @nn.compact
    def __call__(self, x):
        return x.mean(axis=(1, 2)) * self.param("w", nn.initializers.ones, (1,))


NO_LAYER = ("Pool has no quantizable layer (flax Conv, Dense/Linear or DenseGeneral/LinearGeneral); qevo quantizes "
            "only those: build its kernels with them (parameters of its own stay float)")


def test_a_network_without_quantizable_layers_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        qevo.quantize_model(Pool(), _sample((2, 4, 4, 3)))
    assert str(err.value) == NO_LAYER


def test_a_search_of_a_network_without_quantizable_layers_stops_before_training(tmp_path):
    data = qevo.Dataset.from_arrays(train=_arrays(), test=_arrays(10, seed=1), val_size=5)
    with pytest.raises(ConfigError) as err:
        search_method.run(qevo.search_defaults(), tmp_path, model=Pool(), data=data)
    # nothing of the run but its config.json, as the command leaves
    assert str(err.value) == NO_LAYER and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_network_that_fails_on_the_sample_says_so_in_one_line():
    class Fixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.reshape(x.shape[0], 288))

    with pytest.raises(ConfigError, match=r"^the model failed on a sample of shape \(2, 4, 4, 3\): TypeError: "):
        qevo.quantize_model(Fixed(), _sample((2, 4, 4, 3)))


def test_a_non_flax_model_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"model must be a flax\.linen or flax\.nnx Module, got function"):
        qevo.quantize_model(lambda x: x, _sample((2, 3)))


def _arrays(n=40, shape=(6, 6, 1), classes=3, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *shape)).astype(dtype)
    return x, rng.integers(0, classes, n)


class Wide(nn.Module):
    """7 class scores."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(7)(x.reshape(x.shape[0], -1))


class FeatureMap(nn.Module):
    """A 3-channel map per example, not pooled."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(3, (3, 3))(x)


class WithAux(nn.Module):
    """The right scores, but in a tuple."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(3)(x.reshape(x.shape[0], -1))
        return h, h


class NNXFive(nnx.Module):
    def __init__(self):
        self.linear = nnx.Linear(36, 5, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("make, got", [
    (Wide, "Wide outputs [N, 7]"),
    (FeatureMap, "FeatureMap outputs [N, 6, 6, 3]"),
    (WithAux, "WithAux outputs a tuple"),
    (NNXFive, "NNXFive outputs [N, 5]"),
])
def test_a_model_whose_output_does_not_fit_the_labels_is_refused(make, got):
    data = qevo.Dataset.from_arrays(train=_arrays(), test=_arrays(10, seed=1), val_size=5)
    with pytest.raises(ConfigError) as err:
        model_inputs.resolve_inputs(qevo.search_defaults(), make(), None, data)
    assert str(err.value) == (f"the model {got} for inputs [N, 6, 6, 1], but the labels need class scores [N, 3] "
                              "(3 classes); end the model in one array of 3 outputs per example (pool or flatten, "
                              "then a last layer of 3)")


def test_from_arrays_carves_a_seeded_validation_split_and_standardizes():
    x, y = _arrays(50)
    data = qevo.Dataset.from_arrays(train=(x, y), test=_arrays(10, seed=1), val_size=10, seed=3)
    perm = np.random.default_rng(3).permutation(50)
    np.testing.assert_array_equal(data.val_images, x[perm[:10]])
    np.testing.assert_array_equal(data.train_labels, y[perm[10:]])
    assert data.num_classes == 3 and len(data.mean) == 1
    z = np.asarray(qevo.normalize(data.train_images, data.mean, data.std))
    np.testing.assert_allclose([z.mean(), z.std()], [0, 1], atol=1e-5)


def test_from_arrays_feeds_float_inputs_as_they_are_without_normalization():
    x, y = _arrays(20, shape=(5,), dtype=np.float32)
    data = qevo.Dataset.from_arrays(train=(x - 100, y), test=(x[:4] - 100, y[:4]), normalize=False)
    np.testing.assert_allclose(qevo.normalize(data.test_images, data.mean, data.std), x[:4] - 100, rtol=1e-6)


def test_from_batches_joins_an_iterable_of_batches_as_from_arrays_would():
    x, y = _arrays(30)
    batches = ((x[i:i + 8], y[i:i + 8]) for i in range(0, 30, 8))
    got = qevo.Dataset.from_batches(batches, [(x[:5], y[:5])], val_size=6, seed=1)
    want = qevo.Dataset.from_arrays((x, y), (x[:5], y[:5]), val_size=6, seed=1)
    for split in ("train", "val", "test"):
        for a, b in zip(got.split(split), want.split(split), strict=True):
            np.testing.assert_array_equal(a, b)
    assert got.mean == want.mean and got.std == want.std
    with pytest.raises(DataError, match="the test iterable gave no batch"):
        qevo.Dataset.from_batches([(x, y)], [])
    with pytest.raises(DataError, match=r"train batch 0 must be an \(inputs, labels\) pair, got a dict"):
        qevo.Dataset.from_batches([{"image": x}], [(x, y)])


@pytest.mark.parametrize("train_split, match", [
    ((np.zeros((5, 2), np.uint8), np.zeros(4, int)), r"train has 5 inputs and 4 labels"),
    ((np.zeros((5, 2), np.uint8), np.array([0, 1, 2, 3, -1])), r"train labels hold -1"),
    ((np.full((5, 2), np.nan, np.float32), np.zeros(5, int)), r"train inputs hold 10 NaN or infinite values, in 5 "),
    ((np.zeros((5, 2), np.int64), np.zeros(5, int)), r"train inputs are int64; give uint8"),
    ((np.zeros((5, 2), np.uint8), np.array([0, 1, 2, 5, 1])), r"train labels hold 5 \(at example 3\), outside "),
])
def test_from_arrays_refuses_bad_input_in_one_line(train_split, match):
    with pytest.raises(DataError, match=match):
        qevo.Dataset.from_arrays(train=train_split, test=(np.zeros((2, 2), np.uint8), np.zeros(2, int)),
                                 num_classes=3)


@pytest.mark.slow
def test_the_example_takes_a_users_network_through_every_method_on_real_mnist(data_dir, tmp_path):
    """docs/examples/own_linen_model.py at its tiny budget: float training, then the search
    (with its final training), the weight sharing and the coevolution (at the search's w4a4
    widths) from those variables, of a Linen network qevo does not ship, on MNIST arrays
    read with numpy; the search's w4a4 model exported and scored in onnxruntime."""
    done = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "own_linen_model.py"), "--data",
                           str(data_dir), "--tiny", "--workdir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[:2] == ["Conv_0   conv  kernel (3, 3, 1, 16)    112,896 MACs",
                         "Conv_1   conv  kernel (3, 3, 1, 16)     28,224 MACs"]
    names = [line.split()[0] for line in lines[5:]]
    assert {"w8a8", "w4a4", "w2a2", "float", "shared"} <= set(names) and any(n.startswith("front_") for n in names)
    for name in ("search/results.json", "search/final.csv", "search/pareto.csv", "sharing/results.json",
                 "sharing/compressed_int8.msgpack"):
        assert (tmp_path / "run" / name).is_file(), name
    searched = json.loads((tmp_path / "run" / "search" / "results.json").read_text())
    assert searched["model"] == "SmallCNN" and searched["dataset"] == "arrays"
    assert not (tmp_path / "run" / "search" / "float").exists()  # it started from the given variables
    coevolved = json.loads((tmp_path / "run" / "coevolve" / "results.json").read_text())
    with (tmp_path / "run" / "search" / "final.csv").open() as f:
        w4a4 = next(row for row in csv.DictReader(f) if row["name"] == "w4a4")
    assert coevolved["model"] == "SmallCNN" and coevolved["w_bits"] == [int(b) for b in w4a4["w_bits"].split()]
    assert abs(coevolved["round_to_nearest"]["test_accuracy"]
               - coevolved["round_to_nearest"]["fake_quant_test_accuracy"]) <= 2e-3  # integer = fake quant
    record = json.loads((tmp_path / "run" / "w4a4.json").read_text())
    check = record["verification"]
    assert record["test_accuracy"] == float(w4a4["test_accuracy"]) and check["images"] == 1000
    assert check["prediction_agreement"] >= 0.99
    assert abs(check["onnxruntime_test_accuracy"] - record["test_accuracy"]) <= 0.005

    # The command exports a front model of that run, given the script's network and data.
    command = [sys.executable, "-m", "qevo.export", "--workdir", str(tmp_path / "run" / "search"), "--model",
               "front_00", "--out", str(tmp_path / "front_00.onnx"), "--verify"]
    env = {**os.environ, "QEVO_DATA_DIR": str(data_dir), "QEVO_EXAMPLE_TINY": "1"}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env, cwd=REPO)
    assert refused.returncode == 2 and "pass --inputs FILE.py:FUNCTION" in refused.stderr, refused.stderr[-2000:]
    exported = subprocess.run([*command, "--inputs", "docs/examples/own_linen_model.py:export_inputs"],
                              capture_output=True, text=True, timeout=600, check=False, env=env, cwd=REPO)
    assert exported.returncode == 0, exported.stderr[-3000:]
    record = json.loads(exported.stdout)
    with (tmp_path / "run" / "search" / "final.csv").open() as f:
        front = next(row for row in csv.DictReader(f) if row["name"] == "front_00")
    assert record["test_accuracy"] == float(front["test_accuracy"])
    assert abs(record["verification"]["onnxruntime_test_accuracy"] - record["test_accuracy"]) <= 5e-4


def test_an_objective_named_like_a_built_in_one_is_refused():
    with pytest.raises(ConfigError, match=r"objectives=\{'bitops': \.\.\.\} must map a new name"):
        search_config.with_objectives(qevo.search_defaults(), {"bitops": lambda w, a, t: w.sum(1)})


@pytest.mark.slow
def test_the_latency_example_minimises_its_lookup_table_beside_error_and_bitops(data_dir, tmp_path):
    """docs/examples/latency_objective.py at its tiny budget: its objective is in the history
    and in final.csv, equal to the table summed over LeNet-5's layers by hand."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "latency_objective.py"), "--tiny",
                           "--workdir", str(run)], capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "QEVO_DATA_DIR": str(data_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((run / "history.jsonl").read_text().splitlines()[0])
    assert set(first["objectives"]) == {"error", "bitops", "latency_ms"}
    # the run records the objective it minimised, so a rerun with it resumes and one without is refused
    assert json.loads((run / "config.json").read_text())["search"]["objectives"] == ["error", "bitops", "latency_ms"]
    macs = [28 * 28 * 6 * 25, 10 * 10 * 16 * 6 * 25, 16 * 5 * 5 * 120, 120 * 84, 84 * 10]  # LeNet-5, by hand
    ns = {32: 1.0, 8: 0.25, 4: 0.2, 2: 0.15}
    with (run / "final.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 4
    for row in rows:
        w, a = (list(map(int, row[k].split())) for k in ("w_bits", "a_bits"))
        want = sum(m * max(ns[x], ns[y]) for m, x, y in zip(macs, w, a, strict=True)) * 1e-6
        assert float(row["latency_ms"]) == pytest.approx(want, rel=1e-12)


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(7, 5, rngs=rngs)
        self.norm = nnx.BatchNorm(5, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def test_an_nnx_network_is_quantized_on_a_clone_and_its_float_path_is_itself():
    net = NNXMLP(nnx.Rngs(0))
    x = _sample((16, 7), seed=6)
    model = qevo.quantize_model(net, x)
    assert [(x.path, x.kind, x.kernel_shape, x.macs, x.signed) for x in model.layers] == [
        ("hidden", "dense", (7, 5), 35, True), ("out", "dense", (5, 3), 15, False)]
    assert net.hidden.dot_general is jax.lax.dot_general  # the user's network is left as built
    variables = qevo.init_variables(model, jax.random.key(0), (7,))
    net.eval()
    np.testing.assert_array_equal(model.apply(variables, x, None), net(x))


@pytest.mark.parametrize("w, a", [([8, 4], [8, 4]), ([2, 3], [4, 2])])
def test_nnx_quantized_forward_equals_numpy_fake_quantization(w, a):
    """Inference mode: BatchNorm normalizes with its running statistics (set here by hand)."""
    x = _sample((16, 7), seed=7)
    model = qevo.quantize_model(NNXMLP(nnx.Rngs(1)), x)
    variables = qevo.init_variables(model, jax.random.key(0), (7,))
    stats = {"mean": jnp.linspace(-0.5, 0.5, 5), "var": jnp.linspace(0.5, 2.0, 5)}
    variables = qevo.calibrate(model, {**variables, "batch_stats": {"norm": stats}}, x)
    got = np.asarray(model.apply(variables, x, Bits(w=jnp.asarray(w), a=jnp.asarray(a))))

    p = jax.tree.map(np.asarray, variables["params"])
    clip = np.asarray(variables["quant"]["a_clip"])
    h = np_quantize_activation(np.asarray(x), a[0], clip[0], signed=True)
    h = h @ np_quantize_weight(p["hidden"]["kernel"], w[0], True) + p["hidden"]["bias"]
    h = (h - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
    h = h * p["norm"]["scale"] + p["norm"]["bias"]
    h = np_quantize_activation(np.maximum(h, 0), a[1], clip[1], signed=False)
    want = h @ np_quantize_weight(p["out"]["kernel"], w[1], True) + p["out"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_nnx_training_mode_updates_batch_statistics():
    x = _sample((32, 7), seed=8)
    model = qevo.quantize_model(NNXMLP(nnx.Rngs(2)), x)
    variables = qevo.calibrate(model, qevo.init_variables(model, jax.random.key(0), (7,)), x)
    _, state = model.apply(variables, x, None, train=True, mutable=["batch_stats"])
    hidden = np.asarray(x) @ np.asarray(variables["params"]["hidden"]["kernel"]) + np.asarray(
        variables["params"]["hidden"]["bias"])
    # nnx.BatchNorm keeps 0.99 of its running mean (from 0) and adds 0.01 of the batch mean
    np.testing.assert_allclose(state["batch_stats"]["norm"]["mean"], 0.01 * hidden.mean(0), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_the_nnx_example_searches_on_real_mnist(data_dir, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "nnx_model.py"), "--data", str(data_dir),
                           "--tiny", "--workdir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    names = [line.split()[0] for line in done.stdout.splitlines()]
    assert {"w8a8", "w4a4", "w2a2", "float"} <= set(names) and any(n.startswith("front_") for n in names)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"] == "NNXNet" and results["evaluations"] == 8
