"""Weight-sharing compression: ``python -m qevo.compress --config configs/lenet5_sharing.py``.

The seed's protocol (docs/spec.md#weight-sharing), on the validation split:

0. the float model (trained in ``<workdir>/float`` or loaded from ``float_from``);
1. the k-means of every shared layer for every k in ``1..sharing.k_max``, in batched calls,
   as a lookup table (:func:`qevo.sharing.build_table`);
2. range optimisation: each layer alone shared with each candidate k (``sharing.k_values``,
   default every k in ``1..k_max``), all ``L * len(k_values)`` networks in one compiled
   population call; a layer keeps the k whose accuracy is at least the float accuracy minus
   ``sharing.range_max_loss`` points (and with ``sharing.widest_per_key``, our addition,
   only the largest kept k of each key width, see :func:`allowed_k`);
3. search over per-layer k (genes index the kept k of each layer) by ``sharing.driver``:
   evosax ``simple_ga``, ``pso``, ``cma_es``, ``de`` on the relaxed genome, ``random``
   search, all with the seed's fitness Fit and dynamic targets; or ``nsga3`` on
   (1 - accuracy, 1 / CR).  One compiled call per generation (ask, population accuracy,
   fitness, tell, targets), ``population_size`` individuals for ``generations``
   generations whatever the driver (equal evaluation budgets);
4. the result: of every evaluated network whose validation accuracy is at least the float
   accuracy minus ``sharing.max_accuracy_loss`` points, the one with the highest CR
   (``sharing.fitness_cr``), then the seed's per-layer search of focus and spread, a
   layer's 2-D clustering kept only where validation accuracy improves.  With held-out
   images (below) the pick is made on them instead: of the non-dominated networks that meet
   the floor on the scoring images, the highest CR within ``sharing.max_accuracy_loss``
   points of the float model on the held-out images (else the most accurate there); the
   refinement is kept only if it does not lower held-out accuracy;
5. validation and test accuracy and both CRs for every codebook format of
   ``sharing.report_formats``; each compressed model saved as indices + codebooks and
   reloaded to check its test accuracy.

Steps 2 to 4 score networks on the first ``sharing.eval_images`` validation images (default:
all of them), so that a large network's search fits its budget; the accuracy floor and
targets are then relative to the float model on those images.  The remaining validation
images are held out: the search never sees them, so the pick in step 4 is not chosen on the
noise that thousands of evaluations on the scoring images select for.  Step 5 reports on the
whole validation and test splits.

Accuracy throughout is the mean over the images of the run's per-example metric: top-1
unless :func:`run` is given a ``metric=`` of the user's (:mod:`qevo.losses`).

Fitness: Fit = 1 / sqrt((1 - ACC/ACC_t)^2 + (1 - CR/CR_t)^2) (maximised).  After each
generation a target that the best value of the generation reached moves to that value plus
its offset (``sharing.acc_offset``, ``sharing.cr_offset``).  With
``sharing.constrain_fitness`` (default) a network under the accuracy floor ranks after
every network above it (its fitness is ``1 + floor - accuracy`` against ``-Fit``), so the
drivers spend their budget where the result is chosen.

Outputs in the work folder: ``config.json``, ``range.json`` (accuracy of every (layer, k)),
``history.jsonl`` (every individual of every generation: k, validation accuracy, both CRs,
fitness), ``checkpoint.msgpack`` (resume), ``results.json``, ``compressed_<format>.msgpack``,
and for ``nsga3`` ``front.csv`` and ``front.png`` (the non-dominated evaluated networks,
also under ``"front"`` in ``results.json``, so that a user can pick a point).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qevo import config as config_lib
from qevo import distributed, nsga3, sharing, strategies
from qevo.codebook import CODEBOOK_BITS, key_bits, quantize_codebook
from qevo.data import Dataset
from qevo.harness import RESULTS, StepLog, Stopwatch, environment, figure, method, write_csv, write_json
from qevo.interception import QevoModel
from qevo.loop import LoopState, base_key, evolve
from qevo.population import batch_eval_set
from qevo.pretrained import float_model
from qevo.train import resolve_inputs

EVOSAX_DRIVERS = ("simple_ga", "pso", "cma_es", "de")  # qevo.drivers names
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
    table: sharing.ClusterTable
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
    """The weight sharing's population call and its driver (:func:`qevo.loop.evolve`).

    ``score(problem, genes, targets)`` scores genomes int32 ``[P, L]`` (compiled once);
    ``strategy`` is the ``sharing.driver``: NSGA-III on (1 - accuracy, 1 / size-weighted CR),
    random genomes (kept by NSGA-III survival), or an evosax strategy minimising the seed's
    fitness (:func:`minimised`).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, evaluator: sharing.SharedEvaluator, num_layers: int):
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
        cr_mean, cr_weighted = sharing.compression_rates(k_idx + 1, problem.table.sizes, self.cfg.sharing.codebook)
        cr = cr_weighted if self.cfg.sharing.fitness_cr == "weighted" else cr_mean
        fit = sharing.seed_fitness(acc, cr, targets.acc_target, targets.cr_target)
        scores = Scores(genes=genes, k=k_idx + 1, accuracy=acc, cr_mean=cr_mean, cr_weighted=cr_weighted, fit=fit)
        F = (minimised(self.cfg, problem, scores)[:, None] if self.cfg.sharing.driver in EVOSAX_DRIVERS
             else _objectives(scores))
        return scores, F, _move_targets(targets, problem, scores, self.cfg)


