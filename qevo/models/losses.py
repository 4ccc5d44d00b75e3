"""What a network is trained for and scored by: a loss and a metric.

Every method takes both from Python (``qevo.train.method.run``, ``qevo.search.method.run``,
``qevo.sharing.method.run``, ``qevo.coevolve.method.run``: keywords ``loss=`` and ``metric=``; None is the
default), and so do the engine's evaluators and trainers:

* ``loss(logits, labels) -> float32 []``: the mean over the batch of a per-example loss,
  differentiable in ``logits``. Float training, the search's per-individual QAT, its final
  training and the QAT baseline minimise it; the coevolution ranks its samples by it.
  Default :func:`cross_entropy` (with ``train.label_smoothing`` in training).
* ``metric(logits, labels) -> float32 [N]``: a per-example score in [0, 1], higher is better.
  A split's score is its sum over the split's examples divided by their number (padding
  excluded); every "accuracy" of qevo's results (``val_accuracy``, ``test_accuracy``, the
  sharing's accuracy floor) is that mean, and the search's ``error`` objective is ``1 - mean``.
  Default :func:`top1`.

``logits`` is the model's output ``[N, ...]`` (float32) for a batch of ``N`` examples and
``labels`` the dataset's labels of those examples ``[N, ...]``: int32 class indices ``[N]``
by default, any numeric shape with :meth:`qevo.data.datasets.Dataset.from_arrays` ``labels="any"``
(e.g. float32 ``[N, K]`` for a multi-label head).

Both run inside compiled programs (``jax.jit``, ``jax.vmap`` over a population,
``lax.scan`` over batches): they must be jit-traceable, i.e. jax.numpy operations on the
arrays they get, no Python branching on array values and no conversion to numpy.
:func:`resolve_loss_metric` checks them once on abstract arrays before a run starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from qevo.errors import ConfigError


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy, float32 ``[]``, of ``logits [N, C]`` against int ``labels [N]``.

    With ``smoothing`` > 0 the target is the one-hot label mixed with the uniform
    distribution: ``(1 - smoothing) * onehot + smoothing / C``.
    """
    if smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def top1(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """float32 ``[N]``: 1 where the largest of ``logits [N, C]`` is at the int label ``labels [N]``, else 0."""
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def training_loss(loss: Callable, smoothing: float) -> Callable:
    """The loss a trainer minimises: :func:`cross_entropy` with label smoothing ``smoothing``
    (``train.label_smoothing``), or a user's ``loss`` as it is.

    Raises:
      ConfigError: a user's loss with ``smoothing`` > 0 (qevo cannot smooth labels it does not know).
    """
    if loss is cross_entropy:
        return functools.partial(cross_entropy, smoothing=smoothing) if smoothing else cross_entropy
    if smoothing:
        raise ConfigError(f"train.label_smoothing={smoothing} smooths the default cross-entropy only; set it to 0 "
                          "and smooth the labels inside your loss=")
    return loss


def resolve_loss_metric(loss: Callable | None = None, metric: Callable | None = None, logits=None,
            labels=None) -> tuple[Callable, Callable]:
    """``(loss, metric)`` with the defaults for None, checked.

    Args:
      loss: a user's loss (module docstring), or None.
      metric: a user's metric (module docstring), or None.
      logits (jax.Array | jax.ShapeDtypeStruct | None): the model's output on one batch (an
        array or its shape); when given with ``labels``, both functions are traced on them (no
        computation) and must give a float scalar and a ``[N]`` score.
      labels (jax.Array | jax.ShapeDtypeStruct | None): the dataset's labels of that batch.

    Raises:
      ConfigError: something that is not a function, a function that fails on the batch
        (not traceable, or not for these shapes) or gives the wrong shape.
    """
    loss = cross_entropy if loss is None else loss
    metric = top1 if metric is None else metric
    for name, f, want in (("loss", loss, "loss(logits, labels) -> float32 []"),
                          ("metric", metric, "metric(logits, labels) -> float32 [N]")):
        if not callable(f):
            raise ConfigError(f"{name}= must be a function {want}, got {type(f).__name__}")
        if logits is None or labels is None:
            continue
        shapes = f"logits {tuple(logits.shape)} {logits.dtype} and labels {tuple(labels.shape)} {labels.dtype}"
        try:
            out = jax.eval_shape(f, logits, labels)
        except Exception as e:  # a user's function: any failure is theirs to fix
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(f"{name}= fails on {shapes} ({type(e).__name__}: {detail}); it must be a "
                              f"jit-traceable {want}") from e
        n = logits.shape[0]
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise ConfigError(f"{name}= gives a {type(out).__name__} on {shapes}; it must be {want} (here N = {n})")
        good = (out.shape == () and jnp.issubdtype(out.dtype, jnp.floating) if name == "loss"
                else out.shape == (n,) and (jnp.issubdtype(out.dtype, jnp.number) or out.dtype == jnp.bool_))
        if not good:
            got = f"{tuple(out.shape)} {out.dtype}"
            raise ConfigError(f"{name}= gives {got} on {shapes}; it must be {want} (here N = {n})")
    return loss, metric
