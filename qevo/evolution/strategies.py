"""One ``init/ask/tell`` protocol for every driver that searches integer genomes.

A genome is int32 ``[G]``, gene ``g`` in ``[0, n_choices[g])`` (:mod:`qevo.evolution.variation`). A
strategy proposes genomes and learns from their objectives, as evosax's strategies do:

* ``init(key) -> state``: the state before the first generation;
* ``ask(key, state) -> (genes int32 [n, G], state)``: the genomes to evaluate;
* ``tell(key, genes, F, state) -> state``: their objectives ``F`` float ``[n, M]``, all
  minimised (NaN or infinite: infeasible, never a crash).

States are ``flax.struct`` dataclasses (checkpointed by :func:`qevo.evolution.loop.evolve`); every key
is passed in, none is kept. Two strategies serve every method:

* :class:`NSGA3`: a population kept by NSGA-III survival (:mod:`qevo.evolution.nsga3`), offspring by
  random mating, crossover and mutation (``offspring="evolve"``) or drawn uniformly
  (``offspring="random"``, random search with an NSGA-III archive);
* :class:`Evosax`: an evosax strategy on the relaxed genome (:mod:`qevo.evolution.drivers`), its
  fitness a scalarisation of ``F``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct
from jax.typing import ArrayLike

from qevo.evolution import drivers, nsga3, variation

Initial = Callable[[jax.Array], jax.Array]
"""``initial(key) -> genes int32 [n, G]``: a method's first population."""


class Strategy(Protocol):
    """What :func:`qevo.evolution.loop.evolve` drives (see the module docstring)."""

    def init(self, key: jax.Array) -> Any: ...

    def ask(self, key: jax.Array, state: Any) -> tuple[jax.Array, Any]: ...

    def tell(self, key: jax.Array, genes: ArrayLike, F: ArrayLike, state: Any) -> Any: ...


@struct.dataclass
class PopulationState:
    """An NSGA-III population.

    Attributes:
      genes: int32 ``[P, G]``, the survivors.
      objectives: float ``[P, M]``, theirs.
      normalisation: NSGA-III's carried ideal point and extremes.
      generation: int32 ``[]``, ``tell`` calls so far.
    """

    genes: jax.Array
    objectives: jax.Array
    normalisation: nsga3.NSGA3State
    generation: jax.Array


class NSGA3:
    """NSGA-III over integer genomes.

    Args:
      population_size: ``P``, the survivors of each generation.
      n_choices: int ``[G]``, candidates per gene.
      ref_dirs: float ``[K, M]``, the reference directions.
      initial: the first population (default ``P`` uniform random genomes).
      offspring: ``"evolve"`` (random mating, uniform crossover with ``crossover_prob``,
        mutation at ``mutation_rate``, :func:`qevo.evolution.variation.make_offspring`) or ``"random"``
        (uniform genomes).
      crossover_prob: probability that a pair of parents is crossed.
      mutation_rate: per-gene mutation probability, one for every gene or ``[G]`` (None: ``1 / G``).
      dtype: of the objectives and the normalisation.

    Offspring that repeat a survivor are re-mutated (:func:`qevo.evolution.variation.dedupe`).
    """

    def __init__(self, population_size: int, n_choices: ArrayLike, ref_dirs: ArrayLike,
                 initial: Initial | None = None, offspring: str = "evolve", crossover_prob: float = 0.9,
                 mutation_rate: float | ArrayLike | None = None, dtype: jnp.dtype = jnp.float32):
        self.size = population_size
        self.n_choices = jnp.asarray(n_choices, jnp.int32)
        self.ref_dirs = jnp.asarray(ref_dirs, jnp.float32)
        self.initial = initial or (lambda key: variation.random_genes(key, population_size, self.n_choices))
        self.offspring, self.crossover_prob, self.mutation_rate = offspring, crossover_prob, mutation_rate
        self.dtype = dtype

    def init(self, key: jax.Array) -> PopulationState:
        del key  # the first population comes from ``ask``
        m, g = self.ref_dirs.shape[1], self.n_choices.shape[0]
        return PopulationState(genes=jnp.zeros((self.size, g), jnp.int32),
                               objectives=jnp.zeros((self.size, m), self.dtype),
                               normalisation=nsga3.init_state(m, self.dtype), generation=jnp.zeros((), jnp.int32))

    def ask(self, key: jax.Array, state: PopulationState) -> tuple[jax.Array, PopulationState]:
        if int(state.generation) == 0:
            return jnp.asarray(self.initial(key), jnp.int32), state
        k_new, k_dedupe = jax.random.split(key)
        if self.offspring == "random":
            fresh = variation.random_genes(k_new, self.size, self.n_choices)
        else:
            fresh = variation.make_offspring(k_new, state.genes, self.size, self.n_choices, self.crossover_prob,
                                             self.mutation_rate)
        return variation.dedupe(k_dedupe, fresh, state.genes, self.n_choices), state

    def tell(self, key: jax.Array, genes: ArrayLike, F: ArrayLike, state: PopulationState) -> PopulationState:
        genes, F = jnp.asarray(genes, jnp.int32), jnp.asarray(F, self.dtype)
        if int(state.generation) > 0:
            genes, F = jnp.concatenate([state.genes, genes]), jnp.concatenate([state.objectives, F])
        idx, normalisation = nsga3.survive(F, self.ref_dirs, self.size, state.normalisation, key)
        return PopulationState(genes=genes[idx], objectives=F[idx], normalisation=normalisation,
                               generation=state.generation + 1)


@struct.dataclass
class RelaxedState:
    """An evosax strategy's state and the relaxed points ``x`` float32 ``[P, G]`` last asked."""

    driver: drivers.DriverState
    x: jax.Array


class Evosax:
    """An evosax strategy (:func:`qevo.evolution.drivers.make_driver`) on the relaxed genome.

    Args:
      name: a key of :data:`qevo.evolution.drivers.EVOSAX_NAMES`.
      population_size: ``P``.
      n_choices: int ``[G]``.
      scalarize: ``F [P, M] -> fitness float32 [P]``, minimised (:mod:`qevo.evolution.drivers`:
        weighted sum, Tchebycheff, budget).
    """

    def __init__(self, name: str, population_size: int, n_choices: ArrayLike,
                 scalarize: Callable[[jax.Array], jax.Array]):
        self.n_choices = jnp.asarray(n_choices, jnp.int32)
        self.driver = drivers.make_driver(name, population_size, int(self.n_choices.shape[0]))
        self.scalarize = scalarize

    def init(self, key: jax.Array) -> RelaxedState:
        shape = (self.driver.strategy.population_size, int(self.n_choices.shape[0]))
        return RelaxedState(driver=self.driver.init(key), x=jnp.zeros(shape, jnp.float32))

    def ask(self, key: jax.Array, state: RelaxedState) -> tuple[jax.Array, RelaxedState]:
        x, driver = self.driver.ask(key, state.driver)
        return drivers.relax_to_genes(x, self.n_choices), RelaxedState(driver=driver, x=x)

    def tell(self, key: jax.Array, genes: ArrayLike, F: ArrayLike, state: RelaxedState) -> RelaxedState:
        del genes  # evosax learns from the relaxed points it proposed
        return RelaxedState(driver=self.driver.tell(key, state.x, self.scalarize(jnp.asarray(F)), state.driver),
                            x=state.x)