def minimised(cfg: ml_collections.ConfigDict, problem: Problem, scores: Scores) -> jax.Array:
    """float32 ``[P]``: the evosax drivers' fitness, the seed's Fit negated (constrained to the
    accuracy floor with ``sharing.constrain_fitness``)."""
    if cfg.sharing.constrain_fitness:
        return sharing.constrained_fitness(scores.fit, scores.accuracy, problem.floor)
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


@dataclasses.dataclass
class Prepared:
    """The float model, data and cluster table of a run, shared by searches (benchmarks).

    ``score`` holds the batches that steps 2 to 4 score on (the first ``sharing.eval_images``
    validation images) and ``float_score`` the float model's accuracy on them; ``held_out``
    the other validation images (None if there are none) and ``float_held_out`` its
    accuracy there; ``val`` and ``float_val`` are the whole validation split, for the
    report.  ``accuracy`` is the compiled ``evaluator.accuracy(variables, kernels, batches)``.
    ``candidates`` are the candidate k (int32, :func:`candidate_k`) and ``range_acc`` float
    ``[L, k_max]``, NaN where k is not a candidate."""

    cfg: ml_collections.ConfigDict
    ds: Dataset
    model: QevoModel
    model_name: str
    evaluator: sharing.SharedEvaluator
    accuracy: Callable
    variables: dict
    paths: tuple
    table: sharing.ClusterTable
    val: tuple
    test: tuple
    score: tuple
    held_out: tuple | None
    float_val: float
    float_test: float
    float_score: float
    float_held_out: float | None
    candidates: np.ndarray
    range_acc: np.ndarray
    seconds: dict


