"""The search's generations, on the one resumable loop (:func:`qevo.evolution.loop.evolve`):
the strategy (:func:`make_strategy`: NSGA-III with the uniform seeds first, random search, or
an evosax driver on the relaxed genome), the keys each generation's evaluation draws
(:func:`evaluation_key`), Deb's constraint rule in the ranking (:func:`penalized`), the history
record of every candidate, and the search's throughput (:func:`throughput`).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.typing import ArrayLike

from qevo import config as config_lib
from qevo.evolution import drivers, nsga3, strategies, variation
from qevo.evolution.loop import LoopState, base_key, evolve, step_keys
from qevo.harness import StepLog, write_json
from qevo.search.config import reference_directions
from qevo.search.final import front_indices, history_objectives
from qevo.search.problem import Problem
from qevo.search.sensitivity import gene_sensitivity, ladder, mutation_rates


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


SENSITIVITY = "sensitivity.json"
SENSITIVITY_STREAM = 3  # fold_in(key(seed), 3): the sensitivity's QAT draws, apart from every other stream


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


def make_strategy(cfg: ml_collections.ConfigDict, problem: Problem,
                  sensitivity: np.ndarray | None = None) -> strategies.Strategy:
    """The driver of ``search.driver``: NSGA-III (``nsga3``; ``random``: uniform offspring
    with NSGA-III survival) whose first population holds the uniform seeds, then, with a
    per-gene ``sensitivity`` (:func:`qevo.search.sensitivity.gene_sensitivity`), genomes along
    its order for half the rest (:func:`~qevo.search.sensitivity.ladder`), then random genomes
    up to ``search.initial_samples``; with ``sensitivity`` its mutation favours the genes that
    cost little (:func:`~qevo.search.sensitivity.mutation_rates`). Or an evosax strategy on the
    scalarised objectives."""
    space, n = problem.space, cfg.population_size
    n_choices = jnp.asarray(space.n_choices)
    if cfg.search.driver in drivers.EVOSAX_NAMES:
        lower, upper = problem.bounds()
        return strategies.Evosax(cfg.search.driver, n, n_choices, lambda F: _scalarize(cfg, F, lower, upper))
    seeds = np.asarray(variation.uniform_genes(space.w_candidates, space.a_candidates, space.num_genes // 2,
                                               cfg.search.uniform_seeds), np.int32).reshape(-1, space.num_genes)
    total = cfg.search.initial_samples or n
    mutation_rate = cfg.search.mutation_rate
    if sensitivity is not None:
        lo, mid, hi = space.extremes()
        along = ladder(sensitivity, lo, mid, hi, (total - len(seeds)) // 2)
        seeds = np.concatenate([seeds, along[~(along[:, None] == seeds[None]).all(-1).any(-1)]])
        mutation_rate = jnp.asarray(mutation_rates(sensitivity, mutation_rate or 1.0 / space.num_genes))

    def initial(key: jax.Array) -> jax.Array:
        k_new, k_dedupe = jax.random.split(key)
        fresh = variation.random_genes(k_new, total - len(seeds), n_choices)
        genes = variation.dedupe(k_dedupe, fresh, jnp.asarray(seeds), n_choices)
        return jnp.concatenate([jnp.asarray(seeds, jnp.int32), genes])[:total]

    return strategies.NSGA3(n, n_choices, reference_directions(cfg), initial=initial,
                            offspring="random" if cfg.search.driver == "random" else "evolve",
                            crossover_prob=cfg.search.crossover_prob, mutation_rate=mutation_rate,
                            dtype=jax.dtypes.canonicalize_dtype(jnp.float64))


def sensitivity_of(cfg: ml_collections.ConfigDict, problem: Problem, workdir: pathlib.Path | None) -> np.ndarray:
    """The per-gene sensitivity (:func:`qevo.search.sensitivity.gene_sensitivity`), measured once
    on its own key and kept in ``<workdir>/sensitivity.json``, which a resumed run reads."""
    path = None if workdir is None else workdir / SENSITIVITY
    if path is not None and path.is_file():
        return np.asarray(json.loads(path.read_text())["genes"], np.float64)
    values = gene_sensitivity(problem, jax.random.fold_in(jax.random.key(cfg.seed), SENSITIVITY_STREAM))
    if path is not None:
        write_json(path, {"genes": values.tolist()})
    return values


def generations(cfg: ml_collections.ConfigDict, problem: Problem, workdir: pathlib.Path | None,
                sensitivity: np.ndarray | None = None) -> tuple[LoopState, list[dict]]:
    """Run (or resume) the search's generations (:func:`qevo.evolution.loop.evolve`): generation 0 is the
    first population, then ``cfg.generations`` more. Returns the loop's final state (its
    ``carry``: the seconds spent scoring, float64 ``[]``) and every evaluated individual's
    record (generation, genes, widths, objectives, validation accuracy, constraint violation)."""
    lower, upper = problem.bounds()
    names = tuple(cfg.search.objectives)

    def evaluate(generation: int, asked: jax.Array, key: jax.Array, scoring: np.ndarray):
        genes = np.asarray(asked)
        start = time.perf_counter()
        F, acc, rung = problem.objectives(genes, evaluation_key(cfg, key))
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
             "val_accuracy": _finite_or_none(v_acc), "violation": float(v), "rung": int(r)}
            for g, w, a, f, v_acc, v, r in zip(genes, bits.w, bits.a, F, acc, violation, rung, strict=True)
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
    return evolve(make_strategy(cfg, problem, sensitivity), evaluate, base_key=base_key(cfg.seed),
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
