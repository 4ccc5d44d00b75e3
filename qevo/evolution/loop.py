"""The one resumable generation loop of every evolutionary method, and its keys.

:func:`evolve` drives a :class:`qevo.evolution.strategies.Strategy` for a method: each generation it
asks for genomes, has the method evaluate them (one compiled population call), tells the
strategy their objectives and commits the generation to the work folder
(:class:`qevo.harness.StepLog`: ``history.jsonl``, then ``checkpoint.msgpack``, both
atomically), so a run killed at any moment resumes from its last generation to the same
result. The bit-width search and the weight sharing run on it; the coevolution's cycles use
its keys (:func:`step_keys`) and the same :class:`~qevo.harness.StepLog`.

Keys are derived from the step number and a base key, never carried: a checkpoint holds no
key, and a resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import struct

from qevo.evolution.strategies import Strategy
from qevo.harness import StepLog, progress


def base_key(seed: int) -> jax.Array:
    """A run's base key, from its ``cfg.seed``."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def init_key(base: jax.Array) -> jax.Array:
    """The key of what a run draws before its first step (a strategy's ``init``)."""
    return jax.random.fold_in(base, 2**31 - 1)


def step_keys(base: jax.Array, step: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys of step ``step``: ``(ask, evaluate, tell)``, three of the four subkeys of
    ``fold_in(base, step)`` (the fourth is left for a method's own use)."""
    ask, evaluate, tell, _ = jax.random.split(jax.random.fold_in(base, step), 4)
    return ask, evaluate, tell


@struct.dataclass
class LoopState:
    """What a checkpoint holds after ``generation`` generations.

    Attributes:
      generation: generations done.
      strategy: the strategy's state.
      carry: the method's own state across generations (a pytree; e.g. the weight
        sharing's fitness targets), or None.
      evaluations: genomes evaluated so far.
      seconds: wall seconds spent in the generations so far.
    """

    generation: int
    strategy: Any
    carry: Any
    evaluations: int
    seconds: float


Evaluate = Callable[[int, jax.Array, jax.Array, Any], tuple[np.ndarray, list[dict], Any]]
"""``evaluate(generation, genes int32 [n, G], key, carry) -> (F float [n, M], records, carry)``:
the objectives the strategy selects on (minimised), the history records of the generation
and the method's new carry."""


def evolve(strategy: Strategy, evaluate: Evaluate, *, base_key: jax.Array, generations: int, steps: StepLog,
           desc: str, carry: Any = None, report: Callable[[LoopState, list[dict]], str] | None = None,
           ) -> tuple[LoopState, list[dict]]:
    """Run (or resume) ``generations`` generations of ``strategy`` on ``evaluate``.

    Args:
      strategy: the driver.
      evaluate: the method's population call (:data:`Evaluate`).
      base_key: the run's key (:func:`base_key`); generation ``g`` uses :func:`step_keys`
        ``(base_key, g)`` and the strategy's ``init`` :func:`init_key` ``(base_key)``.
      generations: the total, including those a resumed run already did.
      steps: the work folder's step log (unit ``"generation"``).
      desc: the progress bar's label.
      carry: the method's initial carry.
      report: ``report(state, history) -> str``, the line written after each generation
        (with the estimated time left, :class:`qevo.harness.Progress`); None: no progress shown.

    Returns:
      ``(state, history)``: the final state and every record of every generation.
    """
    initial = LoopState(generation=0, strategy=strategy.init(init_key(base_key)),
                        carry=carry, evaluations=0, seconds=0.0)
    state, history = steps.resume(initial)
    state = dataclasses.replace(state, generation=int(state.generation), evaluations=int(state.evaluations),
                                seconds=float(state.seconds))
    bar = progress(generations, state.generation, desc, show=report is not None)
    try:
        while state.generation < generations:
            start = time.perf_counter()
            k_ask, k_eval, k_tell = step_keys(base_key, state.generation)
            genes, strategy_state = strategy.ask(k_ask, state.strategy)
            F, records, carry = evaluate(state.generation, genes, k_eval, state.carry)
            strategy_state = strategy.tell(k_tell, genes, F, strategy_state)
            state = LoopState(generation=state.generation + 1, strategy=strategy_state, carry=carry,
                              evaluations=state.evaluations + len(genes),
                              seconds=state.seconds + time.perf_counter() - start)
            history.extend(records)
            steps.commit(state, history, state.generation)
            bar.step(report(state, history) if report is not None else "")
    finally:
        bar.close()
    return state, history
