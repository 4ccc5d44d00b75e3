"""The search's config: its keys and defaults (:func:`defaults`), their validation in one line
each (:func:`validate`), the constraints (``search.constraints``, :func:`parse_constraints`),
NSGA-III's reference directions (:func:`reference_directions`) and the names of a user's own
objectives (:func:`with_objectives`).
"""

from __future__ import annotations

import itertools
import math

import ml_collections
import numpy as np
from ml_collections import config_dict

from qevo import config as config_lib
from qevo.evolution import drivers, nsga3, variation

COSTS = ("bitops", "size", "flops", "params")
OBJECTIVES = ("error", *COSTS)
DRIVERS = ("nsga3", "random", *drivers.EVOSAX_NAMES)
SCALARIZATIONS = ("weighted", "tchebycheff", "budget")
ALLOWED_BITS = (*range(1, 9), 16, 32)
BASELINES = ((8, 8), (4, 4), (2, 2))


def defaults() -> ml_collections.ConfigDict:
    """Every key ``qevo.search`` understands: the shared defaults plus the search sections."""
    c = config_lib.defaults()
    c.population_size = 16
    c.generations = 10
    c.search = ml_collections.ConfigDict(
        {
            "driver": "nsga3",
            "w_candidates": (2, 4, 8),
            "a_candidates": (2, 4, 8),
            "objectives": ("error", "bitops", "size"),
            "n_partitions": config_dict.placeholder(int),
            "initial_samples": config_dict.placeholder(int),
            "uniform_seeds": BASELINES,
            "crossover_prob": 0.9,
            "mutation_rate": config_dict.placeholder(float),
            "start": "float",
            "qat_steps": 20,
            "rungs": (),
            "promote": 0.25,
            "sensitivity": False,
            "shared_draws": False,
            "qat_batch_size": 128,
            "qat_learning_rate": 1e-3,
            "qat_optimizer": "sgd",
            "qat_momentum": 0.9,
            "qat_weight_decay": 0.0,
            "eval_images": config_dict.placeholder(int),
            "strategy": "auto",
            "chunk_size": config_dict.placeholder(int),
            "scalarization": "weighted",
            "weights": config_dict.placeholder(tuple),
            "budget": 0.5,
            "constraints": "",
        }
    )
    c.final = ml_collections.ConfigDict(
        {
            "enabled": True,
            "start": "float",
            "epochs": 1,
            "optimizer": "sgd",
            "learning_rate": 1e-3,
            "max_models": 8,
            "seeds": 1,
        }
    )
    return c


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shared checks plus the search's own; raises ``ConfigError`` with the fix."""
    cfg = config_lib.validate(cfg, defaults())
    s, err = cfg.search, config_lib.ConfigError
    for name in ("w_candidates", "a_candidates"):
        values = tuple(s[name])
        if not values:
            raise err(f"config search.{name} is empty; give at least one bit width, e.g. (2, 4, 8)")
        bad = [b for b in values if b not in ALLOWED_BITS]
        if bad:
            raise err(f"config search.{name} has impossible bit widths {bad}; use values from 1..8, 16, 32")
        if len(set(values)) != len(values):
            raise err(f"config search.{name}={values} repeats a width; list each once")
    objectives = tuple(s.objectives)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise err(f"config search.objectives has unknown names {unknown}; choose from {OBJECTIVES}")
    if "error" not in objectives or len(objectives) < 2 or len(set(objectives)) != len(objectives):
        raise err(f"config search.objectives={objectives} must hold 'error' and at least one distinct cost")
    if s.driver not in DRIVERS:
        raise err(f"config search.driver={s.driver!r} is not one of {DRIVERS}")
    if s.scalarization not in SCALARIZATIONS:
        raise err(f"config search.scalarization={s.scalarization!r} is not one of {SCALARIZATIONS}")
    if s.weights is not None and len(s.weights) != len(objectives):
        raise err(f"config search.weights has {len(s.weights)} entries for {len(objectives)} objectives")
    for section, key in (("search", "start"), ("final", "start")):
        if cfg[section][key] not in ("float", "scratch"):
            raise err(f"config {section}.{key}={cfg[section][key]!r} is not one of ('float', 'scratch')")
    if cfg.final.optimizer not in ("sgd", "adam"):
        raise err(f"config final.optimizer={cfg.final.optimizer!r} is not one of ('sgd', 'adam')")
    if s.qat_optimizer not in ("sgd", "adam"):
        raise err(f"config search.qat_optimizer={s.qat_optimizer!r} is not one of ('sgd', 'adam')")
    if cfg.generations < 0 or s.qat_steps < 0 or cfg.final.epochs < 1 or cfg.final.max_models < 1:
        raise err("config generations and search.qat_steps must be >= 0, final.epochs and final.max_models >= 1")
    if not 0.0 <= s.crossover_prob <= 1.0 or not 0.0 <= s.budget <= 1.0:
        raise err("config search.crossover_prob and search.budget must lie in [0, 1]")
    parse_constraints(s.constraints)
    rungs = tuple(tuple(r) for r in s.rungs)
    if any(len(r) != 2 or not all(isinstance(v, int) and v >= 1 for v in r) for r in rungs) or any(
            later[0] < earlier[0] or later[1] < earlier[1] for earlier, later in itertools.pairwise(rungs)):
        raise err(f"config search.rungs={s.rungs} must list (qat_steps, eval_images) pairs of ints >= 1, neither "
                  "falling from one rung to the next, e.g. ((5, 1000), (40, 5000)); () scores once at "
                  "search.qat_steps and search.eval_images")
    if not 0.0 < s.promote <= 1.0:
        raise err(f"config search.promote={s.promote} must lie in (0, 1]: the share of a rung scored again at the next")
    if not isinstance(cfg.final.seeds, int) or cfg.final.seeds < 1:
        raise err(f"config final.seeds={cfg.final.seeds!r} must be an int >= 1: how often each final model trains")
    n_ref = len(reference_directions(cfg))
    if cfg.population_size < max(n_ref, 2):
        raise err(
            f"config population_size={cfg.population_size} is smaller than the {n_ref} NSGA-III reference "
            f"directions of {len(objectives)} objectives (search.n_partitions={s.n_partitions}); "
            f"raise population_size to >= {max(n_ref, 2)} or lower search.n_partitions"
        )
    seeds = tuple(tuple(pair) for pair in s.uniform_seeds)
    if any(len(pair) != 2 for pair in seeds) or len(set(seeds)) != len(seeds):
        raise err(f"config search.uniform_seeds={s.uniform_seeds} must list distinct (weight_bits, activation_bits) "
                  "pairs, e.g. ((8, 8), (4, 4), (2, 2))")
    usable = len(variation.uniform_genes(s.w_candidates, s.a_candidates, 1, seeds))
    first = s.initial_samples or cfg.population_size
    if usable > first:
        raise err(f"config search.uniform_seeds gives {usable} usable pairs, more than the first population's "
                  f"{first}; list fewer or raise search.initial_samples")
    if s.initial_samples is not None and s.initial_samples < cfg.population_size:
        raise err(f"config search.initial_samples={s.initial_samples} must be >= population_size={cfg.population_size}")
    return cfg


