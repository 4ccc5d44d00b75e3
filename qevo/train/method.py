"""Float training and quantization-aware training: ``python -m qevo.train --config ...``.

One epoch is one compiled call (``lax.scan`` over the shuffled mini-batches of the
device-resident training set). A checkpoint is written atomically after every epoch and
a rerun with the same ``--workdir`` resumes from it. Outputs in the work folder:
``config.json``, ``checkpoint.msgpack`` (latest epoch), ``history.csv`` (per epoch: loss,
validation accuracy, cumulative training seconds), ``model.msgpack`` (final variables),
``results.json`` (validation and test accuracy, wall time).

Every accuracy here (history, results) is the mean of the run's metric over a split: top-1
unless :func:`run` is given a ``metric=`` of the user's (:mod:`qevo.models.losses`).

With ``train.w_bits``/``train.a_bits`` below 32 the run is QAT: the model starts from the
float run in ``train.init_from``, clip ranges are calibrated, and every quantizable layer
except (by default) the first and last trains through the straight-through estimator.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from qevo import checkpoint
from qevo import config as config_lib
from qevo.data.datasets import Dataset
from qevo.harness import MODEL, Method, Stopwatch, Stored, environment, load_variables, method
from qevo.models.inputs import float_layers, resolve_inputs, uniform_bits
from qevo.quant.interception import QevoModel
from qevo.quant.layers import Bits
from qevo.quant.quantizers import FLOAT_BITS
from qevo.train.trainer import Trainer, fit, initial_variables


@method("train", config_lib.defaults)
def run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, model=None, data: Dataset | None = None,
        loss: Callable | None = None, metric: Callable | None = None) -> dict:
    """Train per ``cfg`` in ``workdir`` (resuming from its checkpoint); returns the results dict.

    ``model`` and ``data`` (keywords, Python only) replace ``cfg.model`` and ``cfg.data``
    with a user's own Linen network and :class:`qevo.data.datasets.Dataset` (:func:`resolve_inputs`).
    ``loss`` (``loss(logits, labels) -> float32 []``, the batch mean; default cross-entropy)
    is what the training minimises and ``metric`` (``metric(logits, labels) -> float32 [N]``
    in [0, 1]; default top-1) what ``val_accuracy`` and ``test_accuracy`` average; both
    jit-traceable (:mod:`qevo.models.losses`)."""
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
    return results


def models(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> list[str]:
    """A training run's one model."""
    return ["model"]


def load(workdir: pathlib.Path, cfg: ml_collections.ConfigDict, name: str, model: QevoModel, template: dict,
         results: dict) -> Stored:
    """The trained model, at the uniform widths it trained at (``None`` when float)."""
    bits = None
    if cfg.train.w_bits < FLOAT_BITS or cfg.train.a_bits < FLOAT_BITS:
        uniform = uniform_bits(model.num_layers, cfg.train.w_bits, cfg.train.a_bits, float_layers(cfg, model))
        bits = Bits(w=np.asarray(uniform.w), a=np.asarray(uniform.a))
    return Stored(load_variables(workdir / MODEL, template), bits, {}, float(results["test_accuracy"]))


METHOD = Method("train", config_lib.defaults, config_lib.validate, run, models, load)
