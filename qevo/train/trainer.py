"""Training: one model data-parallel over the devices (:class:`Trainer`, :func:`fit`) or many
side by side (:class:`PopulationTrainer`, :func:`fit_population`); one epoch is one compiled
call (``lax.scan`` over the shuffled mini-batches of the device-resident training set), and a
checkpoint is written atomically after every epoch.
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
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from qevo import checkpoint
from qevo import config as config_lib
from qevo.data.datasets import Dataset, augment, normalize
from qevo.evolution.population import (
    batch_eval_set,
    batched_accuracy,
    population_map,
    replicated_jit,
    resolve_strategy,
    sgd_or_adam,
)
from qevo.harness import CHECKPOINT, MODEL, progress, write_csv
from qevo.models.cost import layer_table
from qevo.models.losses import cross_entropy, top1, training_loss
from qevo.models.zoo import init_variables
from qevo.quant.calibration import calibrate
from qevo.quant.interception import QevoModel
from qevo.quant.layers import Bits

HISTORY = "history.csv"


@struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      epoch: epochs completed (int).
      variables: ``params``, ``batch_stats`` (if any) and ``quant`` of the model.
      opt_state: optax state of the trainable part (``params``, and ``quant`` under QAT).
    """

    epoch: jax.Array
    variables: dict
    opt_state: optax.OptState


