"""Cooperative-coevolution training of integer weights: ``python -m qevo.coevolve --config configs/lenet5_cc.py``.

The method of docs/spec.md#coevolution, gradient-free:

0. the float model (trained in ``<workdir>/float`` or loaded from ``float_from``), its
   activation clip ranges calibrated; the layers of the bit configuration
   (``coevolve.w_bits``/``a_bits`` on every layer, those ``quant.float_layers`` selects
   (the first and last by default) kept float; or a search's per-layer widths: ``bits_from``, the search's
   work folder, and ``bits_model``, one of its final models such as ``front_01``) get
   round-to-nearest integer levels ``q0`` (each layer within its own width) with fixed
   per-channel scales (``quant.mode``: ``"absmax"``, or ``"mse"``, the absmax clipped to the
   least squared error; :mod:`qevo.quant.intforward`); all their ``D`` levels form one genome;
1. each weight ``i`` may take ``q0[i] + d`` for ``d`` in ``-r..r`` (``coevolve.radius``),
   clipped to the level range, under an independent categorical distribution (``[D, 2r+1]``)
   that starts with ``coevolve.initial_mass`` on ``q0``; the context vector (the best
   assignment found) starts at ``q0``;
2. every cycle (one compiled call, :meth:`Coevolution.cycle`):

   * weights whose confidence (largest probability) is at least ``coevolve.threshold`` are
     fixed at their most likely value and leave the search;
   * the others are regrouped: sorted by confidence (ties in random order), the
     ``num_groups * group_size`` least confident split into ``num_groups`` groups;
   * each group in turn (``lax.scan``), with everything else held at the context: a fresh
     training mini-batch; ``population_size`` assignments of the group, the context itself
     and ``population_size - 1`` samples of the marginals; the loss (cross-entropy unless
     :func:`run` gets ``loss=``; per image: the loss of each image alone) of the integer
     network (:func:`qevo.quant.intforward.apply`, computed in float arithmetic: the dequantized
     levels through the model's own convolutions, the same logits up to float rounding) for
     each, in one population call (vmapped or mapped per ``coevolve.strategy``, the
     population axis sharded over the devices of a ``pop`` mesh); the best becomes the
     group's context (:func:`select`; with ``coevolve.accept_z`` > 0 only if its per-image
     losses beat the context's by that many standard errors) and every marginal of the
     group moves toward it: ``p <- (1 - lr) p + lr onehot(best)``;
   * for models with BatchNorm, the statistics of the new context are re-estimated on
     ``coevolve.bn_images`` training images, augmented as the float model's were (one forward pass,
     :func:`qevo.quant.intforward.batch_statistics`): the per-channel scale and offset after every
     convolution move with its levels (the round-to-nearest start gets the same);

   no derivative is computed anywhere (:func:`derivative_equations` proves it on the
   compiled cycle);
3. baselines from the same float model: round to nearest (the starting point; also with
   re-estimated BatchNorm statistics, ``round_to_nearest_bn``) and, with
   ``coevolve.qat``, quantization-aware training through the straight-through estimator
   (:class:`qevo.train.trainer.Trainer`) on as many training images as the coevolution drew.

Outputs in the work folder: ``config.json``, ``checkpoint.msgpack`` (after every cycle; a
rerun resumes from it and gives the same result), ``history.jsonl`` (one line per cycle),
``integer_model.msgpack`` (the integer levels with their scales, and the float variables
the integer network reads), ``qat/`` (the QAT baseline's run) and ``results.json`` (test
accuracy of float, round to nearest, coevolution and QAT, evaluations, wall seconds).
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
from flax import serialization

from qevo import checkpoint
from qevo import config as config_lib
from qevo.coevolve.algorithm import Coevolution, Problem, State, with_statistics
from qevo.coevolve.config import defaults, validate
from qevo.data.datasets import Dataset, normalize
from qevo.errors import CheckpointError
from qevo.evolution.loop import base_key, init_key, step_keys
from qevo.evolution.population import (
    batch_eval_set,
)
from qevo.harness import Method, StepLog, Stopwatch, Stored, environment, method, progress, read_rows, stored_float
from qevo.models import inputs as model_inputs
from qevo.models.losses import cross_entropy, top1
from qevo.quant import intforward
from qevo.quant.calibration import calibrate
from qevo.quant.interception import QevoModel
from qevo.quant.layers import Bits
from qevo.train import trainer as training
from qevo.train.pretrained import float_model

INTEGER_MODEL = "integer_model.msgpack"
"""Primitives that only differentiation creates (cotangent sums, linearised custom rules)."""


# --------------------------------------------------------------------------- the command


def integer_bits(cfg: ml_collections.ConfigDict, model) -> Bits:
    """Concrete int32 ``[L]`` widths of ``model``'s layers: ``coevolve.w_bits``/``a_bits``, the
    ``quant.float_layers`` float; or, with ``bits_from``, the per-layer widths of final model
    ``bits_model`` of that search run (the row of its ``final.csv``)."""
    if cfg.bits_from is None:
        bits = model_inputs.uniform_bits(model.num_layers, cfg.coevolve.w_bits, cfg.coevolve.a_bits,
                                  model_inputs.float_layers(cfg, model))
        return Bits(w=np.asarray(bits.w), a=np.asarray(bits.a))
    err = config_lib.ConfigError
    if cfg.bits_model is None:
        raise err("bits_from needs bits_model: name one of that search's final models, "
                  "e.g. --config.bits_model=front_01")
    table = pathlib.Path(cfg.bits_from) / "final.csv"
    if not table.is_file():
        raise err(f"bits_from={cfg.bits_from!r} holds no finished qevo.search run ({table} is missing); "
                  "point it at a search work folder or its committed results")
    rows = read_rows(table)
    try:
        models = sorted(n for n, row in rows.items() if row.get("kind") != "float")
        widths = ([np.asarray(rows[cfg.bits_model][k].split(), np.int32) for k in ("w_bits", "a_bits")]
                  if cfg.bits_model in models else None)
    except (KeyError, AttributeError, ValueError) as e:
        raise err(f"{table} is corrupt ({type(e).__name__}: {e}); rerun that search's final training") from e
    if widths is None:
        raise err(f"bits_model={cfg.bits_model!r} is not a final model of {cfg.bits_from}; choose one of {models}")
    w, a = widths
    if w.shape != (model.num_layers,) or a.shape != (model.num_layers,):
        raise err(f"{cfg.bits_model} of {cfg.bits_from} has widths for {w.size} layers, this model "
                  f"({model.name}) has {model.num_layers}; take bits from a search of the same model")
    for name, widths, lo in (("weight", w, 2), ("activation", a, intforward.MIN_ACTIVATION_BITS)):
        bad = sorted({int(b) for b in widths if not (lo <= b <= 8 or b == 32)})
        if bad:
            raise err(f"{cfg.bits_model} of {cfg.bits_from} has {name} widths {bad}; integer training takes "
                      f"{lo}..8 bits (or 32, float)")
    return Bits(w=w, a=a)


def describe(bits: Bits) -> str:
    """``"w4a8"`` for uniform quantized widths, else the per-layer lists."""
    w, a = ({int(b) for b in x if b < 32} for x in (bits.w, bits.a))
    if len(w) == len(a) == 1:
        return f"w{w.pop()}a{a.pop()}"
    return f"w{list(map(int, bits.w))} a{list(map(int, bits.a))}"


@dataclasses.dataclass
class Prepared:
    """A run's model, data and starting point (shared by the coevolution and the baselines)."""

    cfg: ml_collections.ConfigDict
    ds: Dataset
    model: QevoModel
    variables: dict
    bits: Bits
    runner: Coevolution
    problem: Problem
    test: tuple
    val: tuple
    model_name: str


