"""Float training and quantization-aware training: ``python -m qevo.train --config ...``.

One epoch is one compiled call (``lax.scan`` over the shuffled mini-batches of the
device-resident training set). A checkpoint is written atomically after every epoch and
a rerun with the same ``--workdir`` resumes from it. Outputs in the work folder:
``config.json``, ``checkpoint.msgpack`` (latest epoch), ``history.csv`` (per epoch: loss,
validation accuracy, cumulative training seconds), ``model.msgpack`` (final variables),
``results.json`` (validation and test accuracy, wall time).

Every accuracy here (history, results) is the mean of the run's metric over a split: top-1
unless :func:`run` is given a ``metric=`` of the user's (:mod:`qevo.losses`).

With ``train.w_bits``/``train.a_bits`` below 32 the run is QAT: the model starts from the
float run in ``train.init_from``, clip ranges are calibrated, and every quantizable layer
except (by default) the first and last trains through the straight-through estimator.
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
from qevo.calibration import calibrate
from qevo.cost import layer_table
from qevo.data import Dataset, augment, load_dataset, normalize
from qevo.errors import QevoError
from qevo.harness import CHECKPOINT, MODEL, RESULTS, Stopwatch, environment, method, progress, write_csv, write_json
from qevo.interception import QevoModel, QuantizedModel, QuantizedNNX, quantize
from qevo.layers import Bits, QuantOptions, default_conv
from qevo.losses import cross_entropy, resolve_loss_metric, top1, training_loss
from qevo.models import get_model, init_variables
from qevo.population import (
    batch_eval_set,
    batched_accuracy,
    population_map,
    replicated_jit,
    resolve_strategy,
    sgd_or_adam,
)

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


def load_data(cfg: ml_collections.ConfigDict) -> Dataset:
    """The dataset of ``cfg.data``: train optionally cut to its first ``max_train_images``
    (a random sample: the split is in seeded random order), test to a seeded random sample
    of ``max_test_images`` (for quick runs; figures on it are not the test split's)."""
    d = cfg.data
    ds = load_dataset(d.name, d.data_dir, val_size=d.val_size, seed=cfg.seed, image_size=d.image_size,
                      channels=d.channels)
    if d.max_train_images is not None:
        n = d.max_train_images
        ds = dataclasses.replace(ds, train_images=ds.train_images[:n], train_labels=ds.train_labels[:n])
    if d.max_test_images is not None:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(ds.test_labels))[: d.max_test_images])
        ds = dataclasses.replace(ds, test_images=ds.test_images[keep], test_labels=ds.test_labels[keep])
    return ds


def quant_options(cfg: ml_collections.ConfigDict) -> QuantOptions:
    """The quantizer settings of ``cfg.quant`` and the convolution kernels of ``cfg.model``."""
    conv = default_conv(jax.devices()[0].platform) if cfg.model.conv == "auto" else cfg.model.conv
    return QuantOptions(per_channel=cfg.quant.per_channel, mode=cfg.quant.mode, conv=conv,
                        precision=cfg.model.precision)


