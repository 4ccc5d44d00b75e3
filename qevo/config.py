"""Configs: ``get_config()`` files (ml_collections), command-line overrides, validation.

Every command reads a config file whose ``get_config()`` returns a ConfigDict built on
:func:`defaults`; ``--config.section.key=value`` overrides any field. Unknown keys and
values of the wrong type or range fail with one message naming the key and the fix.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import pathlib
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
    # conv: the convolution kernels, "auto" (by the platform of the devices, qevo.layers.default_conv),
    # "cpu" (qevo's CPU kernels) or "xla" (XLA's convolution, the reference). precision: the
    # products of the float network's convolutions, "float32" or "bfloat16" (float32 sums;
    # AMX/AVX512-BF16 on a CPU, tensor cores on a GPU), qevo.layers.QuantOptions.
    c.model = ml_collections.ConfigDict({"name": "lenet5", "activation": "relu", "conv": "auto",
                                         "precision": "float32"})
    c.float_from = config_dict.placeholder(str)
    c.quant = ml_collections.ConfigDict({"mode": "absmax", "per_channel": True, "float_first_last": True})
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


# Choices owned here and used by the layers that implement them (qevo.quant, qevo.layers).
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
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config configs/<name>.py")
    spec = importlib.util.spec_from_file_location(f"qevo_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path} is not a Python file; pass --config configs/<name>.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the file is the user's input: any error in it is theirs to fix
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from e
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
    keys = flatten(cfg)
    if name not in keys:
        raise ConfigError(f"unknown config key {name!r} in override --config.{item}{_did_you_mean(name, keys)}; "
                          f"known keys: {', '.join(sorted(keys))}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    _set(cfg, name, value, f"override --config.{item}")


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """Plain nested dict (JSON-able) of a config."""
    return cfg.to_dict()
