"""ONNX export: the graph of each model kind against qevo's own forward pass in
onnxruntime, tiny runs of every command exported end to end, and one-line user errors."""


import json
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import traverse_util
from onnx import numpy_helper

from helpers import REPO, run_main
from qevo import harness
from qevo.data.datasets import normalize
from qevo.errors import CheckpointError, ConfigError, ExportError
from qevo.export import exporter, onnxgraph
from qevo.models.zoo import get_model, init_variables
from qevo.quant import intforward
from qevo.quant.interception import quantize
from qevo.quant.layers import BatchNorm, Bits, QuantOptions
from qevo.sharing import clusters

MEAN, STD = (0.45, 0.5, 0.55), (0.2, 0.25, 0.3)


class TinyMobile(nn.Module):
    """The pieces of MobileNetV2 on a small input: a stride-2 SAME stem (odd padding), an
    inverted residual (1x1 expansion, depthwise 3x3, 1x1 projection with a bias, residual
    add), ReLU6, BatchNorm, global mean, classifier: a plain Flax network."""

    @nn.compact
    def __call__(self, x, train=False):
        bn = lambda: BatchNorm(use_running_average=not train)  # noqa: E731
        x = nn.relu6(bn()(nn.Conv(8, (3, 3), (2, 2), use_bias=False)(x)))
        y = nn.relu6(bn()(nn.Conv(16, (1, 1), use_bias=False)(x)))
        y = nn.relu6(bn()(nn.Conv(16, (3, 3), feature_group_count=16, use_bias=False)(y)))
        y = bn()(nn.Conv(8, (1, 1))(y))
        x = jnp.mean(x + y, axis=(1, 2))
        return nn.Dense(10)(x)


def _mobile(mode="absmax"):
    return quantize(TinyMobile(), np.random.default_rng(0).normal(size=(2, 9, 9, 3)),
                    options=QuantOptions(conv="xla", mode=mode))


def _zoo(name, shape, mode="absmax", **kwargs):
    return get_model(name, 10, QuantOptions(conv="xla", mode=mode), shape, **kwargs)


