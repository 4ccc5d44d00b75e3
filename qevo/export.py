"""ONNX export of a finished run's model: ``python -m qevo.export --workdir RUN [--model NAME] --out FILE.onnx
[--verify]``.

``RUN`` is the work folder of ``qevo.search``, ``qevo.compress``, ``qevo.coevolve`` or
``qevo.train``; ``NAME`` is

* for a search, a row of its ``final.csv`` (``front_03``, ``w4a4``, ``float``): the model
  trained in ``final/<name>/`` (``model.msgpack``) at that row's widths;
* for weight sharing, a codebook format of its ``compressed_<format>.msgpack`` files
  (default: the one the search used, ``sharing.codebook``), or ``float``;
* for a coevolution, ``coevolution`` (default: ``integer_model.msgpack``) or ``float``;
* for a training run, ``model`` (default), at the run's ``train.w_bits``/``a_bits``.

The graph (:func:`qevo.onnxgraph.build`) takes uint8 images ``[N, H, W, C]`` as the dataset
stores them and returns logits ``[N, classes]``: quantized weights as int8 levels (int16
above 8 bits) with per-channel scales, activations quantized at each layer's width and clip
range, shared kernels as uint8 indices gathered from their codebooks (onnxruntime runs the
``Gather``), BatchNorm folded. A coevolution's result, whose own forward pass is integer
arithmetic (:func:`qevo.intforward.apply`), exports as that: its integer layers take
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
import ml_collections
import numpy as np
from flax import serialization, traverse_util

from qevo import checkpoint, coevolve, compress, cost, intforward, search, sharing, train
from qevo import config as config_lib
from qevo.codebook import CODEBOOK_BITS, key_bits
from qevo.data import Dataset, normalize
from qevo.errors import CheckpointError, ConfigError, QevoError
from qevo.harness import CONFIG, MODEL, RESULTS, check_output, fill_defaults, read_rows, write_json
from qevo.interception import QevoModel
from qevo.layers import Bits
from qevo.models import init_variables
from qevo.quant import FLOAT_BITS


def _needs(missing: list[str]) -> ConfigError:
    return ConfigError(f"exporting needs {' and '.join(missing)}: "
                       "pip install 'qevo[export]' (from a clone: pip install -e '.[export]')")


def _onnxgraph():
    """:mod:`qevo.onnxgraph`, imported when a model is exported or loaded for export, not with
    qevo: it needs onnx, an optional extra (without it, one line saying what to install)."""
    try:
        from qevo import onnxgraph
    except ModuleNotFoundError as err:
        if err.name != "onnx":
            raise
        raise _needs(["onnx"]) from None
    return onnxgraph


KINDS = {"search": "qevo.search", "compress": "qevo.compress", "coevolve": "qevo.coevolve", "train": "qevo.train"}
# Each command's keys and defaults: a run begun before a key existed reads it at its default.
DEFAULTS = {"search": search.defaults, "compress": compress.defaults, "coevolve": coevolve.defaults,
            "train": config_lib.defaults}
USAGE = ("usage: python -m qevo.export --workdir RUN [--model NAME] --out FILE.onnx [--verify] "
         "[--inputs FILE.py:FUNCTION (a run on a network of your own: FUNCTION() returns dict(model=..., data=...))]")


@dataclasses.dataclass
class Found:
    """A run's model, ready to export and to check.

    Attributes:
      kind: the command that made it (a key of :data:`KINDS`).
      name: the model's name in the run.
      model, variables: the qevo model and its float variables.
      bits: concrete int32 ``[L]`` widths, or ``None`` for a float network.
      kernels: ``{module path: IntKernel | SharedKernel}`` (:func:`qevo.onnxgraph.build`).
      arithmetic: ``"integer"`` where the model's own forward pass is
        :func:`qevo.intforward.apply`'s integer arithmetic (a coevolution's result), else ``"float"``.
      test_accuracy: the test accuracy the run reported for this model.
      ds: the run's dataset (its test split is the one the run scored).
      forward: qevo's own logits of uint8 images ``[N, H, W, C]`` (jitted).
      table: the model's layer costs (:func:`qevo.cost.layer_table`).
    """

    kind: str
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


def run_kind(cfg: dict) -> str:
    """The command of a run from its resolved config: the section only that command has."""
    for kind, section in (("search", "search"), ("compress", "sharing"), ("coevolve", "coevolve")):
        if section in cfg:
            return kind
    return "train"


def _rows(workdir: pathlib.Path) -> dict[str, dict]:
    path = workdir / "final.csv"
    if not path.is_file():
        raise CheckpointError(f"{workdir} holds no final.csv: the search has not finished its final training "
                              "(rerun it, with --config.final.enabled=True)")
    return read_rows(path)


def names(workdir: pathlib.Path, kind: str, cfg: ml_collections.ConfigDict) -> list[str]:
    """The names ``--model`` takes for this run (the first is the default where there is one)."""
    if kind == "search":
        return list(_rows(workdir))
    if kind == "compress":
        found = [f for f in CODEBOOK_BITS if (workdir / f"compressed_{f}.msgpack").is_file()]
        first = [cfg.sharing.codebook] if cfg.sharing.codebook in found else []
        return [*first, *(f for f in found if f not in first), "float"]
    if kind == "coevolve":
        return ["coevolution", "float"]
    return ["model"]


def _float_folder(workdir: pathlib.Path, cfg) -> pathlib.Path:
    return pathlib.Path(cfg.float_from) if cfg.get("float_from") else workdir / "float"


def _load_variables(path: pathlib.Path, template: dict) -> dict:
    variables, _ = checkpoint.load(path, template)
    return variables


def _fake_quant_forward(model, variables, bits, ds):
    b = None if bits is None else Bits(w=jnp.asarray(bits.w), a=jnp.asarray(bits.a))
    return jax.jit(lambda x: model.apply(variables, normalize(x, ds.mean, ds.std), b, train=False))


def binary_levels(kernel, per_channel: bool = True) -> intforward.IntKernel:
    """1-bit weights as :func:`qevo.quant.quantize_weight` makes them: levels ``sign(w)``
    (int8) and scale ``mean|w|`` per output channel (or per tensor, repeated)."""
    kernel = np.asarray(kernel, np.float32)
    axes = tuple(range(kernel.ndim - 1)) if per_channel else tuple(range(kernel.ndim))
    scale = np.broadcast_to(np.mean(np.abs(kernel), axis=axes, keepdims=True), (1,) * (kernel.ndim - 1)
                            + kernel.shape[-1:]).reshape(-1)
    return intforward.IntKernel(q=np.sign(kernel).astype(np.int8), scale=scale.astype(np.float32))


def quantized_kernels(model, variables: dict, bits: Bits, per_channel: bool = True,
                      mode: str = "absmax") -> dict[str, intforward.IntKernel]:
    """Integer levels of every layer whose weight width is below 32, equal (levels times
    scale) to :func:`qevo.quant.quantize_weight`'s fake quantization: ``sign(w) * mean|w|``
    at 1 bit, :func:`qevo.intforward.weight_levels` at 2..16 bits.

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


