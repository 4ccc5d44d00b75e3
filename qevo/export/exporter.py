"""ONNX export of a finished run's model: ``python -m qevo.export --workdir RUN [--model NAME] --out FILE.onnx
[--verify]``.

``RUN`` is the work folder of ``qevo.search``, ``qevo.sharing``, ``qevo.coevolve`` or
``qevo.train``; ``NAME`` is

* for a search, a row of its ``final.csv`` (``front_03``, ``w4a4``, ``float``): the model
  trained in ``final/<name>/`` (``model.msgpack``) at that row's widths;
* for weight sharing, a codebook format of its ``compressed_<format>.msgpack`` files
  (default: the one the search used, ``sharing.codebook``), or ``float``;
* for a coevolution, ``coevolution`` (default: ``integer_model.msgpack``) or ``float``;
* for a training run, ``model`` (default), at the run's ``train.w_bits``/``a_bits``.

The graph (:func:`qevo.export.onnxgraph.build`) takes uint8 images ``[N, H, W, C]`` as the dataset
stores them and returns logits ``[N, classes]``: quantized weights as int8 levels (int16
above 8 bits) with per-channel scales, activations quantized at each layer's width and clip
range, shared kernels as uint8 indices gathered from their codebooks (onnxruntime runs the
``Gather``), BatchNorm folded. A coevolution's result, whose own forward pass is integer
arithmetic (:func:`qevo.quant.intforward.apply`), exports as that: its integer layers take
uint8/int8 activation levels into ``ConvInteger``/``MatMulInteger`` with the int8 kernel
levels and rescale the exact int32 sums per output channel, the BatchNorm after each
unfolded; the models of search, compress and train runs, whose forward pass is fake
quantization in float, dequantize (``QuantizeLinear``/``DequantizeLinear``) and sum in
float. Beside ``FILE.onnx``, ``FILE.json`` records the widths per
layer, BitOps, size in bits, how each kernel is stored, the source run and the test accuracy
qevo measured; with ``--verify`` also the onnxruntime test accuracy on the run's test split
and how many predictions match qevo's own forward pass.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qevo import checkpoint, methods
from qevo import config as config_lib
from qevo.data.datasets import Dataset, normalize
from qevo.errors import CheckpointError, ConfigError, QevoError
from qevo.harness import RESULTS, check_output, write_json
from qevo.models import cost
from qevo.models import inputs as model_inputs
from qevo.models.zoo import init_variables
from qevo.quant import intforward
from qevo.quant.interception import QevoModel
from qevo.quant.layers import Bits
from qevo.quant.quantizers import FLOAT_BITS
from qevo.sharing.codebook import CODEBOOK_BITS, SharedKernel, key_bits


def _needs(missing: list[str]) -> ConfigError:
    return ConfigError(f"exporting needs {' and '.join(missing)}: "
                       "pip install 'qevo[export]' (from a clone: pip install -e '.[export]')")


def _onnxgraph():
    """:mod:`qevo.export.onnxgraph`, imported when a model is exported or loaded for export, not with
    qevo: it needs onnx, an optional extra (without it, one line saying what to install)."""
    try:
        from qevo.export import onnxgraph
    except ModuleNotFoundError as err:
        if err.name != "onnx":
            raise
        raise _needs(["onnx"]) from None
    return onnxgraph


USAGE = ("usage: python -m qevo.export --workdir RUN [--model NAME] --out FILE.onnx [--verify] "
         "[--inputs FILE.py:FUNCTION (a run on a network of your own: FUNCTION() returns dict(model=..., data=...))]")


@dataclasses.dataclass
class Found:
    """A run's model, ready to export and to check.

    Attributes:
      method: the method that made it (a key of :data:`qevo.methods.METHODS`).
      name: the model's name in the run.
      model, variables: the qevo model and its float variables.
      bits: concrete int32 ``[L]`` widths, or ``None`` for a float network.
      kernels: ``{module path: IntKernel | SharedKernel}`` (:func:`qevo.export.onnxgraph.build`).
      arithmetic: ``"integer"`` where the model's own forward pass is
        :func:`qevo.quant.intforward.apply`'s integer arithmetic (a coevolution's result), else ``"float"``.
      test_accuracy: the test accuracy the run reported for this model.
      ds: the run's dataset (its test split is the one the run scored).
      forward: qevo's own logits of uint8 images ``[N, H, W, C]`` (jitted).
      table: the model's layer costs (:func:`qevo.models.cost.layer_table`).
    """

    method: str
    name: str
    model: QevoModel
    variables: dict
    bits: Bits | None
    kernels: dict
    arithmetic: str
    test_accuracy: float
    ds: Dataset
    forward: Callable
    table: cost.LayerTable


def _read_json(path: pathlib.Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: {what}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); rerun the command that wrote it") from e


def _fake_quant_forward(model, variables, bits, ds):
    b = None if bits is None else Bits(w=jnp.asarray(bits.w), a=jnp.asarray(bits.a))
    return jax.jit(lambda x: model.apply(variables, normalize(x, ds.mean, ds.std), b, train=False))


def binary_levels(kernel, per_channel: bool = True) -> intforward.IntKernel:
    """1-bit weights as :func:`qevo.quant.quantizers.quantize_weight` makes them: levels ``sign(w)``
    (int8) and scale ``mean|w|`` per output channel (or per tensor, repeated)."""
    kernel = np.asarray(kernel, np.float32)
    axes = tuple(range(kernel.ndim - 1)) if per_channel else tuple(range(kernel.ndim))
    scale = np.broadcast_to(np.mean(np.abs(kernel), axis=axes, keepdims=True), (1,) * (kernel.ndim - 1)
                            + kernel.shape[-1:]).reshape(-1)
    return intforward.IntKernel(q=np.sign(kernel).astype(np.int8), scale=scale.astype(np.float32))


def quantized_kernels(model, variables: dict, bits: Bits, per_channel: bool = True,
                      mode: str = "absmax") -> dict[str, intforward.IntKernel]:
    """Integer levels of every layer whose weight width is below 32, equal (levels times
    scale) to :func:`qevo.quant.quantizers.quantize_weight`'s fake quantization: ``sign(w) * mean|w|``
    at 1 bit, :func:`qevo.quant.intforward.weight_levels` at 2..16 bits.

    Raises:
      ConfigError: ``mode="dorefa"`` (its weights are not symmetric levels times a
        per-channel scale of the kernel), or a width above 16 bits.
    """
    if mode not in intforward.WEIGHT_MODES:
        raise ConfigError(f"quant.mode={mode!r}: the export stores weights as symmetric integer levels, "
                          f"which needs one of {intforward.WEIGHT_MODES}")
    _onnxgraph().opset_for(bits)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    w = np.asarray(bits.w)
    out = {}
    for path, i in intforward.quantized_layers(model).items():
        kernel = flat[f"{path}/kernel"]
        if w[i] == 1:
            out[path] = binary_levels(kernel, per_channel)
        elif w[i] < FLOAT_BITS:
            out[path] = jax.device_get(intforward.weight_levels(jnp.asarray(kernel), int(w[i]), per_channel, mode))
    return out


def load(workdir, name: str | None = None, *, model=None, data: Dataset | None = None) -> Found:
    """The model ``name`` of the finished run in ``workdir`` (default: the run's single result).

    A run made from Python with a network and data of one's own (``model=``, ``data=`` of
    its method) loads with the same ``model=`` and ``data=`` here.

    Raises:
      CheckpointError: ``workdir`` is not a finished qevo run folder, or its files are
        missing or corrupt.
      ConfigError: ``name`` is not one of the run's models, or the run was made with a
        network of one's own and ``model=`` is missing.
    """
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise CheckpointError(f"--workdir {workdir} is not a folder; pass the work folder of a finished run")
    method, cfg = methods.of_run(workdir)
    results = _read_json(workdir / RESULTS,
                         f"its qevo.{method.name} run has not finished; rerun it with this --workdir")
    available = method.models(workdir, cfg)
    if name is None and method.several:
        raise ConfigError(f"a qevo.{method.name} run holds several models: pass --model, one of {', '.join(available)}")
    name = available[0] if name is None else name
    if name not in available:
        raise ConfigError(f"--model {name!r} is not a model of this qevo.{method.name} run; choose one of "
                          + ", ".join(available))
    if model is None and results.get("model", cfg.model.name) != cfg.model.name:
        raise ConfigError(f"{workdir} was made from Python with a network of your own ({results['model']}); "
                          "pass --inputs FILE.py:FUNCTION, a function that returns dict(model=..., data=...) with the "
                          f"run's network and data (from Python: qevo.export_onnx({str(workdir)!r}, name, out, "
                          "model=..., data=...))")
    inputs = model_inputs.resolve_inputs(cfg, model, None, data)
    ds, model = inputs.ds, inputs.model
    shape = ds.train_images.shape[1:]
    template = init_variables(model, jax.random.key(cfg.seed), shape)
    stored = method.load(workdir, cfg, name, model, template, results)
    variables, bits, kernels, arithmetic = stored.variables, stored.bits, stored.kernels, stored.arithmetic
    if bits is not None and not kernels:
        kernels = quantized_kernels(model, variables, bits, cfg.quant.per_channel, cfg.quant.mode)
    if arithmetic == "integer":
        assert bits is not None  # an integer model has its widths
        b = Bits(w=jnp.asarray(bits.w), a=jnp.asarray(bits.a))
        k = jax.tree_util.tree_map(jnp.asarray, kernels)
        forward = jax.jit(lambda x: intforward.apply(model, variables, k, b, normalize(x, ds.mean, ds.std)))
    else:
        forward = _fake_quant_forward(model, variables, bits, ds)
    return Found(method.name, name, model, variables, bits, kernels, arithmetic, stored.test_accuracy, ds, forward,
                 cost.layer_table(model, variables, shape))


def size_bits(found: Found) -> float:
    """Size in bits: :func:`qevo.models.cost.size_bits`, or for shared kernels their keys and
    codebooks (``n * b_key + k * (b_codebook + b_key)``, :mod:`qevo.sharing.codebook`) plus 32 bits
    per other parameter."""
    shared = [k for k in found.kernels.values() if isinstance(k, SharedKernel)]
    if shared:
        bits = CODEBOOK_BITS[found.name]
        stored = sum(int(k.indices.size) * int(key_bits(len(k.codebook)))
                     + len(k.codebook) * (bits + int(key_bits(len(k.codebook)))) for k in shared)
        return float(stored + FLOAT_BITS * found.table.other_params)
    w = np.full(found.table.num_layers, FLOAT_BITS) if found.bits is None else np.asarray(found.bits.w)
    return float(cost.size_bits(found.table, w))


def storage(kernel, arithmetic: str = "float") -> str:
    """How a layer's kernel is stored in the ONNX file and what computes with it."""
    if isinstance(kernel, intforward.IntKernel) and arithmetic == "integer":
        op = "ConvInteger" if np.ndim(kernel.q) == 4 else "MatMulInteger"
        return (f"{np.dtype(kernel.q.dtype).name} levels times the activation levels ({op}, exact int32 sums), "
                "float32 rescale per output channel")
    if isinstance(kernel, intforward.IntKernel):
        return f"{np.dtype(kernel.q.dtype).name} levels, float32 scale per output channel (DequantizeLinear)"
    if isinstance(kernel, SharedKernel):
        return (f"{np.dtype(kernel.indices.dtype).name} indices into a {len(kernel.codebook)}-entry float32 "
                "codebook (Cast + Gather, run by onnxruntime)")
    return "float32"