def _randomized(variables, seed):
    """Variables with random BatchNorm statistics and scales (some negative) and clips."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, v: (rng.uniform(0.5, 1.5, v.shape) if "var" in str(path) or "a_clip" in str(path)
                         else rng.normal(0, 0.3, v.shape) if "mean" in str(path) or "bias" in str(path)
                         else rng.normal(1, 0.6, v.shape) if "scale" in str(path) else v).astype(np.float32),
        jax.device_get(variables))


def _matches_the_quantizers(theirs, ours, unquantized, tolerance):
    """Logits ``theirs`` within ``tolerance`` (relative to each image's largest logit) of
    ``ours`` (qevo's fake quantization) and ten times nearer to them than to the network
    without quantization. Where several quantized layers follow each other, an activation
    on a rounding boundary of a quantizer may round to the neighbouring level (the two
    programs sum in different orders), which the later low-width layers amplify."""
    error = np.abs(theirs - ours).max(axis=1)
    scale = np.abs(ours).max(axis=1)
    gap = np.abs(unquantized - ours).max(axis=1)
    assert np.all(error <= tolerance * scale), np.max(error / scale)
    assert np.all(error <= 0.1 * gap), np.max(error / gap)


CASES = {
    # model, image shape, weight widths, activation widths (1, 2, 8, 16 bits, float layers), tolerance
    "lenet5": (lambda: _zoo("lenet5", (28, 28, 1)), (28, 28, 1), [32, 2, 8, 1, 32], [32, 2, 4, 8, 8], 1e-2),
    "lenet5_tanh": (lambda: _zoo("lenet5", (28, 28, 1), "mse", activation="tanh"), (28, 28, 1),
                    [32, 4, 2, 3, 8], [8, 1, 2, 3, 4], 1e-4),
    "resnet8": (lambda: _zoo("resnet8", (12, 12, 3)), (12, 12, 3),
                [32, 2, 4, 8, 2, 4, 8, 32], [32, 4, 8, 2, 4, 8, 2, 32], 5e-2),
    "resnet8_16bit": (lambda: _zoo("resnet8", (12, 12, 3)), (12, 12, 3),
                      [16, 4, 16, 8, 2, 4, 8, 16], [16, 8, 16, 2, 4, 8, 2, 16], 5e-2),
    "mobile": (_mobile, (9, 9, 3), [8, 4, 2, 8, 32], [8, 4, 2, 8, 32], 1e-4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_matches_the_fake_quantized_forward(case):
    make, shape, w, a, tolerance = CASES[case]
    model = make()
    channels = shape[-1]
    mean, std = MEAN[:channels], STD[:channels]
    variables = _randomized(init_variables(model, jax.random.key(1), shape), 2)
    bits = Bits(w=np.array(w, np.int32), a=np.array(a, np.int32))
    kernels = exporter.quantized_kernels(model, variables, bits, mode=model.options.mode)
    proto = onnxgraph.build(model, variables, bits, kernels, shape, mean, std)
    images = np.random.default_rng(3).integers(0, 256, (16, *shape), dtype=np.uint8)
    ours = model.apply(variables, normalize(images, mean, std), Bits(w=jnp.asarray(w), a=jnp.asarray(a)))
    theirs = onnxgraph.run(proto, images)
    assert theirs.shape == ours.shape
    unquantized = model.apply(variables, normalize(images, mean, std), None)
    _matches_the_quantizers(theirs, np.asarray(ours), np.asarray(unquantized), tolerance)
    assert proto.opset_import[0].version == (21 if "16bit" in case else 13)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    stored = onnxgraph.level_count(proto)
    assert stored.get("int16" if "16bit" in case else "int8", 0) > 0


INTEGER_CASES = {
    # model, image shape, weight widths, activation widths: every layer integer (a signed
    # 8-bit input first, 4- and 2-bit activations after, 1x1 projection shortcuts, BatchNorm
    # after each convolution, a dense layer last); LeNet-5 with tanh (signed inputs, biases);
    # the MobileNetV2 pieces (a depthwise convolution, a bias before a BatchNorm)
    "resnet8": (lambda: _zoo("resnet8", (12, 12, 3)), (12, 12, 3),
                [8, 4, 2, 4, 2, 4, 2, 8], [8, 4, 2, 4, 4, 2, 4, 8]),
    "lenet5_tanh": (lambda: _zoo("lenet5", (28, 28, 1), activation="tanh"), (28, 28, 1),
                    [8, 4, 2, 3, 8], [8, 2, 4, 3, 8]),
    "mobile": (_mobile, (9, 9, 3), [8, 4, 2, 4, 8], [8, 4, 2, 4, 8]),
}


@pytest.mark.parametrize("case", sorted(INTEGER_CASES))
def test_integer_graph_is_qevos_integer_forward(case):
    """The integer graph against the oracle, :func:`qevo.quant.intforward.apply` in integer
    arithmetic, jitted as ``exporter.load`` runs it: the same predictions and logits."""
    make, shape, w, a = INTEGER_CASES[case]
    model = make()
    mean, std = MEAN[:shape[-1]], STD[:shape[-1]]
    variables = _randomized(init_variables(model, jax.random.key(1), shape), 8)
    bits = Bits(w=np.array(w, np.int32), a=np.array(a, np.int32))
    layers = intforward.quantized_layers(model)
    kernels = jax.device_get(intforward.integer_kernels(variables, layers, w))
    proto = onnxgraph.build(model, variables, bits, kernels, shape, mean, std, arithmetic="integer")
    images = np.random.default_rng(9).integers(0, 256, (32, *shape), dtype=np.uint8)
    oracle = jax.jit(lambda x: intforward.apply(model, variables, kernels, Bits(jnp.asarray(w), jnp.asarray(a)),
                                                normalize(x, mean, std)))
    ours, theirs = np.asarray(oracle(images)), onnxgraph.run(proto, images)
    np.testing.assert_array_equal(theirs.argmax(-1), ours.argmax(-1))
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6 * np.abs(ours).max())
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("ConvInteger") + ops.count("MatMulInteger") == len(layers)
    assert not {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} & set(ops)
    levels = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(levels) == len(layers)  # one int8 kernel per layer, in call order, OIHW or [in, out]
    for (path, i), q in zip(layers.items(), levels, strict=True):
        want = np.asarray(kernels[path].q)
        np.testing.assert_array_equal(q, want.transpose(3, 2, 0, 1) if want.ndim == 4 else want)
        assert np.abs(q).max() <= intforward.max_level(w[i])


def test_integer_graph_refuses_activations_the_integer_forward_pass_lacks():
    make, shape, w, _ = INTEGER_CASES["lenet5_tanh"]
    model = make()
    variables = init_variables(model, jax.random.key(0), shape)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    kernels = {p: intforward.IntKernel(q=np.ones(flat[f"{p}/kernel"].shape, np.int8),
                                       scale=np.ones(flat[f"{p}/kernel"].shape[-1], np.float32))
               for p in intforward.quantized_layers(model)}
    bits = Bits(w=np.array(w, np.int32), a=np.array([8, 16, 4, 3, 8], np.int32))
    with pytest.raises(ConfigError, match=r"QConv_1 has 16-bit activations .* takes 2\.\.8-bit activations"):
        onnxgraph.build(model, variables, bits, kernels, shape, (0.1,), (0.3,), arithmetic="integer")


def test_float_graph_folds_batch_norm_and_keeps_no_quantizer():
    model, shape = _mobile(), CASES["mobile"][1]
    variables = _randomized(init_variables(model, jax.random.key(1), shape), 4)
    proto = onnxgraph.build(model, variables, None, {}, shape, MEAN, STD)
    images = np.random.default_rng(5).integers(0, 256, (4, *shape), dtype=np.uint8)
    np.testing.assert_allclose(onnxgraph.run(proto, images),
                               model.apply(variables, normalize(images, MEAN, STD), None), rtol=1e-4, atol=1e-4)
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("Conv") == 4
    # every BatchNorm right after a convolution folds into it; the one after the projection's
    # bias (the model's own addition) stays a Mul and an Add
    assert ops.count("Mul") == 1


def test_shared_kernels_are_gathered_from_their_codebooks():
    model, shape = _zoo("lenet5", (28, 28, 1)), (28, 28, 1)
    variables = _randomized(init_variables(model, jax.random.key(0), shape), 6)
    paths = clusters.kernel_paths(variables["params"])
    rng = np.random.default_rng(7)
    kernels, expanded = {}, variables
    for p, kernel in zip(paths, clusters.get_kernels(variables["params"], paths), strict=True):
        codebook = rng.normal(0, 0.2, 5).astype(np.float32)
        indices = rng.integers(0, 5, kernel.shape).astype(np.uint8)
        kernels[clusters.layer_name(p[:-1])] = onnxgraph.SharedKernel(indices, codebook)
    expanded = clusters.with_kernels(variables, paths, [k.codebook[k.indices] for k in kernels.values()])
    proto = onnxgraph.build(model, variables, None, kernels, shape, (0.1,), (0.3,))
    images = rng.integers(0, 256, (4, *shape), dtype=np.uint8)
    np.testing.assert_allclose(onnxgraph.run(proto, images),
                               model.apply(expanded, normalize(images, (0.1,), (0.3,)), None), rtol=1e-4, atol=1e-4)
    assert {"Gather"} <= {n.op_type for n in proto.graph.node}
    assert onnxgraph.level_count(proto).get("uint8", 0) == sum(int(np.size(k.indices)) for k in kernels.values())


def test_an_operation_without_an_onnx_form_is_refused_in_one_line():
    class Sine(nn.Module):  # a model of one's own: a dense layer, then an operation the export lacks
        @nn.compact
        def __call__(self, x):
            return jnp.sin(nn.Dense(3)(x.reshape((x.shape[0], -1))))

    model = quantize(Sine(), np.ones((2, 2, 2, 1), np.float32), options=QuantOptions(conv="xla"))
    variables = init_variables(model, jax.random.key(0), (2, 2, 1))
    with pytest.raises(ExportError, match="uses the JAX operation 'sin', which the export has no ONNX form for"):
        onnxgraph.build(model, variables, None, {}, (2, 2, 1), (0.5,), (0.2,))


def test_widths_above_16_bits_are_refused():
    with pytest.raises(ValueError, match=r"widths \[24\] have no ONNX integer type"):
        onnxgraph.opset_for(Bits(w=np.array([32, 24, 8]), a=np.array([32, 8, 8])))


# ------------------------------------------------------------------ tiny runs, end to end

SMALL_DATA = ["--config.data.max_train_images=3000"]
RUNS = {
    "search": ("qevo.search", "lenet5.py", ["--config.population_size=4", "--config.generations=1",
                                             "--config.search.qat_steps=2", "--config.search.eval_images=300",
                                             "--config.final.max_models=1"]),
    "sharing": ("qevo.sharing", "lenet5_sharing.py", ["--config.population_size=4", "--config.generations=1",
                                                         "--config.sharing.k_max=8", "--config.sharing.refine=False",
                                                         "--config.sharing.report_formats=('float32','int8')"]),
    "coevolve": ("qevo.coevolve", "lenet5_cc.py", ["--config.coevolve.w_bits=2", "--config.coevolve.cycles=1",
                                                    "--config.coevolve.num_groups=2", "--config.coevolve.group_size=64",
                                                    "--config.coevolve.population_size=4",
                                                    "--config.coevolve.batch_size=64",
                                                    "--config.coevolve.eval_images=300",
                                                    "--config.coevolve.qat=False"]),
}


@pytest.fixture(scope="module")
def runs(tiny_lenet5_float, data_dir, tmp_path_factory):
    """A tiny finished run of each method from the same float model (scored on the whole test split)."""
    folders = {"train": tiny_lenet5_float}
    for kind, (module, config, args) in RUNS.items():
        folder = tmp_path_factory.mktemp(kind) / "run"
        status, stderr = run_main(module, config, folder,
                                  [f"--config.float_from={tiny_lenet5_float}", *SMALL_DATA, *args], data_dir)
        assert status == 0, stderr[-3000:]
        folders[kind] = folder
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("kind, name, storage", [
    ("search", "front_00", "int8 levels"),
    ("search", "w2a2", "int8 levels"),
    ("search", "float", "float32"),
    ("sharing", None, "uint8 indices into a"),
    ("sharing", "int8", "uint8 indices into a"),
    ("coevolve", None, "int8 levels"),
    ("train", None, "float32"),
])
def test_each_kind_of_run_exports_and_runs_in_onnxruntime(runs, kind, name, storage, tmp_path):
    out = tmp_path / "model.onnx"
    record = exporter.export(runs[kind], name, out, check=True)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(record))
    check = record["verification"]
    assert check["images"] == 10000
    assert check["prediction_agreement"] >= 0.99
    assert abs(check["onnxruntime_test_accuracy"] - record["test_accuracy"]) <= 0.005
    assert abs(check["qevo_forward_test_accuracy"] - record["test_accuracy"]) <= 0.001
    assert record["source"]["command"] == f"qevo.{kind}" and record["bytes"] == out.stat().st_size
    quantized = [layer for layer in record["layers"] if layer["w_bits"] < 32]
    assert all(layer["weights"].startswith(storage) for layer in (quantized or record["layers"][1:4]))
    if name == "w2a2":
        assert record["w_bits"] == record["a_bits"] == [32, 2, 2, 2, 32]
        assert record["size_bits"] < 0.2 * exporter.export(runs[kind], "float", tmp_path / "f.onnx")["size_bits"]


def test_the_python_function_is_the_api_one():
    import qevo

    assert qevo.export_onnx is exporter.export


def _command(args):
    return subprocess.run([sys.executable, "-m", "qevo.export", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, check=False)


@pytest.mark.slow
def test_the_command_writes_the_model_and_prints_its_record(runs, tmp_path):
    done = _command(["--workdir", str(runs["coevolve"]), "--out", str(tmp_path / "cc.onnx")])
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert record == json.loads((tmp_path / "cc.json").read_text())
    assert record["source"]["model"] == "coevolution" and record["w_bits"] == [32, 2, 2, 2, 32]
    assert "verification" not in record and (tmp_path / "cc.onnx").stat().st_size == record["bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("unknown_name", "--model 'front_99' is not a model of this qevo.search run; choose one of front_00"),
    ("no_name", "a qevo.search run holds several models: pass --model, one of front_00"),
    ("model_folder", "has no config.json: it is not the work folder of a qevo run"),
    ("missing", "is not a folder; pass the work folder of a finished run"),
    ("bad_flag", "unexpected argument '--modle'"),
])
def test_bad_input_is_one_line_and_status_2(runs, tmp_path, case, message):
    search = runs["search"]
    args = {
        "unknown_name": ["--workdir", str(search), "--model", "front_99"],
        "no_name": ["--workdir", str(search)],
        "model_folder": ["--workdir", str(search / "final" / "w2a2"), "--model", "w2a2"],
        "missing": ["--workdir", str(tmp_path / "nowhere")],
        "bad_flag": ["--workdir", str(search), "--modle", "w2a2"],
    }[case]
    done = _command([*args, "--out", str(tmp_path / "x.onnx")])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qevo.export: error: ") and message in lines[0], done.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("source, spec, message", [
    (None, "inputs.py", "--inputs 'inputs.py' must look like path/to/file.py:function"),
    (None, "absent.py:inputs", "the file absent.py does not exist"),
    ("x = 1\n", "inputs.py:inputs", "inputs.py defines no function inputs()"),
    ("import nowhere_at_all\n", "inputs.py:inputs", "failed to load: ModuleNotFoundError"),
    ("def inputs():\n    return 3\n", "inputs.py:inputs", "the function returned int ; return dict(model=..."),
    ("def inputs():\n    return {'modle': 1}\n", "inputs.py:inputs", "returned dict ['modle']; return dict("),
])
def test_inputs_of_ones_own_network_are_checked_in_one_line(source, spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / "inputs.py").write_text(source)
    with pytest.raises(ConfigError, match=re.escape(message)):
        exporter.user_inputs(spec)


def test_inputs_import_the_modules_beside_their_file(tmp_path):
    (tmp_path / "helper_beside.py").write_text("MODEL = 'the model'\n")
    (tmp_path / "inputs.py").write_text("import helper_beside\n\n"
                                        "def inputs():\n    return {'model': helper_beside.MODEL}\n")
    assert exporter.user_inputs(f"{tmp_path / 'inputs.py'}:inputs") == {"model": "the model"}


@pytest.mark.slow
def test_a_search_rerun_writes_the_model_files_finished_models_lack(runs, tiny_lenet5_float, data_dir):
    """Rerunning a finished search in its folder: a final model finished by an earlier qevo
    (one after another, with its own training checkpoint) before model.msgpack was saved gets
    it from that checkpoint, without training; one whose model.msgpack is otherwise gone is
    trained again, alone now (it trained side by side with the others before), to the same bytes."""
    import ml_collections

    from qevo import checkpoint
    from qevo.harness import CHECKPOINT
    from qevo.search import config as search_config
    from qevo.search import final as search_final
    from qevo.train import trainer as training

    final = runs["search"] / "final"
    trained = {name: (final / name / "model.msgpack").read_bytes() for name in ("w2a2", "w4a4")}
    found = exporter.load(runs["search"], "w2a2")
    saved = ml_collections.ConfigDict(harness.read_config(runs["search"] / "config.json")[1])
    fcfg = search_final.final_config(search_config.validate(saved))
    trainer = training.Trainer(fcfg, found.ds, found.model, quantized=True)
    checkpoint.save(final / "w2a2" / CHECKPOINT, trainer.init_state(found.variables), {})
    for name in trained:
        (final / name / "model.msgpack").unlink()
    with pytest.raises(CheckpointError, match=r"rerun `python -m qevo.search` with the same --workdir"):
        exporter.load(runs["search"], "w2a2")
    module, config, args = RUNS["search"]
    status, stderr = run_main(module, config, runs["search"],
                              [f"--config.float_from={tiny_lenet5_float}", *SMALL_DATA, *args], data_dir)
    assert status == 0, stderr[-3000:]
    assert "final/checkpoint.msgpack holds other models; training these afresh" in stderr  # w4a4 alone
    assert stderr.count("epoch   1/1") == 1
    for name, model in trained.items():
        assert (final / name / "model.msgpack").read_bytes() == model, name


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, where):
    """Checked first: the run folder (missing here) is not even read."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out, reason = {"under_a_file": (a_file / "x.onnx", f"{a_file} is a file"),
                   "proc": (pathlib.Path("/proc/qevo/x.onnx"), "no file can be made in /proc: ")}[where]
    done = _command(["--workdir", str(tmp_path / "nowhere"), "--out", str(out)])
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"qevo.export: error: --out {out} cannot be written ({reason}")
    assert done.stderr.endswith("); pass a file path you can write to\n") and done.stderr.count("\n") == 1, done.stderr
    assert a_file.read_text() == "x"


def test_without_the_export_extra_the_answer_is_one_line(monkeypatch, tmp_path):
    """As when onnx is not installed: the command says what to install, and so does loading
    a quantized model for export, which imports qevo.export.onnxgraph (and onnx) only then."""
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.delitem(sys.modules, "qevo.export.onnxgraph")
    monkeypatch.delattr("qevo.export.onnxgraph")
    needs = r"exporting needs onnx: pip install 'qevo\[export\]'"
    with pytest.raises(ConfigError, match=needs):
        exporter.export(tmp_path, None, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ConfigError, match=needs):
        exporter.quantized_kernels(get_model("lenet5", 10), {"params": {}}, Bits(w=np.full(5, 4), a=np.full(5, 8)))
