"""The coevolution's config: its keys and defaults (:func:`defaults`) and their validation in
one line each (:func:`validate`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from qevo import config as config_lib
from qevo.evolution.population import (
    STRATEGIES,
)
from qevo.quant import intforward


def defaults() -> ml_collections.ConfigDict:
    """:func:`qevo.config.defaults` plus the ``coevolve`` section."""
    c = config_lib.defaults()
    # per-layer widths of a finished search's model instead of the uniform coevolve.w_bits/a_bits:
    # bits_from names the search's work folder, bits_model one of its final models (front_01, w4a4, ...)
    c.bits_from = config_dict.placeholder(str)
    c.bits_model = config_dict.placeholder(str)
    c.coevolve = ml_collections.ConfigDict(
        {
            "w_bits": 4,
            "a_bits": 8,
            "radius": 1,
            "initial_mass": 0.98,
            "threshold": 0.995,
            "group_size": 256,
            "num_groups": 32,
            "population_size": 16,
            "learning_rate": 0.5,
            "accept_z": 0.0,
            "bn_images": 1024,
            "cycles": 12,
            "batch_size": 512,
            "eval_images": config_dict.placeholder(int),
            "strategy": "auto",
            "chunk_size": config_dict.placeholder(int),
            "qat": True,
            "qat_optimizer": "adam",
            "qat_learning_rate": 1e-4,
        }
    )
    return c


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """:func:`qevo.config.validate` with the keys of :func:`defaults`, and the coevolution options."""
    cfg = config_lib.validate(cfg, known=defaults())
    c, err = cfg.coevolve, config_lib.ConfigError
    for key, lo in (("w_bits", 2), ("a_bits", intforward.MIN_ACTIVATION_BITS)):
        if not isinstance(c[key], int) or not lo <= c[key] <= 8:
            raise err(f"config coevolve.{key}={c[key]!r} is an impossible bit width for integer training; "
                      f"use {lo}..8 (int8 operands)")
    levels = 2 * intforward.max_level(c.w_bits)
    if not isinstance(c.radius, int) or not 1 <= c.radius <= levels:
        raise err(f"config coevolve.radius={c.radius!r} is invalid; use an int in 1..{levels} "
                  f"({c.w_bits}-bit levels span -{levels // 2}..{levels // 2})")
    if not 0.0 < c.threshold <= 1.0 or not 1.0 / (2 * c.radius + 1) < c.initial_mass < c.threshold:
        raise err(f"config coevolve.initial_mass={c.initial_mass!r} and coevolve.threshold={c.threshold!r} "
                  f"must satisfy 1/(2*radius+1) < initial_mass < threshold <= 1 "
                  f"(otherwise every weight starts confident)")
    if not 0.0 < c.learning_rate <= 1.0:
        raise err(f"config coevolve.learning_rate={c.learning_rate!r} must lie in (0, 1]")
    for key, lo in (("group_size", 1), ("num_groups", 1), ("population_size", 2), ("cycles", 1), ("batch_size", 1)):
        if not isinstance(c[key], int) or c[key] < lo:
            raise err(f"config coevolve.{key}={c[key]!r} must be an int >= {lo}")
    if isinstance(c.accept_z, bool) or not isinstance(c.accept_z, (int, float)) or not 0 <= c.accept_z <= 10:
        raise err(f"config coevolve.accept_z={c.accept_z!r} must be a number of standard errors in 0..10 "
                  "(0: any sample of lower mean loss replaces the context)")
    if not isinstance(c.bn_images, int) or c.bn_images < 0:
        raise err(f"config coevolve.bn_images={c.bn_images!r} must be an int >= 0 "
                  "(0 keeps the float model's BatchNorm statistics)")
    if c.eval_images is not None and c.eval_images < 1:
        raise err(f"config coevolve.eval_images={c.eval_images!r} must be >= 1 "
                  "(or unset for the whole validation split)")
    if c.strategy not in STRATEGIES:
        raise err(f"config coevolve.strategy={c.strategy!r} is not one of {STRATEGIES}")
    if c.chunk_size is not None and c.chunk_size < 1:
        raise err(f"config coevolve.chunk_size={c.chunk_size!r} must be >= 1")
    if c.qat_optimizer not in ("sgd", "adam") or not c.qat_learning_rate > 0:
        raise err("config coevolve.qat_optimizer must be 'sgd' or 'adam' and coevolve.qat_learning_rate > 0")
    if cfg.quant.mode not in intforward.WEIGHT_MODES:
        raise err(f"config quant.mode={cfg.quant.mode!r}: integer weights need a symmetric quantizer, "
                  f"one of {intforward.WEIGHT_MODES}")
    return cfg