def verify(found: Found, path, batch_size: int = 1000) -> dict:
    """onnxruntime on the run's test split against qevo's own forward pass: both accuracies,
    the share of images whose predicted class agrees, and the largest logit difference."""
    images, labels = found.ds.test_images, found.ds.test_labels
    ours = np.concatenate([np.asarray(found.forward(jnp.asarray(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])
    theirs = _onnxgraph().run(path, images, batch_size)
    return {
        "images": len(labels),
        "onnxruntime_test_accuracy": float(np.mean(np.argmax(theirs, -1) == labels)),
        "qevo_forward_test_accuracy": float(np.mean(np.argmax(ours, -1) == labels)),
        "reported_test_accuracy": found.test_accuracy,
        "prediction_agreement": float(np.mean(np.argmax(theirs, -1) == np.argmax(ours, -1))),
        "max_abs_logit_difference": float(np.max(np.abs(theirs - ours))),
    }


def export(workdir, name: str | None = None, out="model.onnx", check: bool = False, *, model=None,
           data: Dataset | None = None) -> dict:
    """Export model ``name`` of the finished run in ``workdir`` to ``out`` (ONNX) and write
    ``out`` with suffix ``.json`` beside it.

    Args:
      workdir (str | os.PathLike): the work folder of a qevo.search, qevo.sharing, qevo.coevolve or qevo.train run.
      name: a name of :func:`names` (default: the run's single result; a search needs one).
      out (str | os.PathLike): the ``.onnx`` path.
      check: also run the ONNX model in onnxruntime on the run's test split (:func:`verify`).
      model (flax.linen.Module | flax.nnx.Module | None): the network of one's own that the run was made
        with (:func:`load`).
      data: the data of one's own that the run was made with.

    Returns:
      The JSON record: source, file, opset, widths and storage per layer, BitOps, size in
      bits, qevo's test accuracy (and the verification with ``check``).

    Raises:
      CheckpointError, ConfigError: see :func:`load`; CheckpointError also where ``out``
        cannot be written (checked first, :func:`qevo.harness.check_output`).
    """
    missing = [name for name, needed in (("onnx", True), ("onnxruntime", check))
               if needed and importlib.util.find_spec(name) is None]
    if missing:
        raise _needs(missing)
    onnxgraph = _onnxgraph()
    out = check_output(pathlib.Path(out), "--out")
    found = load(workdir, name, model=model, data=data)
    shape = found.ds.train_images.shape[1:]
    proto = onnxgraph.build(found.model, found.variables, found.bits, found.kernels, shape, found.ds.mean,
                            found.ds.std, name=f"{found.method}_{found.name}", arithmetic=found.arithmetic)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_bytes(out, proto.SerializeToString())
    L = found.model.num_layers
    w = [FLOAT_BITS] * L if found.bits is None else np.asarray(found.bits.w).tolist()
    a = [FLOAT_BITS] * L if found.bits is None else np.asarray(found.bits.a).tolist()
    paths = intforward.quantized_layers(found.model)
    record = {
        "source": {"workdir": str(pathlib.Path(workdir).resolve()), "command": f"qevo.{found.method}",
                   "model": found.name},
        "file": out.name,
        "bytes": out.stat().st_size,
        "opset": proto.opset_import[0].version,
        "input": {"name": "images", "dtype": "uint8", "shape": ["N", *shape]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", found.ds.num_classes]},
        "w_bits": w,
        "a_bits": a,
        "layers": [{"path": p, "name": found.model.layer_names[i], "w_bits": w[i], "a_bits": a[i],
                    "weights": storage(found.kernels.get(p), found.arithmetic)} for p, i in paths.items()],
        "bitops": float(cost.bitops(found.table, np.asarray(w), np.asarray(a))),
        "size_bits": size_bits(found),
        "test_accuracy": found.test_accuracy,
    }
    if check:
        record["verification"] = verify(found, out)
    write_json(out.with_suffix(".json"), record)
    return record


def user_inputs(spec: str) -> dict:
    """``--inputs FILE.py:FUNCTION``: the ``model=`` and ``data=`` that ``FUNCTION()`` returns
    (a dict with either or both), for a run made from Python with a network of one's own."""
    inputs = config_lib.load_function(spec, "--inputs")()
    if not isinstance(inputs, dict) or not inputs or set(inputs) - {"model", "data"}:
        raise ConfigError(f"--inputs {spec}: the function returned {type(inputs).__name__} "
                          f"{sorted(inputs) if isinstance(inputs, dict) else ''}; return dict(model=..., data=...)")
    return inputs


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``--workdir``, ``--model``, ``--out``, ``--inputs`` (``--key value`` or ``--key=value``) and ``--verify``."""
    args = list(argv)
    found: dict[str, Any] = {"verify": False}
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if "=" in arg:
            arg, value = arg.split("=", 1)
            args.insert(0, value)
        if arg == "--verify":
            found["verify"] = True
        elif arg in ("--workdir", "--model", "--out", "--inputs") and args:
            found[arg[2:]] = args.pop(0)
        else:
            raise ConfigError(f"unexpected argument {arg!r}; {USAGE}")
    for key in ("workdir", "out"):
        if key not in found:
            raise ConfigError(f"--{key} is required; {USAGE}")
    return found


def main(argv: list[str] | None = None) -> int:
    """The command: export, print the JSON record; a user error is one line and exit status 2."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        record = export(args["workdir"], args.get("model"), args["out"], check=args["verify"],
                        **(user_inputs(args["inputs"]) if "inputs" in args else {}))
    except QevoError as e:
        print(f"qevo.export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2, sort_keys=True))
    return 0

