"""Population evaluator: a whole population of bit configurations in one compiled call.

Given shared float variables and a population of bit configurations (``w_bits``,
``a_bits``: int32 ``[P, L]``), each individual optionally gets ``K`` steps of
quantization-aware fine-tuning (its own copy of the parameters and optimizer state, the
same mini-batches for every individual) and is then scored on an evaluation split. The
population axis is laid over every device of a ``pop`` mesh (padded when ``P`` does not
divide), and on each device individuals run by one of three strategies:

* ``"vmap"``: all local individuals at once;
* ``"map"``: ``jax.lax.map`` in chunks of ``chunk_size`` individuals (1 = sequential);
* ``"auto"``: ``"map"`` with chunk 1 on CPU (a vmapped convolution over per-individual
  weights is several times slower there than a sequential map), ``"vmap"`` elsewhere,
  except for QAT steps above ``VMAP_QAT_MAX_MACS`` (vmapped convolution gradients of a
  ResNet-20-sized step were slower on a GPU than one individual after another).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qevo.data.datasets import normalize
from qevo.errors import ConfigError, PopulationMemoryError
from qevo.models.cost import layer_table
from qevo.models.losses import cross_entropy, top1
from qevo.quant.interception import QevoModel
from qevo.quant.layers import Bits
from qevo.quant.quantizers import validate_bits

STRATEGIES = ("auto", "vmap", "map")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is XLA's out-of-memory error (``RESOURCE_EXHAUSTED``) from running a program."""
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """Per-individual fine-tuning before scoring.

    Attributes:
      steps: SGD steps ``K`` (0 = score the calibrated network as it is).
      batch_size: training images per step.
      learning_rate: constant step size.
      momentum: SGD momentum (``optimizer="sgd"``).
      weight_decay: decoupled weight decay.
      weight_decay_on: what it decays, as :func:`decay_mask`.
      optimizer: ``"sgd"`` or ``"adam"``.
      learn_clip: also train the activation clip ranges (PACT).
    """

    steps: int = 0
    batch_size: int = 128
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    weight_decay_on: str = "all"
    optimizer: str = "sgd"
    learn_clip: bool = True

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ConfigError(f"QAT steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"QAT optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")

    def make_optimizer(self) -> optax.GradientTransformation:
        return sgd_or_adam(self.optimizer, self.learning_rate, self.momentum, False, self.weight_decay,
                           self.weight_decay_on)


def decay_mask(weight_decay_on: str):
    """The mask of the parameters that weight decay acts on: ``"all"`` (None: every array) or
    ``"kernels"`` (arrays of rank >= 2: convolution and dense kernels, not BatchNorm scales,
    biases or clip ranges)."""
    if weight_decay_on not in ("all", "kernels"):
        raise ConfigError(f"weight_decay_on must be 'all' or 'kernels', got {weight_decay_on!r}")
    return None if weight_decay_on == "all" else (lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree))


def sgd_or_adam(optimizer: str, learning_rate, momentum: float, nesterov: bool, weight_decay: float,
                weight_decay_on: str) -> optax.GradientTransformation:
    """SGD with momentum (optionally Nesterov) after decoupled weight decay, or AdamW; the
    decay acts on :func:`decay_mask`'s parameters. ``learning_rate``: a float or an optax schedule."""
    mask = decay_mask(weight_decay_on)
    if optimizer == "adam":
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask)
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                       optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


# Above this many multiply-accumulates per individual QAT step (MACs per image x batch),
# ``auto`` fine-tunes individuals one after another on accelerators: on an H100 a vmapped
# ResNet-20 QAT step (5.2 G) ran at 0.78x the per-individual loop, a sequential map at
# 1.0x (benchmarks/results/run_nvidia_h100_80gb_hbm3/run.json), while LeNet-5 (0.05 G) gained 1.9x from vmap
# (benchmarks/results/population_nvidia_h100_80gb_hbm3_first_run/nsga3_population.json).
VMAP_QAT_MAX_MACS = 2**30


