"""Cooperative-coevolution training of integer weights: ``python -m qevo.coevolve --config configs/lenet5_cc.py``.

The method of docs/spec.md#coevolution, gradient-free:

0. the float model (trained in ``<workdir>/float`` or loaded from ``float_from``), its
   activation clip ranges calibrated; the layers of the bit configuration
   (``coevolve.w_bits``/``a_bits`` on every layer, those ``quant.float_layers`` selects
   (the first and last by default) kept float; or a search's per-layer widths: ``bits_from``, the search's
   work folder, and ``bits_model``, one of its final models such as ``front_01``) get
   round-to-nearest integer levels ``q0`` (each layer within its own width) with fixed
   per-channel scales (``quant.mode``: ``"absmax"``, or ``"mse"``, the absmax clipped to the
   least squared error; :mod:`qevo.intforward`); all their ``D`` levels form one genome;
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
     network (:func:`qevo.intforward.apply`, computed in float arithmetic: the dequantized
     levels through the model's own convolutions, the same logits up to float rounding) for
     each, in one population call (vmapped or mapped per ``coevolve.strategy``, the
     population axis sharded over the devices of a ``pop`` mesh); the best becomes the
     group's context (:func:`select`; with ``coevolve.accept_z`` > 0 only if its per-image
     losses beat the context's by that many standard errors) and every marginal of the
     group moves toward it: ``p <- (1 - lr) p + lr onehot(best)``;
   * for models with BatchNorm, the statistics of the new context are re-estimated on
     ``coevolve.bn_images`` training images, augmented as the float model's were (one forward pass,
     :func:`qevo.intforward.batch_statistics`): the per-channel scale and offset after every
     convolution move with its levels (the round-to-nearest start gets the same);

   no derivative is computed anywhere (:func:`derivative_equations` proves it on the
   compiled cycle);
3. baselines from the same float model: round to nearest (the starting point; also with
   re-estimated BatchNorm statistics, ``round_to_nearest_bn``) and, with
   ``coevolve.qat``, quantization-aware training through the straight-through estimator
   (:class:`qevo.train.Trainer`) on as many training images as the coevolution drew.

Outputs in the work folder: ``config.json``, ``checkpoint.msgpack`` (after every cycle; a
rerun resumes from it and gives the same result), ``history.jsonl`` (one line per cycle),
``integer_model.msgpack`` (the integer levels with their scales, and the float variables
the integer network reads), ``qat/`` (the QAT baseline's run) and ``results.json`` (test
accuracy of float, round to nearest, coevolution and QAT, evaluations, wall seconds).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from ml_collections import config_dict

from qevo import checkpoint, intforward, train
from qevo import config as config_lib
from qevo.calibration import calibrate
from qevo.data import Dataset, augment, normalize
from qevo.harness import RESULTS, StepLog, Stopwatch, environment, method, progress, read_rows, write_json
from qevo.interception import QevoModel
from qevo.layers import Bits
from qevo.loop import base_key, init_key, step_keys
from qevo.losses import cross_entropy, top1
from qevo.population import (
    STRATEGIES,
    batch_eval_set,
    batched_accuracy,
    population_map,
    replicated_jit,
    resolve_strategy,
)
from qevo.pretrained import float_model

INTEGER_MODEL = "integer_model.msgpack"


def defaults() -> ml_collections.ConfigDict:
    """:func:`qevo.config.defaults` plus the ``coevolve`` section."""
    c = config_lib.defaults()
    # per-layer widths of a finished search's model instead of the uniform coevolve.w_bits/a_bits:
    # bits_from names the search's work folder, bits_model one of its final models (front_01, w4a4, ...)
    c.bits_from = config_dict.placeholder(str)
    c.bits_model = config_dict.placeholder(str)
    c.coevolve = ml_collections.ConfigDict(
        {
            "w_bits": 4,
            "a_bits": 8,
            "radius": 1,
            "initial_mass": 0.98,
            "threshold": 0.995,
            "group_size": 256,
            "num_groups": 32,
            "population_size": 16,
            "learning_rate": 0.5,
            "accept_z": 0.0,
            "bn_images": 1024,
            "cycles": 12,
            "batch_size": 512,
            "eval_images": config_dict.placeholder(int),
            "strategy": "auto",
            "chunk_size": config_dict.placeholder(int),
            "qat": True,
            "qat_optimizer": "adam",
            "qat_learning_rate": 1e-4,
        }
    )
    return c


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """:func:`qevo.config.validate` with the keys of :func:`defaults`, and the coevolution options."""
    cfg = config_lib.validate(cfg, known=defaults())
    c, err = cfg.coevolve, config_lib.ConfigError
    for key, lo in (("w_bits", 2), ("a_bits", intforward.MIN_ACTIVATION_BITS)):
        if not isinstance(c[key], int) or not lo <= c[key] <= 8:
            raise err(f"config coevolve.{key}={c[key]!r} is an impossible bit width for integer training; "
                      f"use {lo}..8 (int8 operands)")
    levels = 2 * intforward.max_level(c.w_bits)
    if not isinstance(c.radius, int) or not 1 <= c.radius <= levels:
        raise err(f"config coevolve.radius={c.radius!r} is invalid; use an int in 1..{levels} "
                  f"({c.w_bits}-bit levels span -{levels // 2}..{levels // 2})")
    if not 0.0 < c.threshold <= 1.0 or not 1.0 / (2 * c.radius + 1) < c.initial_mass < c.threshold:
        raise err(f"config coevolve.initial_mass={c.initial_mass!r} and coevolve.threshold={c.threshold!r} "
                  f"must satisfy 1/(2*radius+1) < initial_mass < threshold <= 1 "
                  f"(otherwise every weight starts confident)")
    if not 0.0 < c.learning_rate <= 1.0:
        raise err(f"config coevolve.learning_rate={c.learning_rate!r} must lie in (0, 1]")
    for key, lo in (("group_size", 1), ("num_groups", 1), ("population_size", 2), ("cycles", 1), ("batch_size", 1)):
        if not isinstance(c[key], int) or c[key] < lo:
            raise err(f"config coevolve.{key}={c[key]!r} must be an int >= {lo}")
    if isinstance(c.accept_z, bool) or not isinstance(c.accept_z, (int, float)) or not 0 <= c.accept_z <= 10:
        raise err(f"config coevolve.accept_z={c.accept_z!r} must be a number of standard errors in 0..10 "
                  "(0: any sample of lower mean loss replaces the context)")
    if not isinstance(c.bn_images, int) or c.bn_images < 0:
        raise err(f"config coevolve.bn_images={c.bn_images!r} must be an int >= 0 "
                  "(0 keeps the float model's BatchNorm statistics)")
    if c.eval_images is not None and c.eval_images < 1:
        raise err(f"config coevolve.eval_images={c.eval_images!r} must be >= 1 "
                  "(or unset for the whole validation split)")
    if c.strategy not in STRATEGIES:
        raise err(f"config coevolve.strategy={c.strategy!r} is not one of {STRATEGIES}")
    if c.chunk_size is not None and c.chunk_size < 1:
        raise err(f"config coevolve.chunk_size={c.chunk_size!r} must be >= 1")
    if c.qat_optimizer not in ("sgd", "adam") or not c.qat_learning_rate > 0:
        raise err("config coevolve.qat_optimizer must be 'sgd' or 'adam' and coevolve.qat_learning_rate > 0")
    if cfg.quant.mode not in intforward.WEIGHT_MODES:
        raise err(f"config quant.mode={cfg.quant.mode!r}: integer weights need a symmetric quantizer, "
                  f"one of {intforward.WEIGHT_MODES}")
    return cfg


# --------------------------------------------------------------------------- EDA pieces


def initial_probs(q0: jax.Array, max_level, radius: int, mass: float) -> jax.Array:
    """Marginals ``float32 [D, 2r+1]``: category ``k`` is level ``q0 + k - r``.

    ``mass`` on ``q0`` (category ``r``), the rest shared equally by the other levels inside
    ``-max_level..max_level`` (at least one for ``max_level >= 1``); levels outside get 0.
    ``max_level``: an int, or int ``[D]`` per weight.
    """
    others = allowed(q0, max_level, radius) & (jnp.arange(2 * radius + 1) != radius)
    rest = (1.0 - mass) / jnp.sum(others, axis=1, keepdims=True)
    return jnp.where(others, rest, jnp.where(jnp.arange(2 * radius + 1) == radius, mass, 0.0)).astype(jnp.float32)


def allowed(q0: jax.Array, max_level, radius: int) -> jax.Array:
    """bool ``[D, 2r+1]``: level ``q0 + k - r`` lies in ``-max_level..max_level`` (an int, or
    int ``[D]`` per weight)."""
    levels = q0.astype(jnp.int32)[:, None] + jnp.arange(-radius, radius + 1)
    return jnp.abs(levels) <= jnp.asarray(max_level)[..., None]


def freeze(probs: jax.Array, context: jax.Array, q0: jax.Array, radius: int,
           threshold: float) -> tuple[jax.Array, jax.Array]:
    """Fix confident weights at their most likely level.

    Returns:
      ``(context, frozen)``: int8 ``[D]`` with the frozen weights at ``q0 + argmax - r``, and
      bool ``[D]``, confidence ``>= threshold``.
    """
    frozen = jnp.max(probs, axis=1) >= threshold
    likely = (q0.astype(jnp.int32) + jnp.argmax(probs, axis=1) - radius).astype(context.dtype)
    return jnp.where(frozen, likely, context), frozen


def regroup(key: jax.Array, probs: jax.Array, num_groups: int, group_size: int) -> jax.Array:
    """int32 ``[num_groups, group_size]``: the least confident weights, ascending by
    confidence (equal confidences in random order), split into consecutive groups."""
    perm = jax.random.permutation(key, probs.shape[0])
    confidence = jnp.max(probs, axis=1)[perm]
    order = perm[jnp.argsort(confidence, stable=True)]
    return order[: num_groups * group_size].reshape(num_groups, group_size).astype(jnp.int32)


def update_marginals(probs: jax.Array, best: jax.Array, active: jax.Array, learning_rate: float) -> jax.Array:
    """One EDA step of a group: ``p <- (1 - lr) p + lr onehot(best)`` where ``active``.

    Args:
      probs: float32 ``[G, K]`` the group's marginals.
      best: int ``[G]`` the winning category of each weight.
      active: bool ``[G]``, weights under search (frozen ones keep their marginals).
      learning_rate: ``lr`` in (0, 1].
    """
    target = jax.nn.one_hot(best, probs.shape[1], dtype=probs.dtype)
    return jnp.where(active[:, None], (1.0 - learning_rate) * probs + learning_rate * target, probs)


# --------------------------------------------------------------------------- the compiled cycle


def select(losses: jax.Array, accept_z: float) -> jax.Array:
    """The winner of one group: index into the ``P`` assignments (row 0 the context) of
    per-image losses ``float32 [P, B]`` on one mini-batch.

    The sample of lowest mean loss replaces the context only if it is better by more than
    ``accept_z`` standard errors of the paired per-image differences (``d = loss[s] -
    loss[0]``; accepted when ``mean(d) + accept_z * std(d) / sqrt(B) < 0``). With
    ``accept_z = 0`` any lower mean wins. A context of non-finite loss loses to any finite
    sample; a sample of non-finite loss never wins.
    """
    mean = jnp.where(jnp.all(jnp.isfinite(losses), axis=1), jnp.mean(losses, axis=1), jnp.inf)
    best = jnp.argmin(mean)
    d = losses[best] - losses[0]
    margin = jnp.mean(d) + accept_z * jnp.std(d) / jnp.sqrt(losses.shape[1])
    accept = (best > 0) & ((margin < 0) | ~jnp.isfinite(mean[0]))
    return jnp.where(accept, best, 0)


@struct.dataclass
class Problem:
    """What a cycle reads (device arrays; arguments of the compiled cycle).

    Attributes:
      variables: calibrated float variables (float layers, biases, BatchNorm, ``quant/a_clip``).
      scales: ``{module path: float32 [O]}`` per-channel weight scales of the integer layers.
      bits: int32 ``[L]`` widths of the network.
      q0: int8 ``[D]`` round-to-nearest levels of every integer weight (genome order).
      images: uint8 ``[N, H, W, C]`` training images; labels: int32 ``[N]``.
      val: the validation subset as :func:`qevo.population.batch_eval_set` batches.
    """

    variables: dict
    scales: dict
    bits: Bits
    q0: jax.Array
    images: jax.Array
    labels: jax.Array
    val: tuple


@struct.dataclass
class State:
    """The EDA's state (checkpointed after every cycle).

    Attributes:
      probs: float32 ``[D, 2r+1]`` marginals.
      context: int8 ``[D]`` the best assignment found (integer levels).
      batch_stats: the context network's BatchNorm statistics (``{}`` for models without
        BatchNorm): re-estimated after every cycle on ``coevolve.bn_images`` training
        images (:func:`qevo.intforward.batch_statistics`), or the float model's with 0.
      cycle: int32, cycles done (cycle ``c`` draws :func:`qevo.loop.step_keys` ``(base, c)``).
    """

    probs: jax.Array
    context: jax.Array
    batch_stats: dict
    cycle: jax.Array


@struct.dataclass
class CycleStats:
    """One cycle, per group (``[num_groups]``): the context's loss and accuracy (mean metric) on
    the group's mini-batch before its step, the winner's loss, whether a sample beat the
    context; and, at the end, the fraction of confident weights and the validation accuracy."""

    loss: jax.Array
    accuracy: jax.Array
    best_loss: jax.Array
    improved: jax.Array
    confident: jax.Array
    val_accuracy: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Coevolution:
    """The cooperative-coevolution EDA over the integer levels of one model.

    Attributes:
      model: the qevo model.
      layers: ``{module path: (kernel shape)}`` of the integer layers, in genome order.
      mean, std: image normalisation.
      options: the ``coevolve`` config section.
      max_level: ``2^(b-1) - 1`` for the weight width ``b``; int32 ``[D]`` per weight where
        the layers' widths differ.
      devices: devices of the ``pop`` mesh (default, empty: all).
      augment: the float model trained on augmented images (``train.augment``): the images
        that BatchNorm statistics are re-estimated on are augmented the same way, since
        the network learned under the normalisation of that distribution.
      loss: ``loss(logits, labels) -> float32 []``, the batch mean (:mod:`qevo.losses`;
        jit-traceable); the samples are ranked by it, per image called on one-image batches.
      metric: ``metric(logits, labels) -> float32 [N]`` in [0, 1]; accuracies are its mean.
    """

    model: QevoModel
    layers: dict
    mean: tuple
    std: tuple
    options: ml_collections.ConfigDict
    max_level: int | jax.Array
    devices: tuple = ()
    augment: bool = False
    loss: Callable = cross_entropy
    metric: Callable = top1
    _local: tuple[str, int | None] = dataclasses.field(init=False, repr=False)
    cycle: jax.stages.Wrapped = dataclasses.field(init=False, repr=False)
    accuracy: jax.stages.Wrapped = dataclasses.field(init=False, repr=False)
    statistics: jax.stages.Wrapped = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        devices = tuple(self.devices or jax.devices())
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "_local",
                           resolve_strategy(self.options.strategy, self.options.chunk_size, devices[0].platform))
        object.__setattr__(self, "cycle", replicated_jit(self._cycle, devices))
        object.__setattr__(self, "accuracy", replicated_jit(self._accuracy, devices))
        object.__setattr__(self, "statistics", replicated_jit(self._statistics, devices))

    @property
    def num_weights(self) -> int:
        """``D``, the genome length."""
        return sum(math.prod(s) for s in self.layers.values())

    def flatten(self, kernels: dict) -> jax.Array:
        """int8 ``[D]`` genome of ``{path: IntKernel}``."""
        return jnp.concatenate([jnp.ravel(kernels[p].q) for p in self.layers])

    def kernels(self, genome: jax.Array, scales: dict) -> dict:
        """``{path: IntKernel}`` of an int8 genome ``[D]`` with the per-channel ``scales``."""
        out, start = {}, 0
        for path, shape in self.layers.items():
            size = math.prod(shape)
            out[path] = intforward.IntKernel(q=genome[start : start + size].reshape(shape), scale=scales[path])
            start += size
        return out

    def init_state(self, problem: Problem, key: jax.Array) -> State:
        """Marginals around ``problem.q0``, context ``q0`` with its BatchNorm statistics drawn
        with ``key``, cycle 0."""
        o = self.options
        return State(probs=initial_probs(problem.q0, self.max_level, o.radius, o.initial_mass), context=problem.q0,
                     batch_stats=self.statistics(problem, problem.q0, key), cycle=jnp.int32(0))

    def _statistics(self, problem: Problem, genome: jax.Array, key: jax.Array) -> dict:
        """BatchNorm statistics of the network ``genome`` on ``coevolve.bn_images`` random
        training images, augmented as the float model was (``augment``); the float model's
        with 0; ``{}`` without BatchNorm."""
        stats = problem.variables.get("batch_stats", {})
        if not stats or not self.options.bn_images:
            return stats
        pick_key, aug_key = jax.random.split(key)
        images = problem.images[jax.random.randint(pick_key, (self.options.bn_images,), 0, problem.images.shape[0])]
        x = normalize(augment(aug_key, images) if self.augment else images, self.mean, self.std)
        return intforward.batch_statistics(self.model, problem.variables, self.kernels(genome, problem.scales),
                                           problem.bits, x)

    def logits(self, problem: Problem, genome: jax.Array, images: jax.Array, arithmetic: str = "integer") -> jax.Array:
        """Logits ``[N, classes]`` of the integer network ``genome`` on uint8 ``images``, in
        ``"integer"`` or (the same network, faster) ``"float"`` arithmetic (:func:`qevo.intforward.apply`)."""
        x = normalize(images, self.mean, self.std)
        return intforward.apply(self.model, problem.variables, self.kernels(genome, problem.scales), problem.bits, x,
                                arithmetic)

    def _accuracy(self, problem: Problem, genome: jax.Array, batches, arithmetic: str = "integer") -> jax.Array:
        return batched_accuracy(lambda x: self.logits(problem, genome, x, arithmetic), batches, self.metric)

    def population_loss(self, problem: Problem, context: jax.Array, idx: jax.Array, values: jax.Array,
                        images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-image loss ``float32 [P, B]`` (:attr:`loss` of each image alone) and accuracy
        (mean :attr:`metric`) ``[P]`` of ``context`` with the weights ``idx [G]`` set to each row
        of ``values int8 [P, G]``, on one mini-batch of ``B`` images."""
        def one(row, shared):
            problem, context, idx, images, labels = shared
            logits = self.logits(problem, context.at[idx].set(row), images, "float")
            per_image = jax.vmap(lambda z, y: self.loss(z[None], y[None]))(logits, labels)
            return per_image, jnp.mean(self.metric(logits, labels).astype(jnp.float32))

        strategy, chunk = self._local
        return population_map(one, values, (problem, context, idx, images, labels), self.devices, strategy, chunk)

    def _group_step(self, problem: Problem, carry, inputs):
        """One group: a fresh mini-batch, ``P`` assignments of its weights (the context first),
        their losses in one population call, the best kept as the context, the marginals moved
        toward it (the winner by :func:`select`).

        Args:
          carry: ``(probs float32 [D, K], context int8 [D])``.
          inputs: ``(idx int32 [G], active bool [G], key)``, the group, its unfrozen weights.

        Returns:
          ``(carry, (context loss, context accuracy, best loss, whether a sample won))``.
        """
        probs, context = carry
        idx, active, key = inputs
        o = self.options
        batch_key, sample_key = jax.random.split(key)
        pick = jax.random.randint(batch_key, (o.batch_size,), 0, problem.images.shape[0])
        p = probs[idx]
        draws = jax.random.categorical(sample_key, jnp.log(p), shape=(o.population_size - 1, idx.shape[0]))
        levels = (problem.q0[idx].astype(jnp.int32) + draws - o.radius).astype(jnp.int8)
        current = context[idx]
        values = jnp.concatenate([current[None], jnp.where(active, levels, current)])
        losses, acc = self.population_loss(problem, context, idx, values, problem.images[pick], problem.labels[pick])
        best = select(losses, o.accept_z)
        loss = jnp.mean(losses, axis=1)
        winner = values[best]
        category = winner.astype(jnp.int32) - problem.q0[idx].astype(jnp.int32) + o.radius
        probs = probs.at[idx].set(update_marginals(p, category, active, o.learning_rate))
        context = context.at[idx].set(winner)
        return (probs, context), (loss[0], acc[0], loss[best], best > 0)

    def _cycle(self, state: State, problem: Problem,
               cycle_keys: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[State, CycleStats]:
        """One cycle (module docstring, step 2): freeze, regroup, every group in turn, with
        ``cycle_keys`` (:func:`qevo.loop.step_keys`: regrouping, the groups' draws, statistics)."""
        o = self.options
        group_key, step_key, stats_key = cycle_keys
        problem = with_statistics(problem, state.batch_stats)
        context, frozen = freeze(state.probs, state.context, problem.q0, o.radius, o.threshold)
        groups = regroup(group_key, state.probs, o.num_groups, o.group_size)
        keys = jax.random.split(step_key, o.num_groups)
        (probs, context), (loss, acc, best, improved) = jax.lax.scan(
            lambda carry, inputs: self._group_step(problem, carry, inputs),
            (state.probs, context),
            (groups, ~frozen[groups], keys),
        )
        confident = jnp.mean(jnp.max(probs, axis=1) >= o.threshold)
        batch_stats = self._statistics(problem, context, stats_key)
        val_accuracy = self._accuracy(with_statistics(problem, batch_stats), context, problem.val, "float")
        stats = CycleStats(loss=loss, accuracy=acc, best_loss=best, improved=improved, confident=confident,
                           val_accuracy=val_accuracy)
        return State(probs=probs, context=context, batch_stats=batch_stats, cycle=state.cycle + 1), stats


def with_statistics(problem: Problem, batch_stats: dict) -> Problem:
    """``problem`` whose network normalises with ``batch_stats`` (unchanged for ``{}``)."""
    return (dataclasses.replace(problem, variables={**problem.variables, "batch_stats": batch_stats}) if batch_stats
            else problem)


# --------------------------------------------------------------------------- derivative check


AD_PRIMITIVES = ("add_any", "custom_lin", "linear_call")
"""Primitives that only differentiation creates (cotangent sums, linearised custom rules)."""


def derivative_equations(jaxpr) -> list[str]:
    """Every equation of a (closed) jaxpr, nested ones included, that belongs to a derivative.

    JAX records each equation's transformations in its name stack: forward-mode
    differentiation (``jax.jvp``, the first half of ``jax.grad``/``jax.vjp``) as ``jvp(...)``
    and reverse mode as ``transpose(...)``; nested calls traced under them carry the same
    words in their names, and the accumulation of cotangents is the AD-only ``add_any``.
    Primitive names alone would mislead: a derivative-free forward pass holds
    ``custom_jvp_call``/``custom_vjp_call`` (ReLU, qevo's CPU convolution: functions that
    carry derivative rules, not derivatives) and the array ``transpose``.

    Returns:
      ``"<primitive> [<name stack>]"`` for each such equation (empty: derivative-free).
    """
    found = []

    def walk(j):
        j = getattr(j, "jaxpr", j)
        for eqn in j.eqns:
            stack = str(eqn.source_info.name_stack)
            name = str(eqn.params.get("name", ""))
            words = f"{stack} {name}"
            if eqn.primitive.name in AD_PRIMITIVES or any(w in words for w in ("jvp(", "vjp(", "transpose(")):
                found.append(f"{eqn.primitive.name} [{stack or name}]")
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub)

    walk(jaxpr)
    return found


