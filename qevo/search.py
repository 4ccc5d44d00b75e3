"""Bit-width search (QuantEA): ``python -m qevo.search --config configs/lenet5.py``.

The protocol of docs/spec.md#search-protocol:

0. the float model is trained (or loaded from ``float_from``) and its activation clip
   ranges calibrated;
1. a population of per-layer (weight, activation) bit-width genomes evolves for
   ``generations`` generations. Each generation is one compiled population evaluation
   (``search.qat_steps`` steps of per-individual QAT from the float weights, on mini-batches
   drawn once per generation, or once for the whole search with ``search.shared_draws``;
   then accuracy on the validation split: the mean of a per-example metric, top-1 unless
   :func:`run` gets ``metric=``); objectives (minimised) are ``search.objectives``
   (default error, BitOps, size). The first population holds the uniform configurations
   of ``search.uniform_seeds`` (default w8a8, w4a4, w2a2) and random genomes. The driver
   is NSGA-III (:mod:`qevo.nsga3`) with the integer variation of :mod:`qevo.variation`,
   random search, or an evosax strategy on the relaxed genome with a scalarised fitness
   (:mod:`qevo.drivers`);
2. the non-dominated models of everything evaluated, and the uniform baselines, are
   trained with the same budget (``final``) and scored on the test split.

Outputs in the work folder: ``config.json``, ``history.jsonl`` (every evaluated
individual: generation, genes, bits, objectives), ``checkpoint.msgpack`` (after every
generation; a rerun resumes from it and gives the same result), ``pareto.csv``,
``final.csv``, ``pareto.png``, ``results.json`` and per trained model ``final/<name>/`` (its
training checkpoint, ``model.msgpack`` with its variables, ``results.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.typing import ArrayLike
from ml_collections import config_dict

from qevo import checkpoint, cost, drivers, nsga3, strategies, train, variation
from qevo import config as config_lib
from qevo.calibration import calibrate
from qevo.data import Dataset, normalize
from qevo.harness import (
    CHECKPOINT,
    MODEL,
    RESULTS,
    StepLog,
    Stopwatch,
    environment,
    figure,
    method,
    write_csv,
    write_json,
)
from qevo.layers import Bits
from qevo.loop import LoopState, base_key, evolve, step_keys
from qevo.models import init_variables
from qevo.population import PopulationEvaluator, QATConfig, batch_eval_set
from qevo.pretrained import float_model

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


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Genome layout: which layers are searched and their candidate widths.

    Attributes:
      w_candidates, a_candidates: int32 ``[Cw]``, ``[Ca]`` candidate widths.
      searched: bool ``[L]``, the searched quantizable layers (others stay float).
    """

    w_candidates: np.ndarray
    a_candidates: np.ndarray
    searched: np.ndarray

    @property
    def num_genes(self) -> int:
        return 2 * int(self.searched.sum())

    @property
    def n_choices(self) -> np.ndarray:
        s = int(self.searched.sum())
        return np.array([len(self.w_candidates)] * s + [len(self.a_candidates)] * s, np.int32)

    def decode(self, genes) -> Bits:
        """Widths ``[P, L]`` of genes ``[P, G]``."""
        w, a = variation.decode(jnp.asarray(genes), self.w_candidates, self.a_candidates, self.searched)
        return Bits(w=np.asarray(w), a=np.asarray(a))


def make_space(cfg: ml_collections.ConfigDict, model) -> SearchSpace:
    """The genome of ``model``'s layers: every layer but those ``quant.float_layers`` keeps float."""
    searched = np.ones(model.num_layers, bool)
    searched[list(train.float_layers(cfg, model))] = False
    if not searched.any():
        raise config_lib.ConfigError(f"config quant.float_layers={cfg.quant.float_layers!r} keeps all "
                                     f"{model.num_layers} layers float: nothing is left to search; select fewer")
    return SearchSpace(np.array(cfg.search.w_candidates, np.int32), np.array(cfg.search.a_candidates, np.int32),
                       searched)