def validate_strategy(strategy: str, chunk_size: int | None) -> None:
    """Raise ``ValueError`` for a strategy name not in ``STRATEGIES`` or a chunk size below 1."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown population strategy {strategy!r}; use one of {STRATEGIES}")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"population chunk_size must be >= 1 (or None for 1), got {chunk_size!r}")


def resolve_strategy(strategy: str, chunk_size: int | None, backend: str,
                     qat_step_macs: int | None = None) -> tuple[str, int | None]:
    """Turn ``"auto"`` into a concrete strategy for ``backend``; returns (strategy, chunk).

    ``qat_step_macs``: MACs of one individual's QAT step when individuals fine-tune (None
    when they are only scored); large steps run sequentially on accelerators too.
    """
    validate_strategy(strategy, chunk_size)
    if strategy == "auto":
        sequential = backend == "cpu" or (qat_step_macs is not None and qat_step_macs > VMAP_QAT_MAX_MACS)
        return ("map", 1) if sequential else ("vmap", None)
    return strategy, chunk_size


@dataclasses.dataclass(frozen=True, eq=False)
class PopulationEvaluator:
    """Scores populations of bit configurations of one model on one evaluation split.

    Attributes:
      model: a qevo model (``apply(variables, images, bits, train)``).
      mean, std: per-channel normalisation of uint8 images.
      eval_batch_size: evaluation images per forward pass.
      strategy: ``"auto"``, ``"vmap"`` or ``"map"``.
      chunk_size: individuals per ``lax.map`` step for ``"map"`` (``None`` = 1).
      qat: per-individual fine-tuning settings.
      devices: devices of the ``pop`` mesh (default, empty: all, those of every process in a
        multi-process run).
      loss: ``loss(logits, labels) -> float32 []`` the fine-tuning minimises
        (:mod:`qevo.models.losses`; jit-traceable).
      metric: ``metric(logits, labels) -> float32 [N]`` per-example score in [0, 1] that an
        individual's score averages over the evaluation split (jit-traceable).
    """

    model: QevoModel
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_batch_size: int = 1000
    strategy: str = "auto"
    chunk_size: int | None = None
    qat: QATConfig = QATConfig()
    devices: tuple = ()
    loss: Callable = cross_entropy
    metric: Callable = top1
    _compiled: jax.stages.Wrapped = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        validate_strategy(self.strategy, self.chunk_size)  # fail now, not at the first call
        devices = tuple(self.devices or jax.devices())
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "_compiled", replicated_jit(self._population, devices, static_argnums=8))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def __call__(self, variables, w_bits, a_bits, eval_images, eval_labels, *, key=None, train_images=None,
                 train_labels=None):
        """Accuracy (the mean of :attr:`metric`; top-1 by default) of every individual.

        Args:
          variables: shared float variables (``params``, ``batch_stats``, calibrated ``quant``).
          w_bits, a_bits: int ``[P, L]`` widths in 1..32.
          eval_images: uint8 ``[N, H, W, C]`` (ideally already on device); eval_labels ``[N, ...]``
            (int ``[N]`` class indices for the default loss and metric).
          key: PRNG key for the fine-tuning mini-batches (needed when ``qat.steps > 0``).
          train_images, train_labels: the fine-tuning data (needed when ``qat.steps > 0``).

        Returns:
          float32 ``[P]`` mean metric in [0, 1] (computed: the call blocks); NaN where the network
          produced non-finite logits.

        Raises:
          PopulationMemoryError: the program needs more memory than the devices have.
        """
        args, local = self._arguments(variables, w_bits, a_bits, eval_images, eval_labels, key, train_images,
                                      train_labels)
        try:
            return jax.block_until_ready(self._compiled(*args, local))
        except jax.errors.JaxRuntimeError as err:
            if not is_out_of_memory(err):
                raise
            (strategy, chunk), population = local, args[1].shape[0]
            at_once = (f"vmap over all {-(-population // self.num_devices)}" if strategy == "vmap"
                       else f"map in chunks of {chunk or 1}")
            batch = min(self.eval_batch_size, eval_images.shape[0])
            raise PopulationMemoryError(
                f"evaluating {population} individuals ({at_once} per device, {batch} images per forward "
                f"pass) does not fit the memory of {self.num_devices} {self.devices[0].platform} device(s): "
                f"{str(err).splitlines()[0]}; score fewer at once (strategy='map' with a small chunk_size), lower "
                f"eval_batch_size or the QAT batch size, or spread the population over more devices") from err

    def lower(self, variables, w_bits, a_bits, eval_images, eval_labels, *, key=None, train_images=None,
              train_labels=None):
        """The call's ``jax.stages.Lowered`` program (same arguments as calling the evaluator),
        e.g. ``.compile().memory_analysis()`` for the device memory a population size needs."""
        args, local = self._arguments(variables, w_bits, a_bits, eval_images, eval_labels, key, train_images,
                                      train_labels)
        return self._compiled.lower(*args, local)

    def local_strategy(self, variables, image_shape: tuple[int, ...]) -> tuple[str, int | None]:
        """The ``(strategy, chunk)`` a call on images of ``image_shape`` (HWC) runs with:
        ``"auto"`` resolved by the devices' platform and, when individuals fine-tune on an
        accelerator, the multiply-accumulates of one QAT step (:data:`VMAP_QAT_MAX_MACS`)."""
        step_macs = None
        if self.strategy == "auto" and self.qat.steps > 0 and self.devices[0].platform != "cpu":
            step_macs = int(layer_table(self.model, variables, image_shape).macs.sum()) * self.qat.batch_size
        return resolve_strategy(self.strategy, self.chunk_size, self.devices[0].platform, step_macs)

    def _arguments(self, variables, w_bits, a_bits, eval_images, eval_labels, key, train_images, train_labels):
        """Validate the inputs; returns the jitted function's arguments and its ``local`` strategy."""
        w, a = validate_bits(w_bits, a_bits, self.model.num_layers)
        if w.ndim != 2:
            raise ValueError(f"w_bits must be a population [P, {self.model.num_layers}], got shape {w.shape}")
        if self.qat.steps > 0 and (key is None or train_images is None or train_labels is None):
            raise ValueError("QAT fine-tuning (qat.steps > 0) needs key=, train_images= and train_labels=")
        if self.qat.steps == 0:
            key = jax.random.key(0)
            train_images, train_labels = eval_images[:1], eval_labels[:1]
        args = variables, jnp.asarray(w), jnp.asarray(a), key, train_images, train_labels, eval_images, eval_labels
        return args, self.local_strategy(variables, tuple(eval_images.shape[1:]))

    def _population(self, variables, w, a, key, train_x, train_y, eval_x, eval_y, local):
        batches = batch_eval_set(eval_x, eval_y, self.eval_batch_size)
        return population_map(self._individual, (w, a), (variables, key, train_x, train_y, batches), self.devices,
                              *local)

    def _individual(self, wa, shared):
        variables, key, train_x, train_y, batches = shared
        bits = Bits(w=wa[0], a=wa[1])
        if self.qat.steps > 0:
            variables = self._finetune(variables, bits, key, train_x, train_y)
        return self._accuracy(variables, bits, batches)

    def _logits(self, variables, bits, images, train=False, rng=None):
        x = normalize(images, self.mean, self.std)
        if train:
            return self.model.apply(variables, x, bits, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
        return self.model.apply(variables, x, bits, train=False)

    def _accuracy(self, variables, bits, batches):
        return batched_accuracy(lambda x: self._logits(variables, bits, x), batches, self.metric)

    def _finetune(self, variables, bits, key, train_x, train_y):
        qat = self.qat
        trainable = {"params": variables["params"]}
        if qat.learn_clip:
            trainable["quant"] = variables["quant"]
        frozen = {k: v for k, v in variables.items() if k not in trainable and k != "batch_stats"}
        tx = qat.make_optimizer()

        def loss_fn(trainable, stats, x, y, rng):
            v = {**frozen, **trainable, **({"batch_stats": stats} if stats is not None else {})}
            logits, updates = self._logits(v, bits, x, train=True, rng=rng)
            return self.loss(logits, y), updates.get("batch_stats")

        def step(carry, step_key):
            trainable, stats, opt_state = carry
            idx_key, drop_key = jax.random.split(step_key)
            idx = jax.random.randint(idx_key, (qat.batch_size,), 0, train_x.shape[0])
            grads, stats = jax.grad(loss_fn, has_aux=True)(trainable, stats, train_x[idx], train_y[idx], drop_key)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), stats, opt_state), None

        stats = variables.get("batch_stats")
        carry = (trainable, stats, tx.init(trainable))
        (trainable, stats, _), _ = jax.lax.scan(step, carry, jax.random.split(key, qat.steps))
        out = {**frozen, **trainable}  # pyright: ignore[reportGeneralTypeIssues]  # optax types its result as any pytree
        if stats is not None:
            out["batch_stats"] = stats
        return out