def prepare(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, model=None, variables: dict | None = None,
            data: Dataset | None = None, loss: Callable | None = None, metric: Callable | None = None) -> Prepared:
    """Steps 0 to 2: float model, cluster table, range accuracy of every (layer, k)
    (``model``, ``variables``, ``data``, ``loss``, ``metric``: :func:`qevo.train.resolve_inputs`)."""
    seconds = {}
    inputs = resolve_inputs(cfg, model, variables, data, loss, metric)
    ds, model = inputs.ds, inputs.model
    t = time.perf_counter()
    variables = (inputs.variables if inputs.variables is not None
                 else float_model(cfg, ds, model, workdir, inputs.loss, inputs.metric)[0])
    seconds["float_model"] = time.perf_counter() - t
    paths = sharing.kernel_paths(variables["params"])
    evaluator = sharing.SharedEvaluator(model, ds.mean, ds.std, paths, strategy=cfg.sharing.strategy,
                                        metric=inputs.metric)
    if ds.val_images.shape[0] == 0:
        raise config_lib.ConfigError("the search needs a validation split: set data.val_size > 0")
    eb = cfg.train.eval_batch_size
    val = batch_eval_set(jnp.asarray(ds.val_images), jnp.asarray(ds.val_labels), eb)
    test = batch_eval_set(jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels), eb)
    n_score = min(cfg.sharing.eval_images or ds.val_images.shape[0], ds.val_images.shape[0])
    score, held_out = val, None
    if n_score < ds.val_images.shape[0]:
        score = batch_eval_set(jnp.asarray(ds.val_images[:n_score]), jnp.asarray(ds.val_labels[:n_score]), eb)
        held_out = batch_eval_set(jnp.asarray(ds.val_images[n_score:]), jnp.asarray(ds.val_labels[n_score:]), eb)
    accuracy = jax.jit(evaluator.accuracy)
    kernels = sharing.get_kernels(variables["params"], paths)
    float_val, float_test = float(accuracy(variables, kernels, val)), float(accuracy(variables, kernels, test))
    float_score = float(accuracy(variables, kernels, score))
    float_held_out = None if held_out is None else float(accuracy(variables, kernels, held_out))

    t = time.perf_counter()
    table = sharing.build_table(kernels, cfg.sharing.k_max, n_iter=cfg.sharing.kmeans_iters)
    jax.block_until_ready(table.assign)
    seconds["kmeans_table"] = time.perf_counter() - t

    t = time.perf_counter()
    centroids = quantize_codebook(table.centroids, cfg.sharing.codebook)
    ks = candidate_k(cfg.sharing.k_max, tuple(cfg.sharing.k_values))
    rows = jnp.asarray(range_population(len(paths), ks))
    range_fn = evaluator.jit(evaluator.accuracy_of_k)
    range_acc = np.full((len(paths), cfg.sharing.k_max), np.nan, np.float32)
    range_acc[:, ks - 1] = np.asarray(range_fn(variables, table, centroids, rows, score)).reshape(len(paths), len(ks))
    seconds["range"] = time.perf_counter() - t
    return Prepared(cfg, ds, model, inputs.model_name, evaluator, accuracy, variables, paths, table, val, test, score,
                    held_out, float_val, float_test, float_score, float_held_out, ks, range_acc, seconds)


def _problem(prep: Prepared, cfg: ml_collections.ConfigDict) -> Problem:
    """The search problem of ``cfg``'s options (codebook format, range and accuracy limits)."""
    allowed, counts = allowed_k(prep.range_acc, prep.float_score, cfg.sharing.range_max_loss,
                                cfg.sharing.widest_per_key)
    return Problem(
        variables=prep.variables, table=prep.table,
        centroids=quantize_codebook(prep.table.centroids, cfg.sharing.codebook),
        batches=prep.score, allowed=jnp.asarray(allowed), n_choices=jnp.asarray(counts),
        floor=jnp.float32(prep.float_score - cfg.sharing.max_accuracy_loss / 100),
        float_accuracy=jnp.float32(prep.float_score),
    )