def prepare_arrays(cfg: ml_collections.ConfigDict, model: QevoModel, variables: dict, mean, std, train_images,
                   train_labels, val_images, val_labels, loss: Callable = cross_entropy,
                   metric: Callable = top1) -> tuple[Bits, Coevolution, Problem]:
    """The runner and its problem for float ``variables`` (calibrated) and uint8 ``[N, H, W, C]`` splits
    (``loss``, ``metric``: :class:`Coevolution`'s).

    Returns the network's bit widths, the :class:`Coevolution` runner and the
    :class:`Problem` that starts from the round-to-nearest integer weights.
    """
    c = cfg.coevolve
    bits = integer_bits(cfg, model)
    paths = intforward.quantized_layers(model)
    rtn = intforward.integer_kernels(variables, paths, bits.w, cfg.quant.per_channel, cfg.quant.mode)
    if not rtn:
        raise config_lib.ConfigError(f"no layer is quantized: quant.float_layers={cfg.quant.float_layers!r} keeps "
                                     "every layer float; select fewer")
    levels = [intforward.max_level(int(bits.w[paths[p]])) for p in rtn]
    max_level = (levels[0] if len(set(levels)) == 1 else
                 jnp.concatenate([jnp.full(k.q.size, n, jnp.int32) for k, n in zip(rtn.values(), levels, strict=True)]))
    runner = Coevolution(model, {p: k.q.shape for p, k in rtn.items()}, mean, std, c, max_level,
                         augment=cfg.train.augment, loss=loss, metric=metric)
    if c.num_groups * c.group_size > runner.num_weights:
        raise config_lib.ConfigError(
            f"config coevolve.num_groups * coevolve.group_size = {c.num_groups * c.group_size} exceeds the "
            f"{runner.num_weights} integer weights of the model; lower one of them")
    if val_images.shape[0] == 0:
        raise config_lib.ConfigError("the coevolution reports validation accuracy per cycle: set data.val_size > 0")
    n_val = val_images.shape[0] if c.eval_images is None else min(c.eval_images, val_images.shape[0])
    problem = Problem(
        variables=variables, scales={p: k.scale for p, k in rtn.items()},
        bits=Bits(w=jnp.asarray(bits.w), a=jnp.asarray(bits.a)), q0=runner.flatten(rtn),
        images=jax.device_put(train_images), labels=jax.device_put(train_labels),
        val=batch_eval_set(jnp.asarray(val_images[:n_val]), jnp.asarray(val_labels[:n_val]), cfg.train.eval_batch_size),
    )
    return bits, runner, problem