def replicated_jit(fn, devices: tuple, **jit_kwargs) -> jax.stages.Wrapped:
    """``jax.jit(fn)`` with every input and output replicated over ``devices``: the one way
    qevo compiles a function that spreads work over a mesh of them.

    In a multi-process run (:mod:`qevo.distributed`) every process passes the same values
    (host arrays, taken as the whole global value) and reads every result; in one process it
    places the inputs on all of ``devices``. ``jit_kwargs`` go to ``jax.jit`` (e.g.
    ``static_argnums``).
    """
    replicated = NamedSharding(Mesh(np.array(devices), ("all",)), PartitionSpec())
    return jax.jit(fn, in_shardings=replicated, out_shardings=replicated, **jit_kwargs)


def population_map(fn, xs, shared, devices: tuple, strategy: str, chunk: int | None):
    """``fn(x, shared)`` for every ``x`` on the leading (population) axis of the pytree ``xs``,
    sharded over ``devices``: the one population mechanism of every evaluator.

    ``shared`` (a pytree) is replicated on every device. The population is padded to a
    multiple of the device count (the padding repeats the last individual and is dropped
    from the result); on each device individuals run by ``strategy`` (``"vmap"``, or
    ``"map"`` in chunks of ``chunk``; see :func:`resolve_strategy`).
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]

    def local(part, shared):
        def one(x):
            return fn(x, shared)

        if jax.tree_util.tree_leaves(part)[0].shape[0] == 1:
            return jax.tree_util.tree_map(lambda v: v[None], one(jax.tree_util.tree_map(lambda v: v[0], part)))
        if strategy == "vmap":
            return jax.vmap(one)(part)
        return jax.lax.map(one, part, batch_size=chunk if chunk and chunk > 1 else None)

    if len(devices) == 1:
        return local(xs, shared)
    pad = -n % len(devices)
    xs = jax.tree_util.tree_map(lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], pad, axis=0)]), xs)
    mesh = Mesh(np.array(devices), ("pop",))
    # Replicated inputs and per-shard map carries mix inside; skip the varying-axis type check.
    out = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec("pop"), PartitionSpec()),
                        out_specs=PartitionSpec("pop"), check_vma=False)(xs, shared)
    return jax.tree_util.tree_map(lambda v: v[:n], out)


def batched_accuracy(logits_fn, batches, metric: Callable = top1) -> jax.Array:
    """Mean ``metric`` of ``logits_fn(uint8 images) -> logits`` over ``batches`` (from :func:`batch_eval_set`).

    ``metric(logits, labels) -> [N]`` scores each example in [0, 1] (default :func:`qevo.models.losses.top1`:
    the accuracy); the padding's scores are masked out, whatever they are.

    Returns float32 in [0, 1], or NaN when any logit is not finite.
    """
    images, labels, mask = batches

    def body(carry, batch):
        total, finite = carry
        x, y, m = batch
        logits = logits_fn(x)
        total = total + jnp.sum(jnp.where(m, metric(logits, y).astype(jnp.float32), 0.0))
        return (total, finite & jnp.all(jnp.isfinite(logits))), None

    (total, finite), _ = jax.lax.scan(body, (jnp.float32(0), jnp.bool_(True)), (images, labels, mask))
    return jnp.where(finite, total / jnp.sum(mask), jnp.nan).astype(jnp.float32)


def batch_eval_set(images: jax.Array, labels: jax.Array, batch_size: int):
    """Pad and reshape images ``[N, ...]`` and labels ``[N, ...]`` (any shape per example) to
    ``[B, batch, ...]``, with a validity mask bool ``[B, batch]`` (False on the zero padding)."""
    n = images.shape[0]
    batch_size = min(batch_size, n)
    pad = -n % batch_size
    mask = jnp.arange(n + pad) < n
    images = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = jnp.concatenate([labels, jnp.zeros((pad, *labels.shape[1:]), labels.dtype)])
    shape = (-1, batch_size)
    return (images.reshape(*shape, *images.shape[1:]), labels.reshape(*shape, *labels.shape[1:]),
            mask.reshape(shape))
