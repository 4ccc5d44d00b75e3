"""Configs: ``get_config()`` files (ml_collections), command-line overrides, validation.

Every command reads a config file whose ``get_config()`` returns a ConfigDict built on
:func:`defaults`; ``--config.section.key=value`` overrides any field. Unknown keys and
values of the wrong type or range fail with one message naming the key and the fix.

A config file may also declare, beside ``get_config()``, what its budget is sized for
(:func:`sized_for`): ``SIZED_FOR = "accelerator"`` (a GPU or TPU run) and ``CPU_CONFIG =
"<name>.py"``, the file beside it that cuts the same protocol to a CPU. A command run on a
CPU with such a file says so in one line at start (:mod:`qevo.cli`). These are statements
about the file, not keys of the run: they are not in ``config.json``.
"""

from __future__ import annotations

import ast
import copy
import difflib
import fnmatch
import importlib.util
import math
import pathlib
import sys
from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

from qevo.errors import ConfigError


def defaults() -> ml_collections.ConfigDict:
    """Every key a qevo command understands, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # JAX's threefry bit layout for every random draw of a run (qevo.harness.random_streams):
    # False, the original layout, compiles fast on the CPU; recorded so that a run started
    # from Python draws what its command draws.
    c.threefry_partitionable = False
    c.data = ml_collections.ConfigDict(
        {
            "name": "mnist",
            "data_dir": config_dict.placeholder(str),
            "val_size": 5000,
            "image_size": config_dict.placeholder(int),
            "channels": config_dict.placeholder(int),
            "max_train_images": config_dict.placeholder(int),
            "max_test_images": config_dict.placeholder(int),
        }
    )
    # conv: the convolution kernels, "auto" (by the platform of the devices, qevo.quant.layers.default_conv),
    # "cpu" (qevo's CPU kernels) or "xla" (XLA's convolution, the reference). precision: the
    # products of the float network's convolutions, "float32" or "bfloat16" (float32 sums;
    # AMX/AVX512-BF16 on a CPU, tensor cores on a GPU), qevo.quant.layers.QuantOptions.
    c.model = ml_collections.ConfigDict({"name": "lenet5", "activation": "relu", "conv": "auto",
                                         "precision": "float32"})
    c.float_from = config_dict.placeholder(str)
    # float_layers: the quantizable layers that stay float, comma-separated selectors, each a
    # layer's index in call order (negative from the end), its name or path, or a glob over
    # either (resolved by float_layers()); "" quantizes every layer.
    c.quant = ml_collections.ConfigDict({"mode": "absmax", "per_channel": True, "float_layers": "0,-1"})
    c.train = ml_collections.ConfigDict(
        {
            "epochs": 10,
            "batch_size": 128,
            "optimizer": "adam",
            "learning_rate": 1e-3,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 0.0,
            "weight_decay_on": "all",
            "label_smoothing": 0.0,
            "schedule": "cosine",
            "warmup_epochs": 0,
            "augment": False,
            "w_bits": 32,
            "a_bits": 32,
            "init_from": config_dict.placeholder(str),
            "eval_batch_size": 1000,
        }
    )
    return c


# Choices owned here and used by the layers that implement them (qevo.quant.quantizers, qevo.quant.layers).
QUANT_MODES = ("absmax", "mse", "dorefa")
CONV_KERNELS = ("cpu", "xla")
PRECISIONS = ("float32", "bfloat16")
OPTIONS = {
    "data.name": ("mnist", "cifar10", "imagenette", "image_folder"),
    "model.name": ("lenet5", "resnet20", "resnet32", "resnet56", "mobilenetv2"),
    "model.activation": ("relu", "tanh"),
    "model.conv": ("auto", *CONV_KERNELS),
    "model.precision": PRECISIONS,
    "quant.mode": QUANT_MODES,
    "train.optimizer": ("sgd", "adam"),
    "train.schedule": ("cosine", "constant"),
    "train.weight_decay_on": ("all", "kernels"),
}
POSITIVE = ("train.epochs", "train.batch_size", "train.learning_rate", "train.eval_batch_size")
# Ranges of the keys that end so, in every command's sections (``search.qat_learning_rate``
# is a learning rate): (check, what to write).
SUFFIX_RANGES = {
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "batch_size": (lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "eval_images": (lambda v: v is None or (isinstance(v, int) and v >= 1), "an int >= 1, or None for all"),
    "chunk_size": (lambda v: v is None or (isinstance(v, int) and v >= 1), "an int >= 1, or None"),
    "val_size": (lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
}


# Keys renamed since an earlier release: old name -> (new name, value translation). Config
# files, overrides and the config.json of earlier runs that use an old name keep working,
# with a one-line notice, until the next release.
RENAMED = {
    "quant.float_first_last": ("quant.float_layers", lambda old: "0,-1" if old else ""),
}


# Config files renamed since an earlier release: old file name -> new file name (in the same
# folder). An old name keeps working, with a one-line notice, until the next release.
RENAMED_FILES = {
    "mobilenetv2_cpu.py": "mobilenetv2_sharing_cpu.py",
}


def _renamed(name: str, value) -> tuple[str, object]:
    """``(name, value)`` under the current key name, with a one-line notice for an old one."""
    if name not in RENAMED:
        return name, value
    new, translate = RENAMED[name]
    print(f"qevo: config key {name} is now {new}; read {name}={value!r} as {new}={translate(value)!r} "
          "(the old name goes in the next release)", file=sys.stderr)
    return new, translate(value)


def upgrade(cfg: dict) -> dict:
    """A nested config dict (a ``config.json``, or ``ConfigDict.to_dict()``) with every key of
    :data:`RENAMED` moved to its new name, with a notice for each; others unchanged."""
    out = copy.deepcopy(cfg)
    for old in RENAMED:
        *parents, leaf = old.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            name, value = _renamed(old, node.pop(leaf))
            node[name.rsplit(".", 1)[-1]] = value
    return out


def float_layers(spec: str, names: Sequence[str], paths: Sequence[str] = ()) -> tuple[int, ...]:
    """Indices (ascending) of the layers ``quant.float_layers`` keeps float.

    Args:
      spec: comma-separated selectors: an int index in call order (negative counts from the
        end), a layer's name or path, or a glob pattern over either (``"stage1.*"``); ``""``
        selects none.
      names: the ``L`` layer names (``model.layer_names``); ``paths``: their module paths.

    Raises ``ConfigError`` for a selector that matches no layer.
    """
    chosen: set[int] = set()
    for selector in (s.strip() for s in str(spec).split(",")):
        if not selector:
            continue
        try:
            index = int(selector)
        except ValueError:
            hits = {i for i, labels in enumerate(zip(names, paths or names, strict=True))
                    if any(fnmatch.fnmatchcase(label, selector) for label in labels)}
        else:
            hits = {index % len(names)} if -len(names) <= index < len(names) else set()
        if not hits:
            raise ConfigError(f"config quant.float_layers={spec!r}: {selector!r} matches none of the "
                              f"{len(names)} quantizable layers; use indices 0..{len(names) - 1}, negative "
                              f"indices, or names/globs of {list(names)}")
        chosen |= hits
    return tuple(sorted(chosen))


def flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """``{"section.key": value}`` for every leaf of ``cfg``."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


