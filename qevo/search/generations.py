"""The search's generations, on the one resumable loop (:func:`qevo.evolution.loop.evolve`):
the strategy (:func:`make_strategy`: NSGA-III with the uniform seeds first, random search, or
an evosax driver on the relaxed genome), the keys each generation's evaluation draws
(:func:`evaluation_key`), Deb's constraint rule in the ranking (:func:`penalized`), the history
record of every candidate, and the search's throughput (:func:`throughput`).
"""

from __future__ import annotations

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
from qevo.harness import (
    StepLog,
)
from qevo.search.config import reference_directions
from qevo.search.final import front_indices, history_objectives
from qevo.search.problem import Problem


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
    """Run (or resume) the search's generations (:func:`qevo.evolution.loop.evolve`): generation 0 is the
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
