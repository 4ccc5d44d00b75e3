"""Single-objective search drivers from evosax 0.3 over a continuous relaxation of the genome.

The integer genome (int32 ``[P, G]``, gene ``g`` in ``[0, n_choices[g])``, see
:mod:`qevo.evolution.variation`) is relaxed to ``x`` in ``[0, 1]^G``: gene ``g`` is ``floor(x_g *
n_choices[g])``. An evosax strategy searches ``x``; the objectives of the decoded genomes
(``F`` ``[P, M]``, all minimised, e.g. ``[1 - accuracy, bitops, size]``) are scalarised into
one fitness to minimise, as evosax minimises. Non-finite objectives give the fitness
``WORST_FITNESS``, a large finite number, so that no NaN reaches evosax.

Shapes: ``P`` individuals, ``G`` genes, ``M`` objectives.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qevo.errors import ConfigError

if TYPE_CHECKING:
    from evosax.algorithms.base import EvolutionaryAlgorithm

WORST_FITNESS = 2.0**100  # fitness of non-finite rows (about 1.3e30, exact in float32)

# Driver name -> evosax 0.3 class name.  evosax is imported when a driver is made, not with
# this module: importing it computes on the default device, and a run of several processes
# must join (qevo.distributed) before any computation.
EVOSAX_NAMES = {"simple_ga": "SimpleGA", "cma_es": "CMA_ES", "pso": "PSO", "de": "DifferentialEvolution"}


@functools.cache
def evosax_strategies() -> dict[str, type]:
    """Driver name -> evosax strategy class (``EVOSAX_STRATEGIES``)."""
    import evosax.algorithms as ea

    return {name: getattr(ea, cls) for name, cls in EVOSAX_NAMES.items()}


def __getattr__(name):
    if name == "EVOSAX_STRATEGIES":
        return evosax_strategies()
    raise AttributeError(f"module 'qevo.evolution.drivers' has no attribute {name!r}")

INITIAL_MEAN = 0.5  # centre of the relaxed box, the distribution-based strategies' start

# Step sizes for the unit box, replacing evosax's defaults of 1 (a GA mutation std of 1
# sends most children out of the box, where the clipped genes form flat plateaus).
BOX_DEFAULTS = {
    "simple_ga": {"std_schedule": optax.constant_schedule(0.1)},
    "cma_es": {"std_init": 0.25},
}


def relax_to_genes(x: jax.Array, n_choices: jax.Array) -> jax.Array:
    """Genes of relaxed points.

    Args:
        x: float ``[P, G]``, clipped to ``[0, 1]``.
        n_choices: int ``[G]``.

    Returns:
        int32 ``[P, G]``, ``min(floor(x * n_choices), n_choices - 1)``.
    """
    n_choices = jnp.asarray(n_choices, jnp.int32)
    genes = jnp.floor(jnp.clip(x, 0.0, 1.0) * n_choices).astype(jnp.int32)
    return jnp.minimum(genes, n_choices - 1)


def genes_to_relaxed(genes: jax.Array, n_choices: jax.Array) -> jax.Array:
    """Centres of the relaxed cells of genes, the inverse of :func:`relax_to_genes`.

    Args:
        genes: int ``[P, G]``.
        n_choices: int ``[G]``.

    Returns:
        float32 ``[P, G]``, ``(genes + 0.5) / n_choices``.
    """
    return ((genes + 0.5) / jnp.asarray(n_choices, jnp.float32)).astype(jnp.float32)


def _normalise(F: jax.Array, lower: jax.Array, upper: jax.Array) -> jax.Array:
    """float ``[..., M]``: ``(F - lower) / (upper - lower)``, a zero range counting as 1."""
    lower = jnp.asarray(lower, jnp.float32)
    span = jnp.asarray(upper, jnp.float32) - lower
    return (jnp.asarray(F, jnp.float32) - lower) / jnp.where(span == 0, 1.0, span)


def _finite_or_worst(F: jax.Array, fitness: jax.Array) -> jax.Array:
    """float32 ``[P]``: ``fitness``, or ``WORST_FITNESS`` where it or its row of ``F`` is
    not finite."""
    bad = ~jnp.all(jnp.isfinite(F), axis=1) | ~jnp.isfinite(fitness)
    return jnp.where(bad, WORST_FITNESS, fitness).astype(jnp.float32)


def weighted_sum(F: jax.Array, weights: jax.Array, lower: jax.Array,
                 upper: jax.Array) -> jax.Array:
    """Weighted sum of normalised objectives.

    Args:
        F: float ``[P, M]``, minimised.
        weights: float ``[M]``.
        lower: float ``[M]``, objective values mapped to 0.
        upper: float ``[M]``, objective values mapped to 1.

    Returns:
        float32 ``[P]``, ``sum_m weights[m] * (F[:, m] - lower[m]) / (upper[m] - lower[m])``.
    """
    return _finite_or_worst(F, _normalise(F, lower, upper) @ jnp.asarray(weights, jnp.float32))


def tchebycheff(F: jax.Array, weights: jax.Array, ideal: jax.Array, lower: jax.Array,
                upper: jax.Array) -> jax.Array:
    """Weighted Tchebycheff distance to an ideal point, in normalised objectives.

    Args:
        F: float ``[P, M]``, minimised.
        weights: float ``[M]``.
        ideal: float ``[M]``, the reference point (objective units).
        lower: float ``[M]``, objective values mapped to 0.
        upper: float ``[M]``, objective values mapped to 1.

    Returns:
        float32 ``[P]``, ``max_m weights[m] * |n(F)[:, m] - n(ideal)[m]|`` with ``n`` the
        normalisation of :func:`weighted_sum`.
    """
    distance = jnp.abs(_normalise(F, lower, upper) - _normalise(ideal, lower, upper))
    return _finite_or_worst(F, jnp.max(jnp.asarray(weights, jnp.float32) * distance, axis=1))


def budget(F: jax.Array, budget: float, lower: jax.Array, upper: jax.Array,
           cost_index: int = 1, error_index: int = 0, penalty: float = 10.0) -> jax.Array:
    """Error under a cost budget, infeasible rows penalised by their excess.

    Objectives are normalised as in :func:`weighted_sum`. A row whose cost is within the
    budget gets its normalised error; one over the budget gets ``1 + penalty * excess``,
    ``excess`` being the normalised cost minus the normalised budget, so it ranks after
    every feasible row whose error is within its bounds, and nearer the budget is better.

    Args:
        F: float ``[P, M]``, minimised.
        budget: largest allowed cost, in the units of ``F[:, cost_index]``.
        lower: float ``[M]``, objective values mapped to 0.
        upper: float ``[M]``, objective values mapped to 1.
        cost_index: column of the budgeted cost (e.g. bitops).
        error_index: column of the error to minimise (e.g. ``1 - accuracy``).
        penalty: fitness added per unit of normalised excess.

    Returns:
        float32 ``[P]``.
    """
    lower, upper = jnp.asarray(lower, jnp.float32), jnp.asarray(upper, jnp.float32)
    normalised = _normalise(F, lower, upper)
    limit = _normalise(jnp.asarray(budget, jnp.float32), lower[cost_index], upper[cost_index])
    excess = normalised[:, cost_index] - limit
    fitness = jnp.where(excess <= 0, normalised[:, error_index], 1.0 + penalty * excess)
    return _finite_or_worst(F, fitness)


@flax.struct.dataclass
class DriverState:
    """State of a :class:`Driver`.

    Attributes:
        strategy: the evosax strategy's state.
        generation: int32 ``[]``, the number of ``tell`` calls so far.
    """

    strategy: Any  # of the evosax strategy's own state class
    generation: jax.Array


class Driver:
    """An evosax strategy searching the relaxed genome box ``[0, 1]^G``.

    Distribution-based strategies (CMA-ES) start from the mean ``INITIAL_MEAN`` in every
    coordinate. Population-based strategies (GA, PSO, DE) need an evaluated population to
    start (evosax 0.3's ``init(key, population, fitness, params)``): ``init`` gives them a
    uniform random population in the box with fitness ``+inf``, the first ``ask`` returns
    that population, and the first ``tell`` stores it with its fitness (every member
    replaces its ``+inf`` predecessor, which is what evosax's ``init`` would store). All
    methods run under ``jax.jit`` with the driver closed over.

    Attributes:
        strategy: the evosax strategy.
        params: its params.
    """

    def __init__(self, strategy: EvolutionaryAlgorithm, params: object):
        self.strategy = strategy
        self.params = params
        from evosax.algorithms.population_based.base import PopulationBasedAlgorithm

        self._population_based = isinstance(strategy, PopulationBasedAlgorithm)

    def init(self, key: jax.Array) -> DriverState:
        """The state before the first generation."""
        shape = (self.strategy.population_size, self.strategy.num_dims)
        key_init, key_population = jax.random.split(key)
        if self._population_based:
            population = jax.random.uniform(key_population, shape)
            state = self.strategy.init(key_init, population, jnp.full(shape[:1], jnp.inf),
                                       self.params)
        else:
            mean = jnp.full(shape[1:], INITIAL_MEAN, jnp.float32)
            state = self.strategy.init(key_init, mean, self.params)
        return DriverState(strategy=state, generation=jnp.zeros((), jnp.int32))

    def ask(self, key: jax.Array, state: DriverState) -> tuple[jax.Array, DriverState]:
        """Candidates to evaluate: float ``[P, G]`` (not clipped) and the updated state."""
        if self._population_based:
            x, strategy_state = jax.lax.cond(
                state.generation == 0,
                lambda: (state.strategy.population, state.strategy),
                lambda: self.strategy.ask(key, state.strategy, self.params))
        else:
            x, strategy_state = self.strategy.ask(key, state.strategy, self.params)
        return x, dataclasses.replace(state, strategy=strategy_state)

    def tell(self, key: jax.Array, x: jax.Array, fitness: jax.Array,
             state: DriverState) -> DriverState:
        """Update with the fitness (float ``[P]``, minimised) of the asked ``x``; a
        non-finite fitness counts as ``WORST_FITNESS``."""
        fitness = jnp.where(jnp.isfinite(fitness), fitness, WORST_FITNESS)
        strategy_state, _ = self.strategy.tell(key, x, fitness, state.strategy, self.params)
        return DriverState(strategy=strategy_state, generation=state.generation + 1)


def make_driver(name: str, population_size: int, num_genes: int, **strategy_kwargs) -> Driver:
    """A :class:`Driver` for the evosax strategy ``EVOSAX_STRATEGIES[name]``.

    Args:
        name: key of ``EVOSAX_STRATEGIES``.
        population_size: ``P``.
        num_genes: ``G``, the dimension of the relaxed box.
        **strategy_kwargs (Any): arguments of the strategy's constructor (e.g. ``std_schedule``
            of ``simple_ga``), or fields of its params replacing the defaults (e.g.
            ``std_init`` of ``cma_es``, ``crossover_rate`` of ``de``); they override
            ``BOX_DEFAULTS``.

    Raises:
        ValueError: unknown name or keyword.
    """
    if name not in EVOSAX_NAMES:
        raise ConfigError(f"unknown driver {name!r}; valid: {', '.join(sorted(EVOSAX_NAMES))}")
    cls = evosax_strategies()[name]
    strategy_kwargs = BOX_DEFAULTS.get(name, {}) | strategy_kwargs
    constructor_names = set(inspect.signature(cls.__init__).parameters) - {
        "self", "population_size", "solution"}
    strategy = cls(population_size=population_size, solution=jnp.zeros(num_genes, jnp.float32),
                   **{k: v for k, v in strategy_kwargs.items() if k in constructor_names})
    params = strategy.default_params
    param_names = set(params.__dataclass_fields__)
    unknown = set(strategy_kwargs) - constructor_names - param_names
    if unknown:
        raise ConfigError(f"unknown keywords {sorted(unknown)} for driver {name!r}; valid: "
                          f"{', '.join(sorted(constructor_names | param_names))}")
    return Driver(strategy, params.replace(**{k: v for k, v in strategy_kwargs.items()
                                              if k in param_names}))

