"""The weight sharing's generations: the state the loop carries (:class:`Targets`: the
accuracy and compression-rate targets, moved as the population improves), one generation of
scoring (:class:`Generation`), the k each layer may take (:func:`candidate_k`,
:func:`allowed_k`, from the single-layer range test), and the records, fronts and picks of
the evaluated genomes (:func:`scores_to_records`, :func:`front`, :func:`pick`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qevo.evolution import nsga3, strategies
from qevo.sharing import clusters
from qevo.sharing.codebook import key_bits
from qevo.sharing.config import EVOSAX_DRIVERS


@flax.struct.dataclass
class Problem:
    """Everything a generation reads (device arrays; the arguments of the compiled steps).

    Attributes:
      variables: the float model's variables.
      table: the cluster table of every (layer, k).
      centroids: float32 ``[L, K, K]`` table codebooks rounded to the search format.
      batches: the validation split as ``batch_eval_set`` batches.
      allowed: int32 ``[L, K]``: gene ``g`` of layer ``l`` means ``k - 1 = allowed[l, g]``
        (ascending; entries from ``n_choices[l]`` on repeat the last).
      n_choices: int32 ``[L]``, kept k per layer.
      floor: float32, the accuracy floor (float validation accuracy minus the allowed loss).
      float_accuracy: float32, the float model's validation accuracy.
    """

    variables: dict
    table: clusters.ClusterTable
    centroids: jax.Array
    batches: tuple
    allowed: jax.Array
    n_choices: jax.Array
    floor: jax.Array
    float_accuracy: jax.Array


@flax.struct.dataclass
class Scores:
    """One generation: genes int32 ``[P, L]``, k int32 ``[P, L]``, validation accuracy,
    mean-of-layers and size-weighted CR (search format) and the seed's Fit, float32 ``[P]``."""

    genes: jax.Array
    k: jax.Array
    accuracy: jax.Array
    cr_mean: jax.Array
    cr_weighted: jax.Array
    fit: jax.Array


@flax.struct.dataclass
class Targets:
    """The seed's dynamic fitness targets, carried across generations: float32 ``[]`` each."""

    acc_target: jax.Array | np.ndarray
    cr_target: jax.Array | np.ndarray


def candidate_k(k_max: int, k_values=()) -> np.ndarray:
    """int32: the candidate cluster counts, ``k_values`` or, if empty, every k in ``1..k_max``."""
    return np.asarray(k_values if len(k_values) else np.arange(1, k_max + 1), np.int32)


def range_population(num_layers: int, ks: np.ndarray) -> np.ndarray:
    """int32 ``[L * len(ks), L]`` of ``k - 1`` (-1: float): row ``l * len(ks) + j`` shares only
    layer ``l``, with ``ks[j]`` clusters."""
    rows = np.full((num_layers, len(ks), num_layers), -1, np.int32)
    for i in range(num_layers):
        rows[i, :, i] = np.asarray(ks) - 1
    return rows.reshape(-1, num_layers)


def allowed_k(range_acc: np.ndarray, float_acc: float, max_loss: float,
              widest_per_key: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The range filter: ``(allowed int32 [L, K], n_choices int32 [L])`` from ``range_acc [L, K]``.

    A layer keeps every k whose accuracy is at least ``float_acc - max_loss / 100``; a layer
    where none passes keeps its most accurate k.  NaN marks a k that is not a candidate
    (``sharing.k_values``): it is never kept.  With ``widest_per_key``, of the kept k
    sharing one key width ``max(ceil(log2 k), 1)`` only the largest stays: a larger k of the
    same key width costs only its extra codebook entries (on LeNet-5's fc1, 33 bits against
    48,000 key bits) and clusters the layer at least as finely.
    """
    num_layers, k_max = range_acc.shape
    allowed = np.zeros((num_layers, k_max), np.int32)
    counts = np.zeros(num_layers, np.int32)
    widths = np.asarray(key_bits(np.arange(1, k_max + 1)))
    for i in range(num_layers):
        keep = np.flatnonzero(range_acc[i] >= float_acc - max_loss / 100)
        if keep.size == 0:
            keep = np.array([int(np.nanargmax(range_acc[i]))])
        if widest_per_key:
            keep = np.array([keep[widths[keep] == b].max() for b in np.unique(widths[keep])])
        allowed[i, : keep.size] = keep
        allowed[i, keep.size :] = keep[-1]
        counts[i] = keep.size
    return allowed, counts


class Generation:
    """The weight sharing's population call and its driver (:func:`qevo.evolution.loop.evolve`).

    ``score(problem, genes, targets)`` scores genomes int32 ``[P, L]`` (compiled once);
    ``strategy`` is the ``sharing.driver``: NSGA-III on (1 - accuracy, 1 / size-weighted CR),
    random genomes (kept by NSGA-III survival), or an evosax strategy minimising the seed's
    fitness (:func:`minimised`).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, evaluator: clusters.SharedEvaluator, num_layers: int):
        self.cfg, self.evaluator, self.num_layers = cfg, evaluator, num_layers
        self.score = evaluator.jit(self._score)

    def strategy(self, problem: Problem) -> strategies.Strategy:
        s = self.cfg.sharing
        if s.driver in EVOSAX_DRIVERS:
            return strategies.Evosax(s.driver, self.cfg.population_size, problem.n_choices, lambda F: F[:, 0])
        return strategies.NSGA3(self.cfg.population_size, problem.n_choices, nsga3.das_dennis(2, s.nsga3_partitions),
                                offspring="random" if s.driver == "random" else "evolve")

    def _score(self, problem: Problem, genes: jax.Array, targets: Targets) -> tuple[Scores, jax.Array, Targets]:
        """``(scores, F, targets)``: the scores of ``genes``, what the driver minimises (NSGA-III's
        objectives ``[P, 2]``, an evosax strategy's fitness ``[P, 1]``) and the moved targets."""
        k_idx = problem.allowed[jnp.arange(self.num_layers)[None, :], genes]
        acc = self.evaluator.accuracy_of_k(problem.variables, problem.table, problem.centroids, k_idx, problem.batches)
        cr_mean, cr_weighted = clusters.compression_rates(k_idx + 1, problem.table.sizes, self.cfg.sharing.codebook)
        cr = cr_weighted if self.cfg.sharing.fitness_cr == "weighted" else cr_mean
        fit = clusters.seed_fitness(acc, cr, targets.acc_target, targets.cr_target)
        scores = Scores(genes=genes, k=k_idx + 1, accuracy=acc, cr_mean=cr_mean, cr_weighted=cr_weighted, fit=fit)
        F = (minimised(self.cfg, problem, scores)[:, None] if self.cfg.sharing.driver in EVOSAX_DRIVERS
             else _objectives(scores))
        return scores, F, _move_targets(targets, problem, scores, self.cfg)