def prepare(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, model=None, variables: dict | None = None,
            data: Dataset | None = None, loss: Callable | None = None, metric: Callable | None = None) -> Prepared:
    """Float model (trained, loaded or the user's; calibrated), round-to-nearest levels, the
    runner and its problem (``model``, ``variables``, ``data``, ``loss``, ``metric``:
    :func:`qevo.models.inputs.resolve_inputs`)."""
    inputs = model_inputs.resolve_inputs(cfg, model, variables, data, loss, metric)
    ds, model, loss, metric = inputs.ds, inputs.model, inputs.loss, inputs.metric
    integer_bits(cfg, model)  # a bad bits_from is refused before the float model trains
    variables = (float_model(cfg, ds, model, workdir, loss, metric)[0] if inputs.variables is None
                 else inputs.variables)
    variables = calibrate(model, variables, normalize(jnp.asarray(ds.train_images[:512]), ds.mean, ds.std))
    bits, runner, problem = prepare_arrays(cfg, model, variables, ds.mean, ds.std, ds.train_images, ds.train_labels,
                                  ds.val_images, ds.val_labels, loss, metric)
    eb = cfg.train.eval_batch_size
    test = batch_eval_set(jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels), eb)
    scores_all_val = int(problem.val[2].sum()) == len(ds.val_labels)  # the problem's batches are the whole split
    val = problem.val if scores_all_val else batch_eval_set(jnp.asarray(ds.val_images), jnp.asarray(ds.val_labels), eb)
    return Prepared(cfg, ds, model, variables, bits, runner, problem, test, val, inputs.model_name)


def initial_state(prep: Prepared) -> State:
    """The run's starting point: round to nearest and its BatchNorm statistics."""
    return prep.runner.init_state(prep.problem, init_key(base_key(prep.cfg.seed)))


def evolve(prep: Prepared, workdir: pathlib.Path | None = None, log=None,
           start: State | None = None) -> tuple[State, list[dict]]:
    """Run ``coevolve.cycles`` cycles from ``start`` (default :func:`initial_state`); with
    ``workdir``, checkpoint and append ``history.jsonl`` after each one and resume from a
    checkpoint there. Returns the final state and the history."""
    c = prep.cfg.coevolve
    runner, problem = prep.runner, prep.problem
    state = initial_state(prep) if start is None else start
    steps = StepLog(workdir, "cycle", log=log)
    state, history = steps.resume(state)
    evals = c.num_groups * c.population_size
    bar = progress(c.cycles, int(state.cycle), f"coevolve {prep.model_name}", show=log is not None)
    for cycle in range(int(state.cycle), c.cycles):
        began = time.perf_counter()
        state, stats = runner.cycle(state, problem, step_keys(base_key(prep.cfg.seed), cycle))
        stats = jax.device_get(stats)
        seconds = time.perf_counter() - began
        record = {
            "cycle": cycle + 1,
            "loss": float(np.mean(stats.loss)),
            "train_accuracy": float(np.mean(stats.accuracy)),
            "best_loss": float(np.mean(stats.best_loss)),
            "improved_groups": int(np.sum(stats.improved)),
            "confident": float(stats.confident),
            "val_accuracy": float(stats.val_accuracy),
            "evaluations": (cycle + 1) * evals,
            "images": (cycle + 1) * c.num_groups * c.batch_size,
            "seconds": seconds,
        }
        history.append(record)
        steps.commit(state, history, cycle + 1)
        bar.step(f"cycle {cycle + 1:3d}/{c.cycles}  loss {record['loss']:.4f}  "
                 f"train acc {100 * record['train_accuracy']:.2f}%  val {100 * record['val_accuracy']:.2f}%  "
                 f"confident {100 * record['confident']:.1f}%  "
                 f"improved {record['improved_groups']}/{c.num_groups}  {evals / seconds:.0f} evals/s")
    bar.close()
    return state, history