# --------------------------------------------------------------------------- the command


def integer_bits(cfg: ml_collections.ConfigDict, model) -> Bits:
    """Concrete int32 ``[L]`` widths of ``model``'s layers: ``coevolve.w_bits``/``a_bits``, the
    ``quant.float_layers`` float; or, with ``bits_from``, the per-layer widths of final model
    ``bits_model`` of that search run (the row of its ``final.csv``)."""
    if cfg.bits_from is None:
        bits = train.uniform_bits(model.num_layers, cfg.coevolve.w_bits, cfg.coevolve.a_bits,
                                  train.float_layers(cfg, model))
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
    :func:`qevo.train.resolve_inputs`)."""
    inputs = train.resolve_inputs(cfg, model, variables, data, loss, metric)
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
    Resumable in ``workdir``; returns :func:`qevo.train.fit`'s results and ``images``."""
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
    trainer = train.Trainer(qcfg, subset, prep.model, quantized=True, loss=prep.runner.loss, metric=prep.runner.metric)
    _, fitted = train.fit(qcfg, subset, prep.model, prep.variables, bits, workdir, key, "qat baseline", trainer)
    steps = qcfg.train.epochs * (subset.train_images.shape[0] // qcfg.train.batch_size)
    return {**fitted, "images": steps * qcfg.train.batch_size}


def save_integer_model(path: pathlib.Path, prep: Prepared, genome: jax.Array, meta: dict,
                       batch_stats: dict | None = None) -> None:
    """``integer_model.msgpack``: ``{"kernels": {path: IntKernel}, "variables": float variables}``
    (with ``batch_stats`` in place of the float model's BatchNorm statistics, if given)."""
    variables = {**prep.variables, "batch_stats": batch_stats} if batch_stats else prep.variables
    tree = {"kernels": prep.runner.kernels(genome, prep.problem.scales), "variables": variables}
    checkpoint.save(path, tree, meta)


@method(defaults)
def run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, model=None, variables: dict | None = None,
        data: Dataset | None = None, loss: Callable | None = None, metric: Callable | None = None) -> dict:
    """The whole protocol (module docstring) in ``workdir``; returns ``results.json``'s dict.

    From Python, ``model=`` (any Flax network, unchanged), ``variables=`` (its trained float
    variables; None: trained here per ``cfg.train``) and ``data=`` (a
    :class:`qevo.data.Dataset`) replace ``cfg.model`` and ``cfg.data``
    (:func:`qevo.train.resolve_inputs`). ``loss=`` (``loss(logits, labels) -> float32 []``,
    the batch mean; default cross-entropy) is what the float model and the QAT baseline
    train with and what ranks the coevolution's samples, and ``metric=`` (``metric(logits,
    labels) -> float32 [N]`` in [0, 1]; default top-1) is what every accuracy averages; both
    jit-traceable (:mod:`qevo.losses`)."""
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    watch = Stopwatch()
    c = cfg.coevolve
    with watch.stage("prepare"):
        prep = prepare(cfg, workdir, model, variables, data, loss, metric)
        env = environment(prep.model, prep.variables, prep.ds.train_images.shape[1:], cfg.train.batch_size,
                          cfg.model.precision)
    runner, problem = prep.runner, prep.problem
    fake_quant = train.Trainer(cfg, prep.ds, prep.model, quantized=False, loss=runner.loss,
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
        "seed": cfg.seed,
        "w_bits": prep.bits.w.tolist(),
        "a_bits": prep.bits.a.tolist(),
        "layers": list(runner.layers),
        "integer_weights": runner.num_weights,
        **scores,
        "seconds": watch.seconds(),
        **env,
    }
    write_json(workdir / RESULTS, results)
    return results


if __name__ == "__main__":
    from qevo.cli import main

    sys.exit(main("qevo.coevolve", run, validate))