def minimised(cfg: ml_collections.ConfigDict, problem: Problem, scores: Scores) -> jax.Array:
    """float32 ``[P]``: the evosax drivers' fitness, the seed's Fit negated (constrained to the
    accuracy floor with ``sharing.constrain_fitness``)."""
    if cfg.sharing.constrain_fitness:
        return clusters.constrained_fitness(scores.fit, scores.accuracy, problem.floor)
    return jnp.where(jnp.isfinite(scores.fit), -scores.fit, jnp.inf)


def _objectives(scores: Scores) -> jax.Array:
    """NSGA-III objectives float32 ``[P, 2]``: 1 - accuracy and 1 / size-weighted CR (NaN accuracy stays NaN)."""
    return jnp.stack([1.0 - scores.accuracy, 1.0 / scores.cr_weighted], axis=1)


def _move_targets(targets: Targets, problem: Problem, scores: Scores, cfg) -> Targets:
    """The seed's dynamic targets: a target reached by the generation's best value (CR among
    the networks above the accuracy floor) moves to that value plus its offset."""
    s = cfg.sharing
    acc = jnp.where(jnp.isfinite(scores.accuracy), scores.accuracy, -jnp.inf)
    cr = scores.cr_weighted if s.fitness_cr == "weighted" else scores.cr_mean
    best_acc = jnp.max(acc)
    best_cr = jnp.max(jnp.where(acc >= problem.floor, cr, -jnp.inf))
    return Targets(
        acc_target=jnp.where(best_acc >= targets.acc_target, best_acc + s.acc_offset, targets.acc_target),
        cr_target=jnp.where(best_cr >= targets.cr_target, best_cr + s.cr_offset, targets.cr_target),
    )


def scores_to_records(scores: Scores) -> list[dict]:
    """JSON-able rows of one generation."""
    s = jax.device_get(scores)
    return [
        {"k": s.k[i].tolist(), "val_accuracy": float(s.accuracy[i]), "cr_mean": float(s.cr_mean[i]),
         "cr_weighted": float(s.cr_weighted[i]), "fitness": float(s.fit[i])}
        for i in range(s.k.shape[0])
    ]


def pick(records: list[dict], floor: float, cr_key: str, acc_key: str = "val_accuracy") -> dict:
    """The result of a search: of the records with ``acc_key >= floor``, the highest
    ``cr_key`` (ties: higher accuracy); if none, the most accurate record.  Adds ``feasible``."""
    feasible = [r for r in records if r[acc_key] >= floor]
    if feasible:
        return {**max(feasible, key=lambda r: (r[cr_key], r[acc_key])), "feasible": True}
    return {**max(records, key=lambda r: (r[acc_key], r[cr_key])), "feasible": False}


FRONT_KEYS = ("val_accuracy", "cr_mean", "cr_weighted")


def front_keys(row: dict) -> tuple[str, ...]:
    """The reported keys of a front row: :data:`FRONT_KEYS`, and ``held_out_accuracy`` if scored."""
    return (*FRONT_KEYS, "held_out_accuracy") if "held_out_accuracy" in row else FRONT_KEYS


def front(records: list[dict], cr_key: str = "cr_weighted") -> list[dict]:
    """Distinct non-dominated records on (validation accuracy, ``cr_key``), by that CR."""
    unique = {tuple(r["k"]): r for r in records if np.isfinite(r["val_accuracy"])}
    rows = list(unique.values())
    F = np.array([[1 - r["val_accuracy"], -r[cr_key]] for r in rows], np.float32)
    rank = np.asarray(nsga3.non_dominated_rank(jnp.asarray(F)))
    return sorted((r for r, q in zip(rows, rank, strict=True) if q == 0), key=lambda r: r[cr_key])