def qat_baseline(prep: Prepared, images: int, workdir: pathlib.Path) -> dict:
    """QAT (straight-through estimator) from the calibrated float model at the same widths,
    on as many training images as ``images``: ``E = ceil(images / N)`` epochs over the first
    ``images // E`` training images (whole mini-batches only, so at most ``images``).
    Resumable in ``workdir``; returns :func:`qevo.train.trainer.fit`'s results and ``images``."""
    cfg, ds, c = prep.cfg, prep.ds, prep.cfg.coevolve
    epochs = -(-images // ds.train_images.shape[0])
    size = images // epochs
    subset = dataclasses.replace(ds, train_images=ds.train_images[:size], train_labels=ds.train_labels[:size])
    qcfg = ml_collections.ConfigDict(cfg.to_dict())
    qcfg.train.epochs = epochs
    qcfg.train.optimizer, qcfg.train.learning_rate, qcfg.train.warmup_epochs = c.qat_optimizer, c.qat_learning_rate, 0
    qcfg.train.batch_size = min(cfg.train.batch_size, subset.train_images.shape[0])
    workdir.mkdir(parents=True, exist_ok=True)
    bits = Bits(w=jnp.asarray(prep.bits.w), a=jnp.asarray(prep.bits.a))
    key = jax.random.fold_in(jax.random.key(cfg.seed), 5)
    trainer = training.Trainer(qcfg, subset, prep.model, quantized=True, loss=prep.runner.loss,
                               metric=prep.runner.metric)
    _, fitted = training.fit(qcfg, subset, prep.model, prep.variables, bits, workdir, key, "qat baseline", trainer)
    steps = qcfg.train.epochs * (subset.train_images.shape[0] // qcfg.train.batch_size)
    return {**fitted, "images": steps * qcfg.train.batch_size}


def save_integer_model(path: pathlib.Path, prep: Prepared, genome: jax.Array, meta: dict,
                       batch_stats: dict | None = None) -> None:
    """``integer_model.msgpack``: ``{"kernels": {path: IntKernel}, "variables": float variables}``
    (with ``batch_stats`` in place of the float model's BatchNorm statistics, if given)."""
    variables = {**prep.variables, "batch_stats": batch_stats} if batch_stats else prep.variables
    tree = {"kernels": prep.runner.kernels(genome, prep.problem.scales), "variables": variables}
    checkpoint.save(path, tree, meta)


@method("coevolve", defaults)
def run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, model=None, variables: dict | None = None,
        data: Dataset | None = None, loss: Callable | None = None, metric: Callable | None = None) -> dict:
    """The whole protocol (module docstring) in ``workdir``; returns ``results.json``'s dict.

    From Python, ``model=`` (any Flax network, unchanged), ``variables=`` (its trained float
    variables; None: trained here per ``cfg.train``) and ``data=`` (a
    :class:`qevo.data.datasets.Dataset`) replace ``cfg.model`` and ``cfg.data``
    (:func:`qevo.models.inputs.resolve_inputs`). ``loss=`` (``loss(logits, labels) -> float32 []``,
    the batch mean; default cross-entropy) is what the float model and the QAT baseline
    train with and what ranks the coevolution's samples, and ``metric=`` (``metric(logits,
    labels) -> float32 [N]`` in [0, 1]; default top-1) is what every accuracy averages; both
    jit-traceable (:mod:`qevo.models.losses`)."""
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    watch = Stopwatch()
    c = cfg.coevolve
    with watch.stage("prepare"):
        prep = prepare(cfg, workdir, model, variables, data, loss, metric)
        env = environment(prep.model, prep.variables, prep.ds.train_images.shape[1:], cfg.train.batch_size,
                          cfg.model.precision)
    runner, problem = prep.runner, prep.problem
    fake_quant = training.Trainer(cfg, prep.ds, prep.model, quantized=False, loss=runner.loss,
                               metric=runner.metric).accuracy
    scores = {
        "float": {"val_accuracy": float(fake_quant(prep.variables, None, prep.val)),
                  "test_accuracy": float(fake_quant(prep.variables, None, prep.test))},
        "round_to_nearest": {"val_accuracy": float(runner.accuracy(problem, problem.q0, prep.val)),
                             "test_accuracy": float(runner.accuracy(problem, problem.q0, prep.test)),
                             "fake_quant_test_accuracy": float(fake_quant(prep.variables, problem.bits, prep.test))},
    }
    start_state = initial_state(prep)
    if problem.variables.get("batch_stats") and c.bn_images:
        rebatched = with_statistics(problem, start_state.batch_stats)
        scores["round_to_nearest_bn"] = {"val_accuracy": float(runner.accuracy(rebatched, problem.q0, prep.val)),
                                         "test_accuracy": float(runner.accuracy(rebatched, problem.q0, prep.test))}
    log(f"{prep.model_name} {describe(prep.bits)}: {runner.num_weights} integer weights; test accuracy: "
        + ", ".join(f"{k} {100 * v['test_accuracy']:.2f}%" for k, v in scores.items()))

    with watch.stage("coevolution"):
        state, history = evolve(prep, workdir, log, start_state)
    genome = state.context
    evolved = with_statistics(problem, state.batch_stats)
    coevolved = {"val_accuracy": float(runner.accuracy(evolved, genome, prep.val)),
                 "test_accuracy": float(runner.accuracy(evolved, genome, prep.test)),
                 "evaluations": history[-1]["evaluations"], "images": history[-1]["images"],
                 "seconds": round(sum(r["seconds"] for r in history), 2),
                 "changed_weights": int(jnp.sum(genome != problem.q0)), "confident": history[-1]["confident"]}
    scores["coevolution"] = coevolved
    meta = {"model": prep.model_name, "dataset": prep.ds.name, "w_bits": prep.bits.w.tolist(),
            "a_bits": prep.bits.a.tolist(), "test_accuracy": coevolved["test_accuracy"]}
    save_integer_model(workdir / INTEGER_MODEL, prep, genome, meta, state.batch_stats)
    if c.qat:
        with watch.stage("qat"):
            qat = qat_baseline(prep, coevolved["images"], workdir / "qat")
        scores["qat"] = {"val_accuracy": qat["val_accuracy"], "test_accuracy": qat["test_accuracy"],
                         "images": qat["images"], "epochs": qat["epochs"], "train_seconds": qat["train_seconds"]}
    log("test accuracy: " + ", ".join(f"{k} {100 * v['test_accuracy']:.2f}%" for k, v in scores.items()))
    results = {
        "model": prep.model_name,
        "dataset": prep.ds.name,
        "w_bits": prep.bits.w.tolist(),
        "a_bits": prep.bits.a.tolist(),
        "layers": list(runner.layers),
        "integer_weights": runner.num_weights,
        **scores,
        "seconds": watch.seconds(),
        **env,
    }
    return results


def models(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> list[str]:
    """A coevolution's stored models: its integer model, then the float model it started from."""
    return ["coevolution", "float"]


def load(workdir: pathlib.Path, cfg: ml_collections.ConfigDict, name: str, model: QevoModel, template: dict,
         results: dict) -> Stored:
    """``"coevolution"``: the integer model (its levels and scales per layer, its widths);
    ``"float"``: the float model it started from."""
    if name == "float":
        return stored_float(workdir, cfg, template, results)
    tree, meta = checkpoint.load(workdir / INTEGER_MODEL)
    try:
        variables = serialization.from_state_dict(template, tree["variables"])
        kernels = {p: intforward.IntKernel(q=np.asarray(k["q"]), scale=np.asarray(k["scale"], np.float32))
                   for p, k in tree["kernels"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{workdir / INTEGER_MODEL} does not hold a {cfg.model.name} integer "
                              f"model ({e}); rerun the coevolution") from e
    bits = Bits(w=np.asarray(meta["w_bits"], np.int32), a=np.asarray(meta["a_bits"], np.int32))
    return Stored(variables, bits, kernels, float(results["coevolution"]["test_accuracy"]), "integer")


METHOD = Method("coevolve", defaults, validate, run, models, load, section="coevolve")