OWNED_BY_METHODS = ("population_size", "generations", "search", "final", "sharing", "coevolve")
"""Top-level keys and sections that belong to one method's command: one config file can
serve ``qevo.train`` and a method, and a command ignores the sections it does not run."""


def check_keys(cfg: ml_collections.ConfigDict, known: ml_collections.ConfigDict) -> None:
    """Fail on any key of ``cfg`` that ``known`` does not have (other methods' sections excepted)."""
    allowed = flatten(known)
    sections = {k.rsplit(".", 1)[0] for k in allowed if "." in k}
    for name in flatten(cfg):
        if name.split(".")[0] in OWNED_BY_METHODS and name.split(".")[0] not in known:
            continue
        if name not in allowed and name not in sections:
            raise ConfigError(f"unknown config key {name!r}{_did_you_mean(name, allowed)}; "
                              f"known keys: {', '.join(sorted(allowed))}")


def _did_you_mean(name: str, keys) -> str:
    """`` (did you mean 'x'?)`` for the known key ``name`` most likely stands for, else ``""``:
    the same key in another section, or a close spelling."""
    keys = sorted(keys)
    close = [k for k in keys if k.split(".")[-1] == name.split(".")[-1]] or difflib.get_close_matches(name, keys, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def merge(known: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``known`` (a command's defaults) with every value ``cfg`` sets for its keys laid over it."""
    out = ml_collections.ConfigDict(known.to_dict())
    allowed = flatten(known)
    for name, value in flatten(cfg).items():
        if name in allowed:
            _set(out, name, value, f"config {name}={value!r}")
    return out


def _set(cfg: ml_collections.ConfigDict, name: str, value, what: str) -> None:
    """Set the dotted key ``name``; a type clash is a ConfigError naming ``what``."""
    *parents, leaf = name.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    try:
        node[leaf] = value
    except TypeError as e:
        example = f"; write it like --config.{name}={node[leaf]!r}" if node[leaf] is not None else ""
        raise ConfigError(f"{what}: {name} takes {node.get_ref(leaf).get_type().__name__} values, "
                          f"not {type(value).__name__} {value!r}{example}") from e


def validate(cfg: ml_collections.ConfigDict,
             known: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Check names and ranges shared by every command.

    Args:
      cfg: the loaded config.
      known: every key the command understands (default :func:`defaults`; commands with
        their own sections pass their extended defaults).

    Returns:
      ``known`` with the values of ``cfg`` (keys the file leaves out keep their defaults).
    """
    known = defaults() if known is None else known
    if any(name in RENAMED for name in flatten(cfg)):
        cfg = ml_collections.ConfigDict(upgrade(cfg.to_dict()))
    check_keys(cfg, known)
    cfg = merge(known, cfg)
    flat = flatten(cfg)
    for key, allowed in OPTIONS.items():
        if flat.get(key) not in allowed:
            raise ConfigError(f"config {key}={flat.get(key)!r} is not one of {allowed}")
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config {key}={value!r} is not a finite number")
        rule = next((r for suffix, r in SUFFIX_RANGES.items() if key.endswith(suffix)), None)
        if rule and not (not isinstance(value, bool) and (value is None or isinstance(value, (int, float)))
                         and rule[0](value)):
            raise ConfigError(f"config {key}={value!r} is out of range; use {rule[1]}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"config {key}={flat[key]!r} must be > 0")
    if flat["data.channels"] not in (None, 1, 3):
        raise ConfigError(f"config data.channels={flat['data.channels']!r} must be 1 or 3 (or unset: as stored)")
    for key in ("data.max_train_images", "data.max_test_images"):
        if flat[key] is not None and flat[key] < 1:
            raise ConfigError(f"config {key}={flat[key]!r} must be >= 1 (or unset for the whole split)")
    warmup = flat["train.warmup_epochs"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < flat["train.epochs"]:
        raise ConfigError(f"config train.warmup_epochs={warmup!r} must be an int in 0..train.epochs-1 "
                          f"(train.epochs={flat['train.epochs']!r})")
    if not 0.0 <= flat["train.label_smoothing"] < 1.0:
        raise ConfigError(f"config train.label_smoothing={flat['train.label_smoothing']!r} must be in [0, 1)")
    for key in ("train.w_bits", "train.a_bits"):
        if not 1 <= flat[key] <= 32:
            raise ConfigError(f"config {key}={flat[key]} is an impossible bit width; use 1..32 (32 = float)")
    return cfg


def load(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load ``get_config()`` from a config file and apply ``section.key=value`` overrides."""
    path = pathlib.Path(path)
    if not path.is_file() and path.name in RENAMED_FILES and path.with_name(RENAMED_FILES[path.name]).is_file():
        new = path.with_name(RENAMED_FILES[path.name])
        print(f"qevo: config file {path} is now {new}; reading {new} (the old name goes in the next release)",
              file=sys.stderr)
        path = new
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config configs/<name>.py")
    module = _run_file(path, "config file", "pass --config configs/<name>.py")
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path} defines no get_config(); define one that returns a ConfigDict")
    try:
        cfg = module.get_config()
    except Exception as e:
        raise ConfigError(f"config file {path}: get_config() failed: {type(e).__name__}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned {type(cfg).__name__}, not an "
                          "ml_collections.ConfigDict")
    for item in overrides:
        _override(cfg, item)
    return cfg


def _run_file(path: pathlib.Path, what: str, fix: str = "pass a .py file"):
    """The module that the Python file ``path`` defines, run as ``python path`` would (its
    folder first on ``sys.path``, for the modules beside it); any error in it is a
    ``ConfigError`` (the file is the user's input: its errors are theirs to fix)."""
    spec = importlib.util.spec_from_file_location(f"qevo_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{what} {path} is not a Python file; {fix}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"{what} {path} failed to load: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def load_function(spec: str, flag: str):
    """The function ``NAME`` of a Python file, from ``spec`` = ``"path/to/file.py:NAME"``
    (``flag``, the option that gave it, names it in the errors)."""
    path, sep, name = str(spec).rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ConfigError(f"{flag} {spec!r} must look like path/to/file.py:function")
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"{flag} {spec!r}: the file {path} does not exist")
    function = getattr(_run_file(pathlib.Path(path), flag), name, None)
    if not callable(function):
        raise ConfigError(f"{flag} {spec!r}: {path} defines no function {name}()")
    return function


SIZES = ("accelerator", "cpu")


def sized_for(path: str | pathlib.Path) -> tuple[str | None, pathlib.Path | None]:
    """What the config file ``path`` declares its budget is sized for: ``(SIZED_FOR, the
    CPU_CONFIG file)`` from its top-level ``SIZED_FOR = "accelerator"`` (or ``"cpu"``) and
    ``CPU_CONFIG = "<name>.py"`` (a file beside it), each None where the file declares none.
    Read from the file's text, as literals (the file is not run again).

    Raises:
      ConfigError: a declaration that is not such a literal, a size not in :data:`SIZES`,
        or a ``CPU_CONFIG`` that names no file beside ``path``.
    """
    path = pathlib.Path(path)
    declared = {}
    try:
        for node in ast.parse(path.read_text(), str(path)).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in ("SIZED_FOR", "CPU_CONFIG")):
                declared[node.targets[0].id] = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"config file {path}: SIZED_FOR and CPU_CONFIG must be plain strings ({e})") from e
    size, cpu = declared.get("SIZED_FOR"), declared.get("CPU_CONFIG")
    if size is not None and size not in SIZES:
        raise ConfigError(f"config file {path}: SIZED_FOR = {size!r} is not one of {SIZES}")
    if cpu is not None and not (isinstance(cpu, str) and (path.parent / cpu).is_file()):
        raise ConfigError(f"config file {path}: CPU_CONFIG = {cpu!r} names no config file beside it; "
                          "name one such as 'model_cpu.py'")
    return size, None if cpu is None else path.parent / cpu


def take_sections(cfg: ml_collections.ConfigDict, config_file: str | pathlib.Path,
                  sections: tuple[str, ...] = ("data", "model", "train")) -> ml_collections.ConfigDict:
    """``cfg`` with ``sections`` replaced by those of another config file's ``get_config()``.

    A method's config takes its model's float recipe this way (``take_sections(defaults(),
    pathlib.Path(__file__).with_name("lenet5.py"))``), so the two cannot drift apart.
    """
    source = load(config_file)
    for section in sections:
        cfg[section] = source[section]
    return cfg


def _override(cfg: ml_collections.ConfigDict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like --config.section.key=value")
    name, text = item.split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    keys = flatten(cfg)
    if isinstance(keys.get(name), str):  # a text field takes the text as written: float_layers=0,-1
        value = text
    elif name not in keys:
        name, value = _renamed(name, value)
    if name not in keys:
        raise ConfigError(f"unknown config key {name!r} in override --config.{item}{_did_you_mean(name, keys)}; "
                          f"known keys: {', '.join(sorted(keys))}")
    _set(cfg, name, value, f"override --config.{item}")


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """Plain nested dict (JSON-able) of a config."""
    return cfg.to_dict()