def _load_search(workdir: pathlib.Path, cfg, name: str, template: dict) -> tuple:
    row = _rows(workdir)[name]
    bits = Bits(w=np.array(row["w_bits"].split(), np.int32), a=np.array(row["a_bits"].split(), np.int32))
    if row["kind"] == "float":
        return _load_variables(_float_folder(workdir, cfg) / MODEL, template), None, float(row["test_accuracy"])
    folder = workdir / "final" / name
    if not (folder / MODEL).is_file():
        raise CheckpointError(f"{folder} holds no {MODEL} (a search finished before qevo saved final models); "
                              f"rerun `python -m qevo.search` with the same --workdir to write it")
    return _load_variables(folder / MODEL, template), bits, float(row["test_accuracy"])


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
    raw = _read_json(workdir / CONFIG, "it is not the work folder of a qevo.search, qevo.compress, qevo.coevolve "
                     "or qevo.train run")
    kind = run_kind(raw)
    results = _read_json(workdir / RESULTS, f"its {KINDS[kind]} run has not finished; rerun it with this --workdir")
    defaults = DEFAULTS[kind]()
    cfg = ml_collections.ConfigDict(fill_defaults(config_lib.upgrade(raw),
                                                  json.loads(json.dumps(config_lib.to_dict(defaults)))))
    available = names(workdir, kind, cfg)
    if name is None and kind == "search":
        raise ConfigError(f"a search run holds several models: pass --model, one of {', '.join(available)}")
    name = available[0] if name is None else name
    if name not in available:
        raise ConfigError(f"--model {name!r} is not a model of this {KINDS[kind]} run; choose one of "
                          + ", ".join(available))
    if model is None and results.get("model", cfg.model.name) != cfg.model.name:
        raise ConfigError(f"{workdir} was made from Python with a network of your own ({results['model']}); "
                          "pass --inputs FILE.py:FUNCTION, a function that returns dict(model=..., data=...) with the "
                          f"run's network and data (from Python: qevo.export.export({str(workdir)!r}, name, out, "
                          "model=..., data=...))")
    inputs = train.resolve_inputs(cfg, model, None, data)
    ds, model = inputs.ds, inputs.model
    shape = ds.train_images.shape[1:]
    template = init_variables(model, jax.random.key(cfg.seed), shape)
    kernels, bits = {}, None
    if kind == "search":
        variables, bits, accuracy = _load_search(workdir, cfg, name, template)
    elif name == "float":
        variables = _load_variables(_float_folder(workdir, cfg) / MODEL, template)
        accuracy = results["float"]["test_accuracy"]
    elif kind == "compress":
        variables, shared, _ = sharing.read_compressed(workdir / f"compressed_{name}.msgpack", template)
        paths = sharing.kernel_paths(template["params"])
        kernels = {"/".join(path[:-1]): _onnxgraph().SharedKernel(indices, codebook)
                   for path, (indices, codebook) in zip(paths, shared, strict=True)}
        accuracy = results["formats"][name]["test_accuracy"]
    elif kind == "coevolve":
        tree, meta = checkpoint.load(workdir / coevolve.INTEGER_MODEL)
        try:
            variables = serialization.from_state_dict(template, tree["variables"])
            kernels = {p: intforward.IntKernel(q=np.asarray(k["q"]), scale=np.asarray(k["scale"], np.float32))
                       for p, k in tree["kernels"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{workdir / coevolve.INTEGER_MODEL} does not hold a {cfg.model.name} integer "
                                  f"model ({e}); rerun the coevolution") from e
        bits = Bits(w=np.asarray(meta["w_bits"], np.int32), a=np.asarray(meta["a_bits"], np.int32))
        accuracy = results["coevolution"]["test_accuracy"]
    else:
        variables = _load_variables(workdir / MODEL, template)
        if cfg.train.w_bits < FLOAT_BITS or cfg.train.a_bits < FLOAT_BITS:
            uniform = train.uniform_bits(model.num_layers, cfg.train.w_bits, cfg.train.a_bits,
                                         train.float_layers(cfg, model))
            bits = Bits(w=np.asarray(uniform.w), a=np.asarray(uniform.a))
        accuracy = results["test_accuracy"]
    if bits is not None and not kernels:
        kernels = quantized_kernels(model, variables, bits, cfg.quant.per_channel, cfg.quant.mode)
    arithmetic = "integer" if kind == "coevolve" and name != "float" else "float"
    if arithmetic == "integer":
        assert bits is not None  # a coevolution's widths, read above
        b = Bits(w=jnp.asarray(bits.w), a=jnp.asarray(bits.a))
        k = jax.tree_util.tree_map(jnp.asarray, kernels)
        forward = jax.jit(lambda x: intforward.apply(model, variables, k, b, normalize(x, ds.mean, ds.std)))
    else:
        forward = _fake_quant_forward(model, variables, bits, ds)
    return Found(kind, name, model, variables, bits, kernels, arithmetic, float(accuracy), ds, forward,
                 cost.layer_table(model, variables, shape))


def size_bits(found: Found) -> float:
    """Size in bits: :func:`qevo.cost.size_bits`, or for shared kernels their keys and
    codebooks (``n * b_key + k * (b_codebook + b_key)``, :mod:`qevo.codebook`) plus 32 bits
    per other parameter."""
    shared = [k for k in found.kernels.values() if isinstance(k, _onnxgraph().SharedKernel)]
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
    if isinstance(kernel, _onnxgraph().SharedKernel):
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
      workdir (str | os.PathLike): the work folder of a qevo.search, qevo.compress, qevo.coevolve or qevo.train run.
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
                            found.ds.std, name=f"{found.kind}_{found.name}", arithmetic=found.arithmetic)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_bytes(out, proto.SerializeToString())
    L = found.model.num_layers
    w = [FLOAT_BITS] * L if found.bits is None else np.asarray(found.bits.w).tolist()
    a = [FLOAT_BITS] * L if found.bits is None else np.asarray(found.bits.a).tolist()
    paths = intforward.quantized_layers(found.model)
    record = {
        "source": {"workdir": str(pathlib.Path(workdir).resolve()), "command": KINDS[found.kind],
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


if __name__ == "__main__":
    sys.exit(main())