def search(prep: Prepared, cfg: ml_collections.ConfigDict, workdir: pathlib.Path | None = None, log=None) -> list[dict]:
    """Step 3: run ``cfg.generations`` generations (:func:`qevo.loop.evolve`); returns every
    record (see :func:`scores_to_records`, plus ``generation``, from 1). With ``workdir``,
    appends to ``history.jsonl`` and checkpoints every generation, resuming from a checkpoint
    there."""
    problem = _problem(prep, cfg)
    generation = Generation(cfg, prep.evaluator, len(prep.paths))
    acc_target = cfg.sharing.acc_target if cfg.sharing.acc_target is not None else prep.float_score
    targets = Targets(acc_target=np.asarray(acc_target, np.float32),
                      cr_target=np.asarray(cfg.sharing.cr_target, np.float32))

    def evaluate(g: int, genes: jax.Array, key: jax.Array, targets: Targets):
        # host values in and out: in a run of several processes each passes the same ones
        # (qevo.population.replicated_jit) and the driver's steps run on every process alike
        start = time.perf_counter()
        scores, F, moved = generation.score(problem, np.asarray(genes), targets)
        line = {"generation": g + 1, "acc_target": float(targets.acc_target), "cr_target": float(targets.cr_target),
                "seconds": time.perf_counter() - start, "individuals": scores_to_records(scores)}
        return np.asarray(F), [line], jax.device_get(moved)

    def report(state: LoopState, lines: list[dict]) -> str:
        best = pick([r for x in lines for r in x["individuals"]], float(problem.floor), _cr_key(cfg))
        return (f"gen {state.generation:3d}/{cfg.generations}  best CR {best['cr_weighted']:.2f} "
                f"(mean-of-layers {best['cr_mean']:.2f}) at val {100 * best['val_accuracy']:.2f}%  "
                f"targets acc {100 * float(state.carry.acc_target):.2f}% CR {float(state.carry.cr_target):.2f}  "
                f"{state.evaluations / state.seconds:.1f} evals/s")

    _, lines = evolve(generation.strategy(problem), evaluate, base_key=base_key(cfg.seed),
                      generations=cfg.generations, steps=StepLog(workdir, "generation", log=log),
                      desc=f"sharing {prep.model_name}", carry=targets, report=report if log else None)
    return [{**r, "generation": x["generation"]} for x in lines for r in x["individuals"]]


def held_out_accuracy(prep: Prepared, cfg, records: list[dict]) -> list[dict]:
    """``records`` with ``held_out_accuracy``: each network (its table clustering) scored on
    the held-out validation images in one population call."""
    rows = jnp.asarray(np.array([r["k"] for r in records], np.int32) - 1)
    centroids = quantize_codebook(prep.table.centroids, cfg.sharing.codebook)
    acc = np.asarray(prep.evaluator.jit(prep.evaluator.accuracy_of_k)(prep.variables, prep.table, centroids, rows,
                                                           prep.held_out))
    return [{**r, "held_out_accuracy": float(a)} for r, a in zip(records, acc, strict=True)]


def pick_held_out(prep: Prepared, cfg, fronts: list[dict]) -> dict:
    """Step 4a on held-out images: of the networks of ``fronts`` (with ``held_out_accuracy``)
    that meet the floor on the scoring images (all of them if none does), the highest CR
    within ``sharing.max_accuracy_loss`` points of the float model on the held-out images."""
    loss = cfg.sharing.max_accuracy_loss / 100
    candidates = [r for r in fronts if r["val_accuracy"] >= prep.float_score - loss] or fronts
    return pick(candidates, prep.float_held_out - loss, _cr_key(cfg), "held_out_accuracy")


@dataclasses.dataclass
class Choice:
    """Step 4's outcome: the picked record ``best`` (with ``feasible``, and
    ``held_out_accuracy`` where there are held-out images), the non-dominated records
    ``front`` (size-weighted CR; scored on the held-out images where there are some), the
    stored ``layers`` after refinement, their scoring ``accuracy``, one ``refinement``
    record per layer, and the held-out accuracy of the refined network (None: not scored)."""

    best: dict
    front: list[dict]
    layers: list[sharing.Layer]
    accuracy: float
    refinement: list[dict]
    refined_held_out: float | None

    def summary(self) -> dict:
        """The step's figures for ``results.json``'s ``"search"``."""
        out: dict[str, float | None] = {"val_accuracy_after_refinement": self.accuracy}
        if "held_out_accuracy" in self.best:
            out.update(held_out_accuracy=self.best["held_out_accuracy"], candidates=len(self.front),
                       held_out_accuracy_after_refinement=self.refined_held_out)
        return out