def parse_constraints(text: str) -> dict[str, float]:
    """``search.constraints``, comma-separated upper bounds ``name<=value`` on a cost of
    :func:`costs` or a user's objective, in its units (``"size<=4.8e5"``: at most 480,000
    bits of weights), as ``{name: bound}``; ``""`` sets none."""
    limits = {}
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        name, sep, value = (part.strip() for part in item.partition("<="))
        try:
            bound = float(value)
        except ValueError:
            bound = math.nan
        if not sep or not name or not math.isfinite(bound) or bound <= 0 or name in limits:
            raise config_lib.ConfigError(
                f"config search.constraints={text!r}: {item!r} is no upper bound; write each as name<=number "
                f"(a number > 0, each name once), e.g. search.constraints='size<=4.8e5,bitops<=2e8'")
        limits[name] = bound
    return limits


def with_objectives(cfg: ml_collections.ConfigDict, objectives: dict) -> ml_collections.ConfigDict:
    """``cfg`` with the user's objectives' names after ``search.objectives``; a name that
    clashes with a built-in one or is no callable is a :class:`ConfigError`."""
    for name, f in objectives.items():
        if name in OBJECTIVES or not callable(f):
            raise config_lib.ConfigError(
                f"objectives={{{name!r}: ...}} must map a new name (not one of {OBJECTIVES}) to a function "
                "f(w_bits, a_bits, table) -> [P]")
    if not objectives:
        return cfg
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.search.objectives = (*cfg.search.objectives, *(n for n in objectives if n not in cfg.search.objectives))
    return cfg


def reference_directions(cfg: ml_collections.ConfigDict) -> np.ndarray:
    """Das-Dennis directions ``[K, M]``: ``search.n_partitions``, else the most that fit the population."""
    m = len(cfg.search.objectives)
    if cfg.search.n_partitions is not None:
        if cfg.search.n_partitions < 1:
            raise config_lib.ConfigError(f"config search.n_partitions={cfg.search.n_partitions} must be >= 1")
        return nsga3.das_dennis(m, cfg.search.n_partitions)
    p = 1
    while len(nsga3.das_dennis(m, p + 1)) <= cfg.population_size:
        p += 1
    return nsga3.das_dennis(m, p)