def build_model(cfg: ml_collections.ConfigDict, num_classes: int, input_shape: tuple[int, ...] | None = None):
    """The model of ``cfg.model`` with the quantizer settings of ``cfg.quant``, its layers
    found on images of ``input_shape`` (HWC; default: the network's usual input)."""
    kwargs = {"activation": cfg.model.activation} if cfg.model.name == "lenet5" else {}
    return get_model(cfg.model.name, num_classes, quant_options(cfg), input_shape, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class Inputs:
    """What a method computes on: the data, the qevo model, (given by the user) its float
    variables, and the loss and metric (:mod:`qevo.losses`, defaults filled in).
    :func:`resolve_inputs` makes it from a config, or from a user's own objects."""

    ds: Dataset
    model: QevoModel
    variables: dict | None
    model_name: str
    loss: Callable = cross_entropy
    metric: Callable = top1


def check_logits(model, input_shape: tuple[int, ...], num_classes: int | None, name: str, classes: bool = True):
    """Refuse, before any training or search, a model that does not map inputs ``[N, *input_shape]``
    to class scores ``[N, num_classes]`` (with ``classes=False``: that fails on them at all).
    Traced abstractly (``jax.eval_shape``: no compilation, no arithmetic), from a traced
    initialization. Returns the output's abstract value for two examples.

    Raises:
      ConfigError: the model fails on such inputs (e.g. images too small for it), or its
        output is not ``[N, num_classes]`` (another width, a feature map, a tuple).
    """
    x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    try:
        template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), input_shape))
        out = jax.eval_shape(lambda v, x: model.apply(v, x, None), template, x)
    except QevoError:
        raise
    except Exception as e:  # the model on the data's shape: say which, keep the cause
        first = str(e).splitlines()[0] if str(e) else ""
        raise config_lib.ConfigError(
            f"the model {name} fails on inputs of shape {tuple(input_shape)} ({type(e).__name__}: {first}); "
            "give it inputs of the size it takes (data.image_size) or a model made for this size") from e
    shape = getattr(out, "shape", None)
    if classes and shape != (2, num_classes):
        got = (f"a {type(out).__name__}" if shape is None else f"shape {shape}" if not shape or shape[0] != 2
               else f"[N, {', '.join(map(str, shape[1:]))}]")
        raise config_lib.ConfigError(
            f"the model {name} outputs {got} for inputs [N, {', '.join(map(str, input_shape))}], but the labels "
            f"need class scores [N, {num_classes}] ({num_classes} classes); end the model in one array of "
            f"{num_classes} outputs per example (pool or flatten, then a last layer of {num_classes})")
    return out


def resolve_inputs(cfg: ml_collections.ConfigDict, model=None, variables: dict | None = None,
                   data: Dataset | None = None, loss: Callable | None = None,
                   metric: Callable | None = None) -> Inputs:
    """The data and model of a run: ``cfg.data`` and ``cfg.model``, or the user's own.

    Args:
      cfg: the method's config.
      model: None (``cfg.model.name``), a ``flax.linen`` module of the user's (quantized
        through :func:`qevo.interception.quantize`), or an already quantized model.
      variables: the user's trained float variables of ``model`` (None: the method trains
        the float model as ``cfg.train`` says).
      data: a :class:`qevo.data.Dataset` (:meth:`~qevo.data.Dataset.from_arrays`); None
        loads ``cfg.data``.
      loss, metric: the user's (:mod:`qevo.losses`; None: cross-entropy and top-1),
        checked on the model's output and the labels of two training examples.

    Raises:
      ConfigError: ``variables`` without ``model``, a model that does not map the data's
        inputs to ``[N, num_classes]`` logits (:func:`check_logits`; any output with a loss
        and metric of the user's), labels that are not classes (``labels="any"``) without a
        model, loss and metric of the user's, or a loss or metric that does not fit the
        model's output and the labels.
    """
    if data is not None and not isinstance(data, Dataset):
        raise config_lib.ConfigError(f"data= must be a qevo Dataset (qevo.Dataset.from_arrays(...)), "
                                     f"got {type(data).__name__}")
    ds = load_data(cfg) if data is None else data
    if ds.num_classes is None and (model is None or loss is None or metric is None):
        raise config_lib.ConfigError(
            "data with labels='any' needs model=, loss= and metric= of yours: qevo's models end in class scores "
            "and its default cross-entropy and top-1 read class labels")
    shape = ds.train_images.shape[1:]
    labels = jax.ShapeDtypeStruct((2, *ds.train_labels.shape[1:]), ds.train_labels.dtype)
    if model is None:
        if variables is not None:
            raise config_lib.ConfigError("variables= belongs to model=; pass both, or neither")
        assert ds.num_classes is not None  # class labels: refused above otherwise
        model = build_model(cfg, ds.num_classes, shape)
        out = check_logits(model, shape, ds.num_classes, cfg.model.name)
        loss, metric = resolve_loss_metric(loss, metric, out, labels)
        return Inputs(ds, model, None, cfg.model.name, loss, metric)
    quantized = model
    if not hasattr(model, "num_layers"):  # not yet a qevo model: a user's network
        sample = normalize(jnp.asarray(ds.train_images[:64]), ds.mean, ds.std)
        quantized = quantize(model, sample, variables, quant_options(cfg))
        if quantized.float_others:
            print("qevo: kept float (not Conv, Dense or DenseGeneral): " + ", ".join(
                f"{path} ({kind})" for path, kind in quantized.float_others), file=sys.stderr, flush=True)
    name = quantized.name if isinstance(quantized, QuantizedModel | QuantizedNNX) else type(quantized).__name__
    out = check_logits(quantized, shape, ds.num_classes, name, classes=loss is None or metric is None)
    loss, metric = resolve_loss_metric(loss, metric, out, labels)
    if variables is not None:  # the collections a qevo model keeps, with fresh clip ranges
        template = jax.eval_shape(lambda: init_variables(quantized, jax.random.key(cfg.seed), shape))
        variables = {**{k: v for k, v in variables.items() if k in template},
                     "quant": {"a_clip": jnp.ones((quantized.num_layers,), jnp.float32)}}
    return Inputs(ds, quantized, variables, name, loss, metric)