def choose(prep: Prepared, cfg, records: list[dict], log=None) -> Choice:
    """Step 4: the pick among ``records`` (on the held-out images if there are any), then the
    refinement (``sharing.refine``), kept with held-out images only if it does not lower
    accuracy there."""
    cr_key = _cr_key(cfg)
    fronts = front(records)
    if prep.held_out is None:
        best = pick(records, prep.float_score - cfg.sharing.max_accuracy_loss / 100, cr_key)
    else:
        fronts = held_out_accuracy(prep, cfg, fronts)
        best = pick_held_out(prep, cfg, fronts if cr_key == "cr_weighted" else
                             held_out_accuracy(prep, cfg, front(records, cr_key)))
        if log:
            assert prep.float_held_out is not None  # measured on the held-out images
            log(f"pick on {_count(prep.held_out)} held-out images: CR {best[cr_key]:.2f} at "
                f"{100 * best['held_out_accuracy']:.2f}% (float {100 * prep.float_held_out:.2f}%)")
    layers, accuracy, refinement, refined_held_out = table_layers(prep, best["k"]), best["val_accuracy"], [], None
    if cfg.sharing.refine:
        refined, refined_accuracy, refinement = refine(prep, cfg, layers, accuracy, log)
        if prep.held_out is not None:
            refined_held_out = layers_accuracy(prep, refined, cfg.sharing.codebook, prep.held_out)
        if refined_held_out is None or refined_held_out >= best["held_out_accuracy"]:
            layers, accuracy = refined, refined_accuracy
        elif log:
            log(f"refinement not kept: held-out accuracy {100 * refined_held_out:.2f}% against "
                f"{100 * best['held_out_accuracy']:.2f}% without it")
    return Choice(best, fronts, layers, accuracy, refinement, refined_held_out)


def _count(batches) -> int:
    """Number of real (unpadded) images in :func:`qevo.population.batch_eval_set` batches."""
    return int(np.asarray(batches[2]).sum())


def _cr_key(cfg) -> str:
    return "cr_weighted" if cfg.sharing.fitness_cr == "weighted" else "cr_mean"


def table_layers(prep: Prepared, k: list[int]) -> list[sharing.Layer]:
    """The stored form of the table clustering with ``k`` clusters per layer."""
    cents, assign = jax.device_get((prep.table.centroids, prep.table.assign))
    out = []
    for i, (off, n, shape) in enumerate(zip(prep.table.offsets, prep.table.sizes, prep.table.shapes, strict=True)):
        out.append(sharing.Layer(indices=assign[k[i] - 1, off : off + n].reshape(shape),
                                 codebook=cents[i, k[i] - 1, : k[i]]))
    return out


def layer_kernels(layers: list[sharing.Layer], fmt: str) -> list[jax.Array]:
    """Kernels of stored layers with codebooks rounded to ``fmt``."""
    return [quantize_codebook(jnp.asarray(x.codebook), fmt)[jnp.asarray(x.indices, jnp.int32)] for x in layers]


def refine(prep: Prepared, cfg, layers: list[sharing.Layer], accuracy: float,
           log=None) -> tuple[list[sharing.Layer], float, list[dict]]:
    """Step 4b: per layer, k-means in the tanh space for every (spread, focus) of the grid
    (one batched call), every variant network scored in one population call; a layer takes
    its best variant where that beats the current validation accuracy.  Returns the layers,
    the accuracy and one record per layer."""
    s = cfg.sharing
    fmt = s.codebook
    focus = np.round(np.arange(0.0, s.focus_max + s.focus_step / 2, s.focus_step), 6)
    grid = np.array([(sp, f) for sp in s.spreads for f in focus], np.float32)
    fn = prep.evaluator.jit(prep.evaluator.accuracy_of_kernel_sets)
    layers = list(layers)
    notes = []
    k_slots = 1 << (max(2, *(x.codebook.shape[0] for x in layers)) - 1).bit_length()
    current = layer_kernels(layers, fmt)
    floats = sharing.get_kernels(prep.variables["params"], prep.paths)
    for i, layer in enumerate(layers):
        k = layer.codebook.shape[0]
        cents, assign = sharing.cluster_layer_2d(floats[i], k, grid[:, 0], grid[:, 1], k_slots=k_slots,
                                                 n_iter=s.kmeans_iters)
        variants = sharing.variant_kernels(cents, assign, prep.table.shapes[i], fmt)
        sets = [variants if j == i else jnp.broadcast_to(x, (len(grid), *x.shape)) for j, x in enumerate(current)]
        acc = np.asarray(fn(prep.variables, sets, prep.score))
        best = int(np.nanargmax(acc))
        kept = bool(acc[best] > accuracy)
        notes.append({"layer": sharing.layer_name(prep.paths[i]), "best_spread": float(grid[best, 0]),
                      "best_focus": float(grid[best, 1]), "best_val_accuracy": float(acc[best]), "kept": kept})
        if kept:
            cents, assign = jax.device_get((cents, assign))
            layers[i] = sharing.Layer(indices=assign[best].reshape(layer.indices.shape).astype(layer.indices.dtype),
                                      codebook=cents[best, :k], spread=float(grid[best, 0]), focus=float(grid[best, 1]))
            accuracy = float(acc[best])
            current[i] = variants[best]
        if log:
            log(f"refine {notes[-1]['layer']}: best spread {grid[best, 0]:.1f} focus {grid[best, 1]:.1f} "
                f"val {100 * acc[best]:.2f}% ({'kept' if kept else 'not better'})")
    return layers, accuracy, notes