def costs(table: cost.LayerTable, bits: Bits) -> dict[str, np.ndarray]:
    """BitOps, size (bits) and the reference's "flops"/"params" of a population ``[P, L]``."""
    return {
        "bitops": np.asarray(cost.bitops(table, bits.w, bits.a), np.float64),
        "size": np.asarray(cost.size_bits(table, bits.w), np.float64),
        "flops": np.asarray(cost.reference_flops(table, bits.w, bits.a), np.float64),
        "params": np.asarray(cost.reference_params(table, bits.w), np.float64),
    }


@dataclasses.dataclass
class Problem:
    """Everything needed to score genomes: ``objectives(genes, key) -> F [P, M]``."""

    cfg: ml_collections.ConfigDict
    space: SearchSpace
    table: cost.LayerTable
    evaluator: PopulationEvaluator
    variables: dict
    final_variables: dict
    float_results: dict
    ds: Dataset
    model_name: str
    extra_objectives: dict
    eval_images: jax.Array
    eval_labels: jax.Array
    train_images: jax.Array
    train_labels: jax.Array

    def costs(self, bits: Bits) -> dict[str, np.ndarray]:
        """:func:`costs` and the user's objectives (``objectives=`` of :func:`run`), float64 ``[P]`` each."""
        w, a = np.asarray(bits.w), np.asarray(bits.a)
        return {**costs(self.table, bits),
                **{name: np.asarray(f(w, a, self.table), np.float64).reshape(w.shape[0])
                   for name, f in self.extra_objectives.items()}}

    def violation(self, bits: Bits) -> np.ndarray:
        """float64 ``[P]``: how far each model exceeds ``search.constraints``, the sum over the
        bounds of ``max(0, value / bound - 1)``; 0 where it keeps every bound."""
        limits = parse_constraints(self.cfg.search.constraints)
        values = self.costs(bits) if limits else {}
        total = np.zeros(np.shape(bits.w)[0])
        for name, bound in limits.items():
            total += np.maximum(0.0, values[name] / bound - 1.0)
        return total

    def objectives(self, genes: np.ndarray, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """``(F [P, M] float64, validation accuracy [P])``; NaN error where the network diverged."""
        bits = self.space.decode(genes)
        acc = np.asarray(
            self.evaluator(
                self.variables, bits.w, bits.a, self.eval_images, self.eval_labels,
                key=key, train_images=self.train_images, train_labels=self.train_labels,
            ),
            np.float64,
        )
        values = {"error": 1.0 - acc, **self.costs(bits)}
        return np.stack([values[o] for o in self.cfg.search.objectives], axis=1), acc

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-objective ``(lower, upper)``: error in [0, 1], costs between all-min and all-max widths."""
        s = int(self.space.searched.sum())
        hi = np.concatenate([np.full(s, np.argmax(self.space.w_candidates)),
                             np.full(s, np.argmax(self.space.a_candidates))])[None]
        lo = np.concatenate([np.full(s, np.argmin(self.space.w_candidates)),
                             np.full(s, np.argmin(self.space.a_candidates))])[None].astype(np.int32)
        c_lo, c_hi = self.costs(self.space.decode(lo)), self.costs(self.space.decode(hi))
        ends = {o: sorted((c_lo[o][0], c_hi[o][0])) for o in c_lo}  # a user's objective may fall with width
        lower = np.array([0.0 if o == "error" else ends[o][0] for o in self.cfg.search.objectives])
        upper = np.array([1.0 if o == "error" else ends[o][1] for o in self.cfg.search.objectives])
        return lower, np.maximum(upper, lower + 1e-12)


def prepare(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, model=None, variables: dict | None = None,
            data: Dataset | None = None, objectives: dict | None = None, loss: Callable | None = None,
            metric: Callable | None = None) -> Problem:
    """Data, float model (trained, loaded or the user's), calibration, cost table and evaluator
    (``model``, ``variables``, ``data``, ``loss``, ``metric``: :func:`qevo.train.resolve_inputs`;
    ``objectives``: :func:`run`)."""
    unknown = sorted(set(parse_constraints(cfg.search.constraints)) - {*COSTS, *(objectives or {})})
    if unknown:
        raise config_lib.ConfigError(f"config search.constraints bounds {unknown}, which are no costs; bound "
                                     f"{COSTS} or a name of run(objectives=...)")
    inputs = train.resolve_inputs(cfg, model, variables, data, loss, metric)
    ds, model, loss, metric = inputs.ds, inputs.model, inputs.loss, inputs.metric
    space = make_space(cfg, model)  # a bad quant.float_layers is refused before the float model trains
    calib = normalize(jnp.asarray(ds.train_images[:512]), ds.mean, ds.std)
    starts, float_results = {}, {}
    if "float" in (cfg.search.start, cfg.final.start):
        if inputs.variables is None:
            float_vars, float_results = float_model(cfg, ds, model, workdir, loss, metric)
            starts["float"] = calibrate(model, float_vars, calib)
        else:  # the user's own float model: its test accuracy for final.csv's float row
            starts["float"] = calibrate(model, inputs.variables, calib)
            test = batch_eval_set(jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels), cfg.train.eval_batch_size)
            trainer = train.Trainer(cfg, ds, model, quantized=False, loss=loss, metric=metric)
            float_results = {"test_accuracy": float(trainer.accuracy(starts["float"], None, test))}
    if "scratch" in (cfg.search.start, cfg.final.start):
        fresh = init_variables(model, jax.random.fold_in(jax.random.key(cfg.seed), 7), ds.train_images.shape[1:])
        starts["scratch"] = calibrate(model, fresh, calib)
    start_variables = starts[cfg.search.start]
    s = cfg.search
    qat = QATConfig(
        steps=s.qat_steps, batch_size=s.qat_batch_size, learning_rate=s.qat_learning_rate,
        momentum=s.qat_momentum, weight_decay=s.qat_weight_decay, weight_decay_on=cfg.train.weight_decay_on,
        optimizer=s.qat_optimizer,
    )
    evaluator = PopulationEvaluator(
        model, ds.mean, ds.std, eval_batch_size=cfg.train.eval_batch_size,
        strategy=s.strategy, chunk_size=s.chunk_size, qat=qat, loss=loss, metric=metric,
    )
    n_eval = ds.val_images.shape[0] if s.eval_images is None else min(s.eval_images, ds.val_images.shape[0])
    if n_eval < 1:
        raise config_lib.ConfigError("the search scores on the validation split: set data.val_size > 0")
    return Problem(
        cfg=cfg,
        space=space,
        table=cost.layer_table(model, start_variables, ds.train_images.shape[1:]),
        evaluator=evaluator,
        variables=start_variables,
        final_variables=starts[cfg.final.start],
        float_results=float_results,
        model_name=inputs.model_name,
        extra_objectives=dict(objectives or {}),
        ds=ds,
        eval_images=jax.device_put(ds.val_images[:n_eval]),
        eval_labels=jax.device_put(ds.val_labels[:n_eval]),
        train_images=jax.device_put(ds.train_images),
        train_labels=jax.device_put(ds.train_labels),
    )


def _scalarize(cfg: ml_collections.ConfigDict, F: ArrayLike, lower: np.ndarray, upper: np.ndarray) -> jax.Array:
    m = jnp.shape(F)[1]
    weights = jnp.asarray(cfg.search.weights if cfg.search.weights is not None else np.full(m, 1.0 / m), jnp.float32)
    f, lo, hi = (jnp.asarray(v, jnp.float32) for v in (F, lower, upper))
    if cfg.search.scalarization == "weighted":
        return drivers.weighted_sum(f, weights, lo, hi)
    if cfg.search.scalarization == "tchebycheff":
        return drivers.tchebycheff(f, weights, lo, lo, hi)
    limit = lo[1] + cfg.search.budget * (hi[1] - lo[1])
    return drivers.budget(f, limit, lo, hi, cost_index=1, error_index=0)


def evaluation_key(cfg: ml_collections.ConfigDict, key: jax.Array) -> jax.Array:
    """The key a generation's scores draw their QAT mini-batches with: its own ``key``, or with
    ``search.shared_draws`` the first generation's, deliberately: common random numbers, so
    that a genome scores the same in any generation and scores compare paired across the whole
    search, not only within a generation (on ResNet-20 after 30 QAT steps one model's score
    varies by about 0.8 points from draw to draw, more than the gaps between neighbouring
    front models)."""
    return step_keys(base_key(cfg.seed), 0)[1] if cfg.search.shared_draws else key


def penalized(F: np.ndarray, violation: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """``F [P, M]`` as selection sees it: a model over ``search.constraints`` gets, in every
    objective, the upper bound plus ``1 + violation`` times the objective's range, so every
    model within the bounds dominates it and, among those over, the smaller excess wins
    (Deb's constraint domination, in the ranking NSGA-III already does)."""
    v = violation[:, None]
    return np.where(v > 0, upper + (1.0 + v) * (upper - lower), F)


def make_strategy(cfg: ml_collections.ConfigDict, problem: Problem) -> strategies.Strategy:
    """The driver of ``search.driver``: NSGA-III (``nsga3``; ``random``: uniform offspring
    with NSGA-III survival) whose first population holds the uniform seeds, then random
    genomes up to ``search.initial_samples``; or an evosax strategy on the scalarised
    objectives."""
    space, n = problem.space, cfg.population_size
    n_choices = jnp.asarray(space.n_choices)
    if cfg.search.driver in drivers.EVOSAX_NAMES:
        lower, upper = problem.bounds()
        return strategies.Evosax(cfg.search.driver, n, n_choices, lambda F: _scalarize(cfg, F, lower, upper))
    seeds = variation.uniform_genes(space.w_candidates, space.a_candidates, space.num_genes // 2,
                                    cfg.search.uniform_seeds)
    total = cfg.search.initial_samples or n

    def initial(key: jax.Array) -> jax.Array:
        k_new, k_dedupe = jax.random.split(key)
        fresh = variation.random_genes(k_new, total - len(seeds), n_choices)
        genes = variation.dedupe(k_dedupe, fresh, jnp.asarray(seeds), n_choices)
        return jnp.concatenate([jnp.asarray(seeds, jnp.int32), genes])[:total]

    return strategies.NSGA3(n, n_choices, reference_directions(cfg), initial=initial,
                            offspring="random" if cfg.search.driver == "random" else "evolve",
                            crossover_prob=cfg.search.crossover_prob, mutation_rate=cfg.search.mutation_rate,
                            dtype=jax.dtypes.canonicalize_dtype(jnp.float64))


def generations(cfg: ml_collections.ConfigDict, problem: Problem,
                workdir: pathlib.Path | None) -> tuple[LoopState, list[dict]]:
    """Run (or resume) the search's generations (:func:`qevo.loop.evolve`): generation 0 is the
    first population, then ``cfg.generations`` more. Returns the loop's final state (its
    ``carry``: the seconds spent scoring, float64 ``[]``) and every evaluated individual's
    record (generation, genes, widths, objectives, validation accuracy, constraint violation)."""
    lower, upper = problem.bounds()
    names = tuple(cfg.search.objectives)

    def evaluate(generation: int, asked: jax.Array, key: jax.Array, scoring: np.ndarray):
        genes = np.asarray(asked)
        start = time.perf_counter()
        F, acc = problem.objectives(genes, evaluation_key(cfg, key))
        scoring = scoring + (time.perf_counter() - start)
        bits = problem.space.decode(genes)
        violation = problem.violation(bits)
        if not np.isfinite(F).all(axis=1).any():
            raise config_lib.ConfigError(
                f"generation {generation}: all {len(genes)} candidates are infeasible (non-finite "
                "accuracy or cost: their fine-tuning diverged); lower search.qat_learning_rate "
                f"(now {cfg.search.qat_learning_rate}) and rerun in a new --workdir")
        records = [
            {"generation": generation, "genes": g.tolist(), "w_bits": w.tolist(), "a_bits": a.tolist(),
             "objectives": dict(zip(names, map(_finite_or_none, f), strict=True)),
             "val_accuracy": _finite_or_none(v_acc), "violation": float(v)}
            for g, w, a, f, v_acc, v in zip(genes, bits.w, bits.a, F, acc, violation, strict=True)
        ]
        return penalized(F, violation, lower, upper), records, scoring

    def report(state: LoopState, history: list[dict]) -> str:
        F = history_objectives(history, names)
        front = front_indices(F)
        hv = nsga3.hypervolume((F[front] - lower) / (upper - lower), np.full(len(lower), 1.1))
        best = max((r["val_accuracy"] or 0.0) for r in history)
        return (f"gen {state.generation - 1:3d}/{cfg.generations}  best acc {100 * best:.2f}%  front {len(front)}  "
                f"hv {hv:.4f}  {state.evaluations / state.seconds:.2f} eval/s")

    steps = StepLog(workdir, "generation", step_key="generation", log=lambda msg: print(msg, file=sys.stderr))
    return evolve(make_strategy(cfg, problem), evaluate, base_key=base_key(cfg.seed),
                        generations=cfg.generations + 1, steps=steps, desc=f"search {problem.model_name}",
                        carry=np.float64(0.0), report=report)


def throughput(state: LoopState) -> dict:
    """The search's pace over all its generations (a resumed run's included):
    ``evaluations_per_hour`` of generation time and ``scoring_share``, the share of that
    time spent scoring (the population calls; the rest is variation, survival and writing)."""
    seconds, scoring = float(state.seconds), float(state.carry)
    return {"evaluations": int(state.evaluations), "generation_seconds": round(seconds, 2),
            "evaluations_per_hour": round(3600 * state.evaluations / seconds, 1) if seconds > 0 else None,
            "scoring_share": round(scoring / seconds, 4) if seconds > 0 else None}


def _finite_or_none(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def history_objectives(history: list[dict], names) -> np.ndarray:
    """float64 ``[R, M]`` objectives of every record: NaN where missing, and in every column
    of a model over ``search.constraints`` (so no front holds it)."""
    return np.array([[np.nan if r["objectives"][n] is None or r.get("violation", 0.0) > 0 else r["objectives"][n]
                      for n in names] for r in history], np.float64).reshape(len(history), len(names))


def front_indices(F: np.ndarray) -> np.ndarray:
    """Indices of the distinct, finite, non-dominated rows of ``F [R, M]``, ascending."""
    if len(F) == 0:
        return np.zeros(0, int)
    rank = np.asarray(nsga3.non_dominated_rank(jnp.asarray(F, jnp.float32)))
    finite = np.all(np.isfinite(F), axis=1)
    idx = np.flatnonzero((rank == 0) & finite)
    _, first = np.unique(F[idx], axis=0, return_index=True)
    return np.sort(idx[first])


def pick_spread(order_key: np.ndarray, k: int) -> np.ndarray:
    """Positions of ``k`` entries evenly spread over ``order_key`` sorted ascending (all if fewer)."""
    order = np.argsort(order_key, kind="stable")
    if len(order) <= k:
        return order
    return order[np.unique(np.round(np.linspace(0, len(order) - 1, k)).astype(int))]


def final_candidates(cfg, space: SearchSpace, history: list[dict]) -> list[dict]:
    """The models to train fully: front models, then the uniform baselines.

    At most ``final.max_models`` front models, taken in this order from the fronts of the
    mixed-precision models the search evaluated (a model with a baseline's bits is left to
    its baseline, and does not hide the mixed models it dominates: mixed precision's best
    answers are trained even where a uniform configuration beats them):

    1. for each uniform baseline the search evaluated, from the cheapest baseline up, the
       most accurate model of the accuracy-against-first-cost front (error and, by default,
       BitOps) that costs no more than that baseline: mixed precision's answer to the
       uniform configuration at its own cost;
    2. the rest of that front, spread evenly over the cost;
    3. the rest of the full front, spread likewise.
    """
    s = int(space.searched.sum())
    baselines = []
    for w, a in BASELINES:
        genes = variation.uniform_genes([w], [a], s, ((w, a),))
        bits = variation.decode(jnp.asarray(genes), np.array([w]), np.array([a]), space.searched)
        baselines.append({"name": f"w{w}a{a}", "kind": "baseline", "w_bits": np.asarray(bits[0][0]).tolist(),
                          "a_bits": np.asarray(bits[1][0]).tolist(), "search_val_accuracy": None})
    bits_of = lambda r: (tuple(r["w_bits"]), tuple(r["a_bits"]))  # noqa: E731
    uniform = {bits_of(b) for b in baselines}
    F = history_objectives(history, cfg.search.objectives)
    mixed = np.flatnonzero([bits_of(r) not in uniform for r in history])
    front, primary = mixed[front_indices(F[mixed])], mixed[front_indices(F[mixed, :2])]
    chosen = []
    for b in baselines[::-1]:
        seen = [j for j, r in enumerate(history) if bits_of(r) == bits_of(b)]
        cheaper = primary[F[primary, 1] <= min(F[j, 1] for j in seen)] if seen else primary[:0]
        if cheaper.size and len(chosen) < cfg.final.max_models:
            chosen.append(int(cheaper[np.argmin(F[cheaper, 0])]))
    chosen = np.unique(np.asarray(chosen, int))
    for pool in (np.setdiff1d(primary, chosen), np.setdiff1d(front, np.union1d(primary, chosen))):
        chosen = np.concatenate([chosen, pool[pick_spread(F[pool, 1], cfg.final.max_models - len(chosen))]])
    chosen = chosen[np.argsort(F[chosen, 1], kind="stable")]
    models = [
        {"name": f"front_{i:02d}", "kind": "front", "w_bits": history[j]["w_bits"], "a_bits": history[j]["a_bits"],
         "search_val_accuracy": history[j]["val_accuracy"]}
        for i, j in enumerate(chosen)
    ]
    return models + baselines


def final_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg`` with its ``train`` section set to the final models' budget (``final``)."""
    fcfg = ml_collections.ConfigDict(cfg.to_dict())
    fcfg.train.epochs, fcfg.train.optimizer = cfg.final.epochs, cfg.final.optimizer
    fcfg.train.learning_rate, fcfg.train.warmup_epochs = cfg.final.learning_rate, 0
    return fcfg


def train_final(cfg, problem: Problem, models: list[dict], workdir: pathlib.Path) -> list[dict]:
    """Train every model of ``models`` with the same budget (``final``), side by side.

    The models not yet trained train as one population (:class:`qevo.train.PopulationTrainer`:
    spread over every device, run on each by ``search.strategy``), checkpointed after every
    epoch in ``final/checkpoint.msgpack``. Each model's folder ``final/<name>/`` holds its
    ``history.csv``, its variables as ``model.msgpack`` (what :mod:`qevo.export` reads) and
    ``results.json``; a model with results for its widths and its ``model.msgpack`` is not
    trained again. A model finished by an earlier qevo (one after another, each with its own
    ``checkpoint.msgpack``) before ``model.msgpack`` was written gets it from that checkpoint;
    one that lost it otherwise trains again (to the same variables: the training is seeded)."""
    fcfg = final_config(cfg)
    model, loss, metric = problem.evaluator.model, problem.evaluator.loss, problem.evaluator.metric
    final = workdir / "final"
    fitted = {}
    for m in models:
        folder = final / m["name"]
        saved = json.loads((folder / RESULTS).read_text()) if (folder / RESULTS).exists() else {}
        if (saved.get("w_bits"), saved.get("a_bits")) != (m["w_bits"], m["a_bits"]):
            continue
        if not (folder / MODEL).exists() and (folder / CHECKPOINT).exists():
            trainer = train.Trainer(fcfg, problem.ds, model, quantized=True, loss=loss, metric=metric)
            state, _ = checkpoint.load(folder / CHECKPOINT, trainer.init_state(problem.final_variables))
            checkpoint.save(folder / MODEL, state.variables, {"model": problem.model_name, "name": m["name"]})
        if (folder / MODEL).exists():
            fitted[m["name"]] = saved
    pending = [m for m in models if m["name"] not in fitted]
    if pending:
        folders = [final / m["name"] for m in pending]
        for folder in folders:  # a model trained with other widths (the candidates changed): train afresh
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        trainer = train.PopulationTrainer(fcfg, problem.ds, model, quantized=True, strategy=cfg.search.strategy,
                                          chunk_size=cfg.search.chunk_size, loss=loss, metric=metric)
        bits = Bits(w=np.array([m["w_bits"] for m in pending]), a=np.array([m["a_bits"] for m in pending]))
        key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
        variables, results = train.fit_population(fcfg, problem.ds, problem.final_variables, bits, folders, key,
                                                   f"final {len(pending)} models", trainer, final / CHECKPOINT)
        for i, (m, folder) in enumerate(zip(pending, folders, strict=True)):
            one = jax.tree_util.tree_map(lambda v, i=i: v[i], variables)
            checkpoint.save(folder / MODEL, one, {"model": problem.model_name, "name": m["name"]})
            fitted[m["name"]] = {**results[i], "w_bits": m["w_bits"], "a_bits": m["a_bits"]}
            write_json(folder / RESULTS, fitted[m["name"]])
    rows = []
    for m in models:
        c = problem.costs(Bits(w=np.asarray([m["w_bits"]]), a=np.asarray([m["a_bits"]])))
        f = fitted[m["name"]]
        rows.append({**m, "val_accuracy": f["val_accuracy"], "test_accuracy": f["test_accuracy"],
                     "epochs": f["epochs"], **{k: float(v[0]) for k, v in c.items()}})
    return rows


def pareto_rows(cfg, problem: Problem, history: list[dict]) -> list[dict]:
    """One row per distinct front model of the search, by ascending BitOps."""
    F = history_objectives(history, cfg.search.objectives)
    rows = []
    for j in front_indices(F):
        r = history[j]
        c = problem.costs(Bits(w=np.asarray([r["w_bits"]]), a=np.asarray([r["a_bits"]])))
        rows.append({"w_bits": r["w_bits"], "a_bits": r["a_bits"], "val_accuracy": r["val_accuracy"],
                     "generation": r["generation"], **{k: float(v[0]) for k, v in c.items()}})
    return sorted(rows, key=lambda r: (r["bitops"], -r["val_accuracy"]))


def plot(path: pathlib.Path, history: list[dict], final: list[dict], float_acc: float | None,
         table: cost.LayerTable) -> None:
    """``pareto.png``: accuracy against BitOps; searched models, the trained front, baselines, float."""
    with figure(path, (7, 4.5)) as ax:
        scored = [r for r in history if r["val_accuracy"] is not None]
        if scored:
            x = cost.bitops(table, np.array([r["w_bits"] for r in scored]), np.array([r["a_bits"] for r in scored]))
            y = 100 * np.array([r["val_accuracy"] for r in scored])
            ax.scatter(np.asarray(x), y, s=10, c="0.75", label="evaluated (validation, after search QAT)")
        front = [r for r in final if r["kind"] == "front"]
        if front:
            ax.plot([r["bitops"] for r in front], [100 * r["test_accuracy"] for r in front], "o-", c="C0",
                    label="front (test, after final training)")
        for i, r in enumerate(r for r in final if r["kind"] == "baseline"):
            ax.scatter([r["bitops"]], [100 * r["test_accuracy"]], marker="s", s=60, c=f"C{i + 1}",
                       label=f"uniform {r['name']} (test)", zorder=3)
        if float_acc is not None:
            ax.axhline(100 * float_acc, c="k", ls="--", lw=1, label="float (test)")
        ax.set_xscale("log")
        ax.set_xlabel("BitOps per image")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7, loc="lower right")


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


FINAL_COLUMNS = ["name", "kind", "w_bits", "a_bits", "search_val_accuracy", "val_accuracy", "test_accuracy", "epochs",
                 "bitops", "size", "flops", "params"]
PARETO_COLUMNS = ["w_bits", "a_bits", "val_accuracy", "generation", "bitops", "size", "flops", "params"]


@method(defaults, resolve=lambda cfg, objectives=None, **_: with_objectives(cfg, objectives or {}))
def run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, model=None, variables: dict | None = None,
        data: Dataset | None = None, objectives: dict | None = None, loss: Callable | None = None,
        metric: Callable | None = None) -> dict:
    """The whole protocol in ``workdir`` (resuming where it stopped); returns the summary.

    From Python, ``model=`` (any ``flax.linen`` network, unchanged), ``variables=`` (its
    trained float variables; None: trained here per ``cfg.train``) and ``data=`` (a
    :class:`qevo.data.Dataset`, e.g. :meth:`~qevo.data.Dataset.from_arrays`) replace
    ``cfg.model`` and ``cfg.data`` (:func:`qevo.train.resolve_inputs`). ``objectives=``
    adds named objectives, minimised beside ``search.objectives``: each
    ``f(w_bits, a_bits, table) -> [P]`` of a population's int widths ``[P, L]`` and the
    :class:`qevo.cost.LayerTable` (a latency lookup table, say); they go into the history,
    ``pareto.csv`` and ``final.csv`` under their names. ``loss=`` (``loss(logits, labels) ->
    float32 []``, the batch mean; default cross-entropy) is what the float model, every
    candidate's QAT and the final models train with; ``metric=`` (``metric(logits, labels) ->
    float32 [N]``, per example in [0, 1]; default top-1) is what every accuracy averages, so
    the ``error`` objective is one minus its mean. Both must be jit-traceable
    (:mod:`qevo.losses`)."""
    watch = Stopwatch()
    workdir.mkdir(parents=True, exist_ok=True)
    with watch.stage("prepare"):
        problem = prepare(cfg, workdir, model, variables, data, objectives, loss, metric)
        env = environment(problem.evaluator.model, problem.variables, problem.ds.train_images.shape[1:],
                          cfg.train.batch_size, cfg.model.precision)
    with watch.stage("search"):
        state, history = generations(cfg, problem, workdir)
    extra = list(problem.extra_objectives)
    write_csv(workdir / "pareto.csv", pareto_rows(cfg, problem, history), PARETO_COLUMNS + extra)
    with watch.stage("final"):
        final = (train_final(cfg, problem, final_candidates(cfg, problem.space, history), workdir)
                 if cfg.final.enabled else [])
    float_acc = problem.float_results.get("test_accuracy")
    rows = list(final)
    if float_acc is not None:
        num_layers = problem.table.num_layers
        float_costs = problem.costs(Bits(w=np.full((1, num_layers), 32), a=np.full((1, num_layers), 32)))
        rows.append({"name": "float", "kind": "float", "w_bits": [32] * num_layers, "a_bits": [32] * num_layers,
                     "test_accuracy": float_acc, **{k: float(v[0]) for k, v in float_costs.items()}})
    write_csv(workdir / "final.csv", rows, FINAL_COLUMNS + extra)
    plot(workdir / "pareto.png", history, final, float_acc, problem.table)
    results = {
        "model": problem.model_name,
        "dataset": problem.ds.name,
        "driver": cfg.search.driver,
        "evaluations": len(history),
        "throughput": throughput(state),
        "front_size": len(front_indices(history_objectives(history, cfg.search.objectives))),
        "float_test_accuracy": float_acc,
        "final": [{k: r[k] for k in ("name", "test_accuracy", "bitops", "size") if k in r} for r in rows],
        "seconds": watch.seconds(),
        **env,
    }
    write_json(workdir / RESULTS, results)
    return results


if __name__ == "__main__":
    from qevo.cli import main

    sys.exit(main("qevo.search", run, validate))
