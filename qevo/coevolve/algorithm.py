"""The cooperative coevolution of integer weights, with no gradients: per-weight categorical
marginals around the rounded weights (:func:`initial_probs`, :func:`allowed`), the freezing
of confident weights and the regrouping of the rest (:func:`freeze`, :func:`regroup`), the
update towards each group's winner (:func:`update_marginals`), the paired acceptance test of
a new context (:func:`select`), and :class:`Coevolution`, which runs a cycle of it as one
compiled program; :func:`derivative_equations` shows that none of it differentiates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from qevo.data.datasets import augment, normalize
from qevo.evolution.population import (
    batched_accuracy,
    population_map,
    replicated_jit,
    resolve_strategy,
)
from qevo.models.losses import cross_entropy, top1
from qevo.quant import intforward
from qevo.quant.interception import QevoModel
from qevo.quant.layers import Bits

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
      val: the validation subset as :func:`qevo.evolution.population.batch_eval_set` batches.
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
        images (:func:`qevo.quant.intforward.batch_statistics`), or the float model's with 0.
      cycle: int32, cycles done (cycle ``c`` draws :func:`qevo.evolution.loop.step_keys` ``(base, c)``).
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
      loss: ``loss(logits, labels) -> float32 []``, the batch mean (:mod:`qevo.models.losses`;
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
        ``"integer"`` or (the same network, faster) ``"float"`` arithmetic (:func:`qevo.quant.intforward.apply`)."""
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
        ``cycle_keys`` (:func:`qevo.evolution.loop.step_keys`: regrouping, the groups' draws, statistics)."""
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