def layers_accuracy(prep: Prepared, layers: list[sharing.Layer], fmt: str, batches) -> float:
    """Accuracy on ``batches`` of the float model with the stored ``layers`` (codebooks in ``fmt``)."""
    return float(prep.accuracy(prep.variables, layer_kernels(layers, fmt), batches))


def report(prep: Prepared, cfg, layers: list[sharing.Layer], workdir: pathlib.Path | None) -> dict:
    """Step 5: per codebook format, both CRs, validation and test accuracy; with ``workdir``
    the compressed model saved and reloaded (its test accuracy checked)."""
    k = np.array([x.codebook.shape[0] for x in layers], np.int32)
    out = {}
    for fmt in cfg.sharing.report_formats:
        cr_mean, cr_weighted = sharing.compression_rates(jnp.asarray(k), prep.table.sizes, fmt)
        entry = {
            "codebook_bits": CODEBOOK_BITS[fmt],
            "cr_mean": float(cr_mean),
            "cr_weighted": float(cr_weighted),
            "val_accuracy": layers_accuracy(prep, layers, fmt, prep.val),
            "test_accuracy": layers_accuracy(prep, layers, fmt, prep.test),
        }
        entry["test_loss_points"] = 100 * (prep.float_test - entry["test_accuracy"])
        if workdir is not None:
            path = workdir / f"compressed_{fmt}.msgpack"
            meta = {"model": prep.model_name, "activation": cfg.model.activation, "dataset": prep.ds.name,
                    **{key: entry[key] for key in ("cr_mean", "cr_weighted", "val_accuracy", "test_accuracy")}}
            sharing.save_compressed(path, prep.variables, prep.paths, layers, fmt, meta)
            distributed.sync(f"saved {path.name}")  # process 0 wrote it; every process reads it back
            loaded, _ = sharing.load_compressed(path, prep.variables)
            entry["file"] = path.name
            reloaded = sharing.get_kernels(loaded["params"], prep.paths)
            entry["reloaded_test_accuracy"] = float(prep.accuracy(loaded, reloaded, prep.test))
        out[fmt] = entry
    return out


def write_front(workdir: pathlib.Path, rows: list[dict], names: list[str], float_val: float) -> None:
    """``front.csv`` (k per layer, validation accuracy, both CRs; atomic) and ``front.png``."""
    columns = [f"k_{n}" for n in names]
    keys = front_keys(rows[0])
    write_csv(workdir / "front.csv",
              [{**dict(zip(columns, r["k"], strict=True)), **{k: f"{r[k]:.6f}" for k in keys}} for r in rows],
              [*columns, *keys])
    with figure(workdir / "front.png") as ax:
        ax.plot([r["cr_weighted"] for r in rows], [100 * r["val_accuracy"] for r in rows], "o-",
                label="NSGA-III front")
        ax.axhline(100 * float_val, color="gray", ls="--", label="float model")
        ax.set_xlabel("size-weighted compression rate")
        ax.set_ylabel("validation accuracy [%]")
        ax.legend()


