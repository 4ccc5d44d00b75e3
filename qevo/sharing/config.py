"""The weight sharing's config: its keys and defaults (:func:`defaults`) and their validation
in one line each (:func:`validate`).
"""

from __future__ import annotations

import ml_collections

from qevo import config as config_lib
from qevo.sharing.codebook import CODEBOOK_BITS

EVOSAX_DRIVERS = ("simple_ga", "pso", "cma_es", "de")  # qevo.evolution.drivers names
DRIVERS = (*EVOSAX_DRIVERS, "random", "nsga3")


def defaults() -> ml_collections.ConfigDict:
    """:func:`qevo.config.defaults` plus the search size and the ``sharing`` section."""
    c = config_lib.defaults()
    c.population_size = 32
    c.generations = 30
    c.sharing = ml_collections.ConfigDict(
        {
            "driver": "simple_ga",
            "k_max": 64,
            "k_values": (),
            "eval_images": ml_collections.config_dict.placeholder(int),
            "kmeans_iters": 50,
            "range_max_loss": 1.0,
            "widest_per_key": True,
            "max_accuracy_loss": 1.0,
            "constrain_fitness": True,
            "fitness_cr": "weighted",
            "acc_target": ml_collections.config_dict.placeholder(float),
            "cr_target": 10.0,
            "acc_offset": 0.001,
            "cr_offset": 1.0,
            "codebook": "float32",
            "report_formats": ("float32", "float16", "float8", "int8"),
            "refine": True,
            "focus_max": 9.8,
            "focus_step": 0.2,
            "spreads": (2.0,),
            "nsga3_partitions": 12,
            "strategy": "auto",
        }
    )
    return c


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """:func:`qevo.config.validate` with the keys of :func:`defaults`, and the sharing options."""
    cfg = config_lib.validate(cfg, known=defaults())
    s = cfg.sharing
    err = config_lib.ConfigError
    if s.driver not in DRIVERS:
        raise err(f"config sharing.driver={s.driver!r} is not one of {DRIVERS}")
    if not isinstance(s.k_max, int) or not 2 <= s.k_max <= 128:
        raise err(f"config sharing.k_max={s.k_max!r} is invalid; use an int in 2..128 (k ranges over 1..k_max)")
    k_values = tuple(s.k_values)
    if k_values and (any(isinstance(k, bool) or not isinstance(k, int) for k in k_values)
                     or list(k_values) != sorted(set(k_values)) or not 1 <= k_values[0] <= k_values[-1] <= s.k_max):
        raise err(f"config sharing.k_values={k_values!r} is invalid; use increasing ints in 1..k_max={s.k_max}, "
                  "or () for every k")
    for key in ("population_size", "generations"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise err(f"config {key}={cfg[key]!r} must be an int >= 1")
    if s.driver == "nsga3" and cfg.population_size < 2:
        raise err("config population_size must be >= 2 for sharing.driver='nsga3'")
    if s.kmeans_iters < 1:
        raise err(f"config sharing.kmeans_iters={s.kmeans_iters!r} must be >= 1")
    for key in ("range_max_loss", "max_accuracy_loss"):
        if not 0 <= s[key] <= 100:
            raise err(f"config sharing.{key}={s[key]!r} is an accuracy loss in points; use 0..100")
    if s.fitness_cr not in ("weighted", "mean"):
        raise err(f"config sharing.fitness_cr={s.fitness_cr!r} is not one of ('weighted', 'mean')")
    for fmt in (s.codebook, *s.report_formats):
        if fmt not in CODEBOOK_BITS:
            raise err(f"config sharing codebook format {fmt!r} is not one of {tuple(CODEBOOK_BITS)}")
    if not s.cr_target > 0 or (s.acc_target is not None and not 0 < s.acc_target <= 1):
        raise err("config sharing.cr_target must be > 0 and sharing.acc_target (a fraction) in (0, 1]")
    if s.acc_offset < 0 or s.cr_offset < 0:
        raise err("config sharing.acc_offset and sharing.cr_offset must be >= 0")
    if s.focus_step <= 0 or s.focus_max < 0 or len(s.spreads) == 0:
        raise err("config sharing.focus_step must be > 0, sharing.focus_max >= 0, sharing.spreads non-empty")
    if s.nsga3_partitions < 1:
        raise err(f"config sharing.nsga3_partitions={s.nsga3_partitions!r} must be >= 1")
    if s.strategy not in ("auto", "vmap", "map"):
        raise err(f"config sharing.strategy={s.strategy!r} is not one of ('auto', 'vmap', 'map')")
    return cfg
