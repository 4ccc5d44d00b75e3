"""Weight-sharing compression: ``python -m qevo.sharing --config configs/lenet5_sharing.py``.

The seed's protocol (docs/spec.md#weight-sharing), on the validation split:

0. the float model (trained in ``<workdir>/float`` or loaded from ``float_from``);
1. the k-means of every shared layer for every k in ``1..sharing.k_max``, in batched calls,
   as a lookup table (:func:`qevo.sharing.clusters.build_table`);
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
unless :func:`run` is given a ``metric=`` of the user's (:mod:`qevo.models.losses`).

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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qevo import config as config_lib
from qevo.data.datasets import Dataset
from qevo.evolution.loop import LoopState, base_key, evolve
from qevo.evolution.population import batch_eval_set
from qevo.harness import Method, StepLog, Stopwatch, Stored, environment, method, stored_float, write_json
from qevo.models.inputs import resolve_inputs
from qevo.quant.interception import QevoModel
from qevo.sharing import clusters
from qevo.sharing.codebook import CODEBOOK_BITS, SharedKernel, quantize_codebook
from qevo.sharing.config import defaults, validate
from qevo.sharing.generations import (
    Generation,
    Problem,
    Targets,
    allowed_k,
    candidate_k,
    front,
    front_keys,
    pick,
    range_population,
    scores_to_records,
)
from qevo.sharing.report import layer_kernels, layers_accuracy, report, write_front
from qevo.train.pretrained import float_model


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
    evaluator: clusters.SharedEvaluator
    accuracy: Callable
    variables: dict
    paths: tuple
    table: clusters.ClusterTable
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
    (``model``, ``variables``, ``data``, ``loss``, ``metric``: :func:`qevo.models.inputs.resolve_inputs`)."""
    seconds = {}
    inputs = resolve_inputs(cfg, model, variables, data, loss, metric)
    ds, model = inputs.ds, inputs.model
    t = time.perf_counter()
    variables = (inputs.variables if inputs.variables is not None
                 else float_model(cfg, ds, model, workdir, inputs.loss, inputs.metric)[0])
    seconds["float_model"] = time.perf_counter() - t
    paths = clusters.kernel_paths(variables["params"])
    evaluator = clusters.SharedEvaluator(model, ds.mean, ds.std, paths, strategy=cfg.sharing.strategy,
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
    kernels = clusters.get_kernels(variables["params"], paths)
    float_val, float_test = float(accuracy(variables, kernels, val)), float(accuracy(variables, kernels, test))
    float_score = float(accuracy(variables, kernels, score))
    float_held_out = None if held_out is None else float(accuracy(variables, kernels, held_out))

    t = time.perf_counter()
    table = clusters.build_table(kernels, cfg.sharing.k_max, n_iter=cfg.sharing.kmeans_iters)
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
    """Step 3: run ``cfg.generations`` generations (:func:`qevo.evolution.loop.evolve`); returns every
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
        # (qevo.evolution.population.replicated_jit) and the driver's steps run on every process alike
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
    layers: list[clusters.Layer]
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
    """Number of real (unpadded) images in :func:`qevo.evolution.population.batch_eval_set` batches."""
    return int(np.asarray(batches[2]).sum())


def _cr_key(cfg) -> str:
    return "cr_weighted" if cfg.sharing.fitness_cr == "weighted" else "cr_mean"


def table_layers(prep: Prepared, k: list[int]) -> list[clusters.Layer]:
    """The stored form of the table clustering with ``k`` clusters per layer."""
    cents, assign = jax.device_get((prep.table.centroids, prep.table.assign))
    out = []
    for i, (off, n, shape) in enumerate(zip(prep.table.offsets, prep.table.sizes, prep.table.shapes, strict=True)):
        out.append(clusters.Layer(indices=assign[k[i] - 1, off : off + n].reshape(shape),
                                 codebook=cents[i, k[i] - 1, : k[i]]))
    return out


def refine(prep: Prepared, cfg, layers: list[clusters.Layer], accuracy: float,
           log=None) -> tuple[list[clusters.Layer], float, list[dict]]:
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
    floats = clusters.get_kernels(prep.variables["params"], prep.paths)
    for i, layer in enumerate(layers):
        k = layer.codebook.shape[0]
        cents, assign = clusters.cluster_layer_2d(floats[i], k, grid[:, 0], grid[:, 1], k_slots=k_slots,
                                                 n_iter=s.kmeans_iters)
        variants = clusters.variant_kernels(cents, assign, prep.table.shapes[i], fmt)
        sets = [variants if j == i else jnp.broadcast_to(x, (len(grid), *x.shape)) for j, x in enumerate(current)]
        acc = np.asarray(fn(prep.variables, sets, prep.score))
        best = int(np.nanargmax(acc))
        kept = bool(acc[best] > accuracy)
        notes.append({"layer": clusters.layer_name(prep.paths[i]), "best_spread": float(grid[best, 0]),
                      "best_focus": float(grid[best, 1]), "best_val_accuracy": float(acc[best]), "kept": kept})
        if kept:
            cents, assign = jax.device_get((cents, assign))
            layers[i] = clusters.Layer(indices=assign[best].reshape(layer.indices.shape).astype(layer.indices.dtype),
                                      codebook=cents[best, :k], spread=float(grid[best, 0]), focus=float(grid[best, 1]))
            accuracy = float(acc[best])
            current[i] = variants[best]
        if log:
            log(f"refine {notes[-1]['layer']}: best spread {grid[best, 0]:.1f} focus {grid[best, 1]:.1f} "
                f"val {100 * acc[best]:.2f}% ({'kept' if kept else 'not better'})")
    return layers, accuracy, notes


@method("sharing", defaults)
def run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, model=None, variables: dict | None = None,
        data: Dataset | None = None, loss: Callable | None = None, metric: Callable | None = None) -> dict:
    """The whole protocol (module docstring) in ``workdir``; returns ``results.json``'s dict.

    From Python, ``model=`` (any ``flax.linen`` network, unchanged: every ``kernel`` of its
    parameters is shared), ``variables=`` (its trained float variables; None: trained here)
    and ``data=`` (a :class:`qevo.data.datasets.Dataset`) replace ``cfg.model`` and ``cfg.data``.
    ``metric=`` (``metric(logits, labels) -> float32 [N]`` in [0, 1], jit-traceable; default
    top-1) is what every accuracy of the run averages, the floor and fitness included;
    ``loss=`` is what the float model trains with when it is trained here (:mod:`qevo.models.losses`)."""
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    watch = Stopwatch()
    prep = prepare(cfg, workdir, model, variables, data, loss, metric)
    env = environment(prep.model, prep.variables, prep.ds.train_images.shape[1:], cfg.train.batch_size,
                      cfg.model.precision)
    names = [clusters.layer_name(p) for p in prep.paths]
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
    return result


def models(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> list[str]:
    """A weight sharing's stored models: the compressed model in each codebook format it
    saved (``sharing.codebook``'s first), then the float model it started from."""
    found = [f for f in CODEBOOK_BITS if (workdir / f"compressed_{f}.msgpack").is_file()]
    first = [cfg.sharing.codebook] if cfg.sharing.codebook in found else []
    return [*first, *(f for f in found if f not in first), "float"]


def load(workdir: pathlib.Path, cfg: ml_collections.ConfigDict, name: str, model: QevoModel, template: dict,
         results: dict) -> Stored:
    """The compressed model of codebook format ``name`` (its shared kernels: indices into a
    codebook per layer), or ``"float"``: the float model it started from."""
    if name == "float":
        return stored_float(workdir, cfg, template, results)
    variables, shared, _ = clusters.read_compressed(workdir / f"compressed_{name}.msgpack", template)
    paths = clusters.kernel_paths(template["params"])
    kernels = {"/".join(path[:-1]): SharedKernel(indices, codebook)
               for path, (indices, codebook) in zip(paths, shared, strict=True)}
    return Stored(variables, None, kernels, float(results["formats"][name]["test_accuracy"]))


METHOD = Method("sharing", defaults, validate, run, models, load, section="sharing")
