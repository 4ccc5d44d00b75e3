"""What a run computes on: its network, data, loss and metric, from its config or given from
Python (:func:`resolve_inputs`: qevo's networks by name, a user's own Flax network, a
:class:`~qevo.data.datasets.Dataset` of their arrays), checked before any work
(:func:`check_logits`); and the uniform widths of a network with its float layers
(:func:`uniform_bits`, :func:`float_layers`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qevo import config as config_lib
from qevo.data.datasets import Dataset, load_dataset, normalize
from qevo.errors import QevoError
from qevo.models.losses import cross_entropy, resolve_loss_metric, top1
from qevo.models.zoo import get_model, init_variables
from qevo.quant.interception import QevoModel, QuantizedModel, QuantizedNNX, quantize
from qevo.quant.layers import Bits, QuantOptions, default_conv


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
    variables, and the loss and metric (:mod:`qevo.models.losses`, defaults filled in).
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
        through :func:`qevo.quant.interception.quantize`), or an already quantized model.
      variables: the user's trained float variables of ``model`` (None: the method trains
        the float model as ``cfg.train`` says).
      data: a :class:`qevo.data.datasets.Dataset` (:meth:`~qevo.data.datasets.Dataset.from_arrays`); None
        loads ``cfg.data``.
      loss, metric: the user's (:mod:`qevo.models.losses`; None: cross-entropy and top-1),
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