def make_optimizer(t: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (momentum, optional Nesterov) or Adam with weight decay and a warm-up + cosine schedule.

    ``t.weight_decay_on`` is ``"all"`` or ``"kernels"`` (:func:`qevo.evolution.population.decay_mask`).
    """
    total = t.epochs * steps_per_epoch
    if t.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, t.learning_rate, t.warmup_epochs * steps_per_epoch, max(total, 1), end_value=0.0
        )
    else:
        lr = t.learning_rate
    return sgd_or_adam(t.optimizer, lr, t.momentum, t.nesterov, t.weight_decay, t.weight_decay_on)


class Trainer:
    """Compiled epoch and evaluation functions for one model, dataset and config.

    Training is data-parallel over ``devices`` (default: every device, those of every
    process in a multi-process run): each mini-batch is split over a ``data`` mesh axis,
    BatchNorm statistics and gradients are reduced over it, and the variables stay
    replicated, so any device count trains as one device would (up to the order of float
    sums). Augmentation draws for the whole batch before it is split; evaluation batches are
    split likewise.

    It minimises ``loss(logits, labels) -> float32 []`` (default: cross-entropy with
    ``train.label_smoothing``) and scores ``metric(logits, labels) -> float32 [N]`` (default:
    top-1), both jit-traceable (:mod:`qevo.models.losses`): ``accuracy`` is the metric's mean.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, ds: Dataset, model: QevoModel, quantized: bool,
                 devices: tuple | None = None, loss: Callable = cross_entropy, metric: Callable = top1):
        self.cfg, self.model = cfg, model
        self.loss, self.metric = training_loss(loss, cfg.train.label_smoothing), metric
        self.mean, self.std = ds.mean, ds.std
        self.steps_per_epoch = ds.train_images.shape[0] // cfg.train.batch_size
        if self.steps_per_epoch < 1:
            raise config_lib.ConfigError(
                f"train.batch_size={cfg.train.batch_size} exceeds the {ds.train_images.shape[0]} training images"
            )
        devices = tuple(devices or jax.devices())
        if cfg.train.batch_size % len(devices):
            raise config_lib.ConfigError(
                f"train.batch_size={cfg.train.batch_size} does not split over the {len(devices)} devices that train "
                f"data-parallel; use a multiple of {len(devices)}"
            )
        self.mesh = Mesh(np.array(devices), ("data",))
        self.train_model = (model if len(devices) == 1
                            else model.clone(options=dataclasses.replace(model.options, batch_axis="data")))
        self.tx = make_optimizer(cfg.train, self.steps_per_epoch)
        self.trainable = ("params", "quant") if quantized else ("params",)
        self.epoch = replicated_jit(self._epoch, devices)
        self.accuracy = replicated_jit(self._accuracy, devices)

    def init_state(self, variables: dict) -> TrainState:
        opt_state = self.tx.init({k: variables[k] for k in self.trainable})
        return TrainState(epoch=jnp.int32(0), variables=variables, opt_state=opt_state)

    def _loss(self, trainable, variables, bits, x, y, key):
        v = {**variables, **trainable}
        logits, updates = self.train_model.apply(
            v, normalize(x, self.mean, self.std), bits, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        return self.loss(logits, y), updates

    def _gradients(self, trainable, variables, bits, x, y, key):
        """``((loss, batch_stats updates), gradients)`` of the mean loss of the batch ``x``, ``y``;
        over several devices each computes its shard, and the loss and gradients are averaged."""
        grad = jax.value_and_grad(self._loss, has_aux=True)
        if self.train_model is self.model:
            return grad(trainable, variables, bits, x, y, key)

        def shard(trainable, variables, bits, x, y, key):
            (loss, updates), grads = grad(trainable, variables, bits, x, y,
                                          jax.random.fold_in(key, jax.lax.axis_index("data")))
            loss, grads = jax.lax.pmean((loss, grads), "data")
            return (loss, updates), grads  # the updates are whole-batch statistics: equal on every device

        split, whole = PartitionSpec("data"), PartitionSpec()
        return jax.shard_map(shard, mesh=self.mesh, in_specs=(whole, whole, whole, split, split, whole),
                             out_specs=whole, check_vma=False)(trainable, variables, bits, x, y, key)

    def _epoch(self, state: TrainState, bits: Bits | None, key, images, labels):
        bs = self.cfg.train.batch_size
        perm_key, key = jax.random.split(key)
        order = jax.random.permutation(perm_key, images.shape[0])[: self.steps_per_epoch * bs]
        order = order.reshape(self.steps_per_epoch, bs)

        def step(carry, inputs):
            variables, opt_state = carry
            idx, step_key = inputs
            aug_key, drop_key = jax.random.split(step_key)
            x = images[idx]
            if self.cfg.train.augment:
                x = augment(aug_key, x)
            trainable = {k: variables[k] for k in self.trainable}
            (loss, updates), grads = self._gradients(trainable, variables, bits, x, labels[idx], drop_key)
            upd, opt_state = self.tx.update(grads, opt_state, trainable)
            # optax types apply_updates' result as any pytree; here it is the dict trainable is
            variables = {**variables, **optax.apply_updates(trainable, upd), **updates}  # pyright: ignore[reportGeneralTypeIssues]
            return (variables, opt_state), loss

        keys = jax.random.split(key, self.steps_per_epoch)
        (variables, opt_state), losses = jax.lax.scan(step, (state.variables, state.opt_state), (order, keys))
        return TrainState(epoch=state.epoch + 1, variables=variables, opt_state=opt_state), jnp.mean(losses)

    def _accuracy(self, variables, bits: Bits | None, batches):
        def logits(variables, bits, x):
            return self.model.apply(variables, normalize(x, self.mean, self.std), bits, train=False)

        if self.train_model is self.model:
            return batched_accuracy(lambda x: logits(variables, bits, x), batches, self.metric)

        def split_logits(x):  # each device scores its share of the batch (padded to split evenly)
            pad = -x.shape[0] % self.mesh.size
            x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
            whole, split = PartitionSpec(), PartitionSpec("data")
            out = jax.shard_map(logits, mesh=self.mesh, in_specs=(whole, whole, split), out_specs=split,
                                check_vma=False)(variables, bits, x)
            return out[: x.shape[0] - pad]

        return batched_accuracy(split_logits, batches, self.metric)


def initial_variables(cfg, ds: Dataset, model: QevoModel, bits: Bits | None, key) -> dict:
    """Fresh variables, or (QAT) the float model of ``train.init_from`` with calibrated clips."""
    shape = ds.train_images.shape[1:]
    variables = init_variables(model, key, shape)
    if cfg.train.init_from is None:
        if bits is not None:
            raise config_lib.ConfigError(
                "QAT (train.w_bits/a_bits < 32) starts from a float model: "
                "set --config.train.init_from=<float run folder>"
            )
        return variables
    variables, _ = checkpoint.load(pathlib.Path(cfg.train.init_from) / MODEL, variables)
    calib = normalize(jnp.asarray(ds.train_images[:512]), ds.mean, ds.std)
    return calibrate(model, variables, calib)


class PopulationTrainer:
    """Compiled epoch and evaluation functions for a population of models trained side by side.

    Each of ``P`` models has its own variables, optimizer state and widths; all see the same
    mini-batches, augmentation and dropout draws (one key), so each trains exactly as
    :class:`Trainer` on one device would train it alone. The population axis is laid over a
    ``pop`` mesh of ``devices`` (default: every device, those of every process in a
    multi-process run; padded when ``P`` does not divide), and on each device its models run
    by ``strategy`` (:func:`qevo.evolution.population.resolve_strategy`, with the multiply-accumulates of
    one training step deciding ``"auto"`` on accelerators).

    Attributes:
      epoch: ``(state [P], bits [P, L], key, images, labels) -> (state [P], mean losses [P])``.
      accuracy: ``(variables [P], bits [P, L], batches) -> float32 [P]``, the mean metric.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, ds: Dataset, model: QevoModel, quantized: bool,
                 devices: tuple | None = None, strategy: str = "auto", chunk_size: int | None = None,
                 loss: Callable = cross_entropy, metric: Callable = top1):
        self.devices = tuple(devices or jax.devices())
        # one model's epoch and accuracy
        self.one = Trainer(cfg, ds, model, quantized, devices=self.devices[:1], loss=loss, metric=metric)
        platform = self.devices[0].platform
        step_macs = None
        if strategy == "auto" and platform != "cpu":
            shape = ds.train_images.shape[1:]
            table = layer_table(model, init_variables(model, jax.random.key(0), shape), shape)
            step_macs = int(table.macs.sum()) * cfg.train.batch_size
        self.local = resolve_strategy(strategy, chunk_size, platform, step_macs)
        self.epoch = replicated_jit(self._epoch, self.devices)
        self.accuracy = replicated_jit(self._accuracy, self.devices)

    def init_state(self, variables: dict, population: int) -> TrainState:
        """``population`` copies of :meth:`Trainer.init_state` of ``variables``, stacked on a leading axis."""
        one = self.one.init_state(variables)
        return jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (population, *jnp.shape(v))), one)

    def _epoch(self, states: TrainState, bits: Bits, key, images, labels):
        return population_map(lambda sb, shared: self.one._epoch(sb[0], sb[1], *shared), (states, bits),
                              (key, images, labels), self.devices, *self.local)

    def _accuracy(self, variables, bits: Bits, batches):
        return population_map(lambda vb, batches: self.one._accuracy(vb[0], vb[1], batches), (variables, bits),
                              batches, self.devices, *self.local)


HISTORY_COLUMNS = ["epoch", "loss", "val_accuracy", "train_seconds"]


def _train_epochs(cfg, ds: Dataset, trainer, state: TrainState, bits, key: jax.Array, ckpt: pathlib.Path,
                  desc: str, identity: dict, on_epoch) -> tuple[TrainState, dict]:
    """The training loop of :func:`fit` and :func:`fit_population`: ``cfg.train.epochs`` epochs of
    ``trainer``, a checkpoint after each in ``ckpt`` (with ``identity`` in its metadata) and a
    resume from it when its ``identity`` matches (else the training starts over).

    ``on_epoch(history)`` writes the history after each epoch; a history record holds the
    epoch, the mean training loss and validation accuracy (floats, or lists of one per model
    of a population) and the cumulative training seconds. Returns the state and the metadata.
    """
    meta = {"history": [], "train_seconds": 0.0, **identity}
    if ckpt.exists():
        saved, saved_meta = checkpoint.load(ckpt)
        if all(saved_meta.get(k) == v for k, v in identity.items()):
            state, meta = checkpoint.restore(saved, state, ckpt), saved_meta
            print(f"resuming {ckpt.parent} after epoch {int(np.max(state.epoch))}", file=sys.stderr)
        else:
            print(f"{ckpt} holds other models; training these afresh", file=sys.stderr)
    images, labels = jax.device_put(ds.train_images), jax.device_put(ds.train_labels)
    val = batch_eval_set(jnp.asarray(ds.val_images), jnp.asarray(ds.val_labels), cfg.train.eval_batch_size)
    epoch_keys = jax.random.split(key, cfg.train.epochs)
    done = int(np.max(state.epoch))
    bar = progress(cfg.train.epochs, done, desc)
    for epoch in range(done, cfg.train.epochs):
        start = time.perf_counter()
        state, loss = trainer.epoch(state, bits, epoch_keys[epoch], images, labels)
        loss = np.asarray(loss)
        meta["train_seconds"] += time.perf_counter() - start
        val_acc = (np.asarray(trainer.accuracy(state.variables, bits, val)) if ds.val_images.shape[0]
                   else np.full(loss.shape, np.nan))
        meta["history"].append({"epoch": epoch + 1, "loss": loss.tolist(), "val_accuracy": val_acc.tolist(),
                                "train_seconds": round(meta["train_seconds"], 1)})
        checkpoint.save(ckpt, state, meta)
        on_epoch(meta["history"])
        bar.step(f"epoch {epoch + 1:3d}/{cfg.train.epochs}  loss {np.mean(loss):.4f}  "
                 f"val {100 * np.min(val_acc):.2f}{f'-{100 * np.max(val_acc):.2f}' if val_acc.size > 1 else ''}%  "
                 f"({meta['train_seconds']:.0f} s)")
    bar.close()
    return state, meta


def fit(cfg: ml_collections.ConfigDict, ds: Dataset, model: QevoModel, variables: dict, bits: Bits | None,
        workdir: pathlib.Path, key: jax.Array, desc: str, trainer: Trainer | None = None) -> tuple[dict, dict]:
    """Train ``variables`` per ``cfg.train`` (float if ``bits`` is None, else QAT at ``bits``).

    Checkpoints after every epoch in ``workdir/checkpoint.msgpack`` and resumes from it;
    ``workdir/history.csv`` holds one row per epoch (mean training loss, validation
    accuracy, cumulative training seconds).
    Pass the same ``trainer`` to train several bit configurations with one compilation
    (the widths are traced arguments).

    Returns:
      ``(variables, results)``: trained variables and a dict with validation and test
      accuracy (fractions), epochs and training seconds.
    """
    trainer = trainer or Trainer(cfg, ds, model, quantized=bits is not None)
    state, meta = _train_epochs(cfg, ds, trainer, trainer.init_state(variables), bits, key, workdir / CHECKPOINT,
                                desc, {}, lambda history: write_csv(workdir / HISTORY, history, HISTORY_COLUMNS))
    test = batch_eval_set(jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels), cfg.train.eval_batch_size)
    results = {
        "epochs": cfg.train.epochs,
        "val_accuracy": meta["history"][-1]["val_accuracy"] if meta["history"] else None,
        "test_accuracy": float(trainer.accuracy(state.variables, bits, test)),
        "train_seconds": round(meta["train_seconds"], 1),
    }
    return state.variables, results


def fit_population(cfg: ml_collections.ConfigDict, ds: Dataset, variables: dict, bits: Bits,
                   folders: list[pathlib.Path], key: jax.Array, desc: str, trainer: PopulationTrainer,
                   ckpt: pathlib.Path) -> tuple[dict, list[dict]]:
    """QAT of ``P`` models side by side per ``cfg.train``, each from ``variables`` at its own widths.

    Args:
      cfg: the training settings.
      ds: the data.
      variables: the starting variables, shared by every model.
      bits: int32 ``[P, L]`` widths, one row per model.
      folders: ``P`` folders; model ``i``'s ``history.csv`` (as :func:`fit`'s) goes to ``folders[i]``.
      key: PRNG key of the mini-batches, augmentation and dropout (the same for every model).
      desc: the progress bar's label.
      trainer: a :class:`PopulationTrainer` of the model.
      ckpt: the population's checkpoint, written after every epoch; a rerun resumes from it
        when it holds the same models (folder names) and widths.

    Returns:
      ``(variables, results)``: the trained variables stacked ``[P, ...]`` and one results dict
      per model, as :func:`fit`'s.
    """
    w, a = np.asarray(bits.w).tolist(), np.asarray(bits.a).tolist()
    identity = {"models": [f.name for f in folders], "w_bits": w, "a_bits": a}

    def histories(history):
        for i, folder in enumerate(folders):
            rows = [{**r, "loss": r["loss"][i], "val_accuracy": r["val_accuracy"][i]} for r in history]
            write_csv(folder / HISTORY, rows, HISTORY_COLUMNS)

    bits = Bits(w=jnp.asarray(w, jnp.int32), a=jnp.asarray(a, jnp.int32))
    state, meta = _train_epochs(cfg, ds, trainer, trainer.init_state(variables, len(folders)), bits, key, ckpt,
                                desc, identity, histories)
    test = batch_eval_set(jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels), cfg.train.eval_batch_size)
    test_acc = np.asarray(trainer.accuracy(state.variables, bits, test))
    last = meta["history"][-1] if meta["history"] else None
    results = [{"epochs": cfg.train.epochs, "val_accuracy": last["val_accuracy"][i] if last else None,
                "test_accuracy": float(test_acc[i]), "train_seconds": round(meta["train_seconds"], 1)}
               for i in range(len(folders))]
    return state.variables, results