@method(defaults)
def run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, model=None, variables: dict | None = None,
        data: Dataset | None = None, loss: Callable | None = None, metric: Callable | None = None) -> dict:
    """The whole protocol (module docstring) in ``workdir``; returns ``results.json``'s dict.

    From Python, ``model=`` (any ``flax.linen`` network, unchanged: every ``kernel`` of its
    parameters is shared), ``variables=`` (its trained float variables; None: trained here)
    and ``data=`` (a :class:`qevo.data.Dataset`) replace ``cfg.model`` and ``cfg.data``.
    ``metric=`` (``metric(logits, labels) -> float32 [N]`` in [0, 1], jit-traceable; default
    top-1) is what every accuracy of the run averages, the floor and fitness included;
    ``loss=`` is what the float model trains with when it is trained here (:mod:`qevo.losses`)."""
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    watch = Stopwatch()
    prep = prepare(cfg, workdir, model, variables, data, loss, metric)
    env = environment(prep.model, prep.variables, prep.ds.train_images.shape[1:], cfg.train.batch_size,
                      cfg.model.precision)
    names = [sharing.layer_name(p) for p in prep.paths]
    allowed, counts = allowed_k(prep.range_acc, prep.float_score, cfg.sharing.range_max_loss,
                                cfg.sharing.widest_per_key)
    ranges = {n: sorted({int(a) + 1 for a in allowed[i, : counts[i]]}) for i, n in enumerate(names)}
    ks = prep.candidates
    write_json(workdir / "range.json", {"float_score_accuracy": prep.float_score, "layers": names,
                                        "k": ks.tolist(), "accuracy": prep.range_acc[:, ks - 1].tolist(),
                                        "kept_k": ranges})
    log(f"float val {100 * prep.float_val:.2f}% test {100 * prep.float_test:.2f}% "
        f"(scoring images {100 * prep.float_score:.2f}%); k-means table "
        f"{prep.seconds['kmeans_table']:.1f} s, range {prep.seconds['range']:.1f} s; kept k per layer: "
        + ", ".join(f"{n} {len(v)} ({v[0]}..{v[-1]})" for n, v in ranges.items()))

    with watch.stage("search"):
        records = search(prep, cfg, workdir, log)
    with watch.stage("pick_refine"):
        chosen = choose(prep, cfg, records, log)
    layers = chosen.layers
    with watch.stage("report"):
        formats = report(prep, cfg, layers, workdir)
    fronts = [] if cfg.sharing.driver != "nsga3" else chosen.front
    if fronts:
        write_front(workdir, fronts, names, prep.float_score)
    result = {
        "model": prep.model_name,
        "activation": cfg.model.activation,
        "dataset": prep.ds.name,
        "driver": cfg.sharing.driver,
        "seed": cfg.seed,
        "layers": names,
        "layer_sizes": list(prep.table.sizes),
        "k": chosen.best["k"],
        "spread": [x.spread for x in layers],
        "focus": [x.focus for x in layers],
        "search": {**{key: chosen.best[key] for key in ("val_accuracy", "cr_mean", "cr_weighted", "generation",
                                                        "feasible")},
                   "codebook": cfg.sharing.codebook, "evaluations": len(records), **chosen.summary()},
        "refinement": chosen.refinement,
        "float": {"val_accuracy": prep.float_val, "test_accuracy": prep.float_test,
                  "scoring_accuracy": prep.float_score,
                  **({"held_out_accuracy": prep.float_held_out} if prep.held_out is not None else {})},
        "scoring_images": _count(prep.score),
        "held_out_images": 0 if prep.held_out is None else _count(prep.held_out),
        "formats": formats,
        "kept_k": ranges,
        **({"front": [{"k": r["k"], **{k: r[k] for k in front_keys(r)}} for r in fronts]} if fronts else {}),
        "seconds": {**{k: round(v, 2) for k, v in prep.seconds.items()}, **watch.seconds()},
        **env,
    }
    write_json(workdir / RESULTS, result)
    return result


if __name__ == "__main__":
    from qevo.cli import main

    sys.exit(main("qevo.compress", run, validate))