def uniform_bits(num_layers: int, w: int, a: int, float_layers: tuple[int, ...] = (0, -1)) -> Bits:
    """int32 ``[L]`` widths ``w``/``a`` on every layer, 32 (float) on the indices ``float_layers``."""
    wb = np.full(num_layers, w, np.int32)
    ab = np.full(num_layers, a, np.int32)
    wb[list(float_layers)] = ab[list(float_layers)] = 32
    return Bits(w=jnp.asarray(wb), a=jnp.asarray(ab))


def float_layers(cfg: ml_collections.ConfigDict, model) -> tuple[int, ...]:
    """The indices of ``model``'s layers that ``cfg.quant.float_layers`` keeps float."""
    return config_lib.float_layers(cfg.quant.float_layers, model.layer_names, [layer.path for layer in model.layers])


def make_optimizer(t: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (momentum, optional Nesterov) or Adam with weight decay and a warm-up + cosine schedule.

    ``t.weight_decay_on`` is ``"all"`` or ``"kernels"`` (:func:`qevo.population.decay_mask`).
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
    top-1), both jit-traceable (:mod:`qevo.losses`): ``accuracy`` is the metric's mean.
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
    by ``strategy`` (:func:`qevo.population.resolve_strategy`, with the multiply-accumulates of
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


@method(config_lib.defaults)
def run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, model=None, data: Dataset | None = None,
        loss: Callable | None = None, metric: Callable | None = None) -> dict:
    """Train per ``cfg`` in ``workdir`` (resuming from its checkpoint); returns the results dict.

    ``model`` and ``data`` (keywords, Python only) replace ``cfg.model`` and ``cfg.data``
    with a user's own Linen network and :class:`qevo.data.Dataset` (:func:`resolve_inputs`).
    ``loss`` (``loss(logits, labels) -> float32 []``, the batch mean; default cross-entropy)
    is what the training minimises and ``metric`` (``metric(logits, labels) -> float32 [N]``
    in [0, 1]; default top-1) what ``val_accuracy`` and ``test_accuracy`` average; both
    jit-traceable (:mod:`qevo.losses`)."""
    watch = Stopwatch()
    with watch.stage("prepare"):
        inputs = resolve_inputs(cfg, model, None, data, loss, metric)
        ds, model = inputs.ds, inputs.model
        quantized = cfg.train.w_bits < 32 or cfg.train.a_bits < 32
        bits = (uniform_bits(model.num_layers, cfg.train.w_bits, cfg.train.a_bits, float_layers(cfg, model))
                if quantized else None)
        init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
        variables = initial_variables(cfg, ds, model, bits, init_key)
        env = environment(model, variables, ds.train_images.shape[1:], cfg.train.batch_size, cfg.model.precision)
    with watch.stage("train"):
        trainer = Trainer(cfg, ds, model, quantized, loss=inputs.loss, metric=inputs.metric)
        variables, fitted = fit(cfg, ds, model, variables, bits, workdir, train_key, f"train {inputs.model_name}",
                                trainer)
    checkpoint.save(workdir / MODEL, variables, {"model": inputs.model_name})
    results = {
        "model": inputs.model_name,
        "dataset": ds.name,
        "w_bits": cfg.train.w_bits,
        "a_bits": cfg.train.a_bits,
        **fitted,
        "seconds": watch.seconds(),
        **env,
    }
    write_json(workdir / RESULTS, results)
    return results


if __name__ == "__main__":
    from qevo.cli import main

    sys.exit(main("qevo.train", run, config_lib.validate))
