"""Any Flax Linen network, unchanged, as a qevo model: its layers found and quantized from outside.

:func:`quantize` traces a user's ``flax.linen`` module once and finds its quantizable
layers: every ``nn.Conv`` (grouped and depthwise included), ``nn.Dense`` and
``nn.DenseGeneral`` it calls, in call order. The :class:`QuantizedModel` it returns has
the interface of qevo's own models (``apply(variables, x, bits, train=...)``, ``init``,
``num_layers``, ``layer_names``), so every engine piece that takes a qevo model (the
population evaluator, training, calibration, the cost table) takes it too.

Nothing in the network is rewritten. While qevo calls it, ``flax.linen.intercept_methods``
catches each found layer's ``__call__``: the layer's input is fake-quantized with that
layer's activation width, and the layer's own operation (``lax.conv_general_dilated`` or
``lax.dot_general``, which Flax lets a module take as a field) is swapped for one that
fake-quantizes the kernel with its weight width before calling it. The bit widths are
traced arrays, so a whole population of bit configurations is one compiled program.
A found 2-D convolution runs through qevo's CPU kernels (:func:`qevo.layers.conv2d`) when
its options ask for them and its geometry allows it.

Modules with parameters that are not such layers (``nn.Embed``, ``nn.ConvTranspose``, a
user's own kernel) stay float; normalization layers are float by design.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qevo import quant
from qevo.errors import ConfigError
from qevo.layers import CALIBRATION_QUANTILE, Bits, QuantOptions, conv2d, layer_key

QUANTIZABLE = (nn.Conv, nn.Dense, nn.DenseGeneral)
NORMALIZATION = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
NHWC = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One quantizable layer of a network, as the discovery trace saw it.

    Attributes:
      path: the module's path, ``"/"``-joined (``params[path...]["kernel"]`` is its kernel).
      kind: ``"conv"`` or ``"dense"``.
      kernel_shape: the kernel's shape (``HWIO`` for a 2-D convolution, ``[in, out]`` dense).
      groups: feature groups of a convolution (its input channels when depthwise); 1 for dense.
      macs: multiply-accumulates per example, summed over every call of the module.
      weights: the kernel's element count.
      signed: its input took negative values in the discovery trace (no ReLU before it), so
        activations quantize to symmetric levels.
    """

    path: str
    kind: str
    kernel_shape: tuple[int, ...]
    groups: int
    macs: int
    weights: int
    signed: bool


def _takes(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(type(module).__call__).parameters


def _path(module: nn.Module) -> str:
    return "/".join(module.path)


def _dot_macs(lhs, out, dimension_numbers) -> int:
    (contracting, _), _ = dimension_numbers
    return int(np.prod(out.shape[1:], dtype=np.int64) * np.prod([lhs.shape[d] for d in contracting], dtype=np.int64))


def _conv_macs(rhs, out, dimension_numbers) -> int:
    rhs_spec = jax.lax.conv_dimension_numbers((1,) * rhs.ndim, rhs.shape, dimension_numbers).rhs_spec
    per_output = rhs.size // rhs.shape[rhs_spec[0]]
    return int(np.prod(out.shape[1:], dtype=np.int64) * per_output)


def _nhwc(lhs, rhs, dimension_numbers) -> bool:
    """Whether a 2-D convolution's dimension numbers are NHWC images and HWIO kernels."""
    given = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return given == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)


class _Scope:
    """One traced call of a network: what its found layers quantize to, and what they record.

    ``index`` maps the known layer paths to their positions (None: discovery, where every
    quantizable layer records and none quantizes); ``bits`` None keeps them float. Records:
    per path the layer's inputs and operations ``(kind, kernel shape, MACs per example,
    groups)``, and every called module's type."""

    def __init__(self, index: dict[str, int] | None = None, bits: Bits | None = None, a_clip=None,
                 options: QuantOptions = QuantOptions(), signed: tuple[bool, ...] = ()):
        self.index, self.bits, self.a_clip, self.options, self.signed = index, bits, a_clip, options, signed
        self.inputs: dict[str, list] = {}
        self.ops: dict[str, list] = {}
        self.modules: dict[str, type] = {}

    def takes(self, path: str) -> bool:
        return self.index is None or path in self.index

    def operands(self, path: str, lhs, rhs):
        """Record a layer's input; return its input and kernel fake-quantized at its widths."""
        self.inputs.setdefault(path, []).append(lhs)
        if self.bits is None:
            return lhs, rhs
        i, o = self.index[path], self.options
        lhs = quant.quantize_activation(lhs, self.bits.a[i], self.a_clip[i], signed=self.signed[i], mode=o.mode)
        return lhs, quant.quantize_weight(rhs, self.bits.w[i], per_channel=o.per_channel, mode=o.mode)

    def record(self, path: str, kind: str, rhs, macs: int, groups: int) -> None:
        self.ops.setdefault(path, []).append((kind, tuple(rhs.shape), macs, groups))


_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("qevo_interception_scope", default=None)


def _conv_op(path: str, original):
    """A ``lax.conv_general_dilated`` for layer ``path``: inside a scope its input and kernel
    are fake-quantized first, and 2-D NHWC/HWIO convolutions without dilation take
    :func:`qevo.layers.conv2d` (qevo's CPU kernels); outside one it is ``original``."""

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None, **kwargs):
        scope = _SCOPE.get()
        if scope is None or not scope.takes(path):
            return original(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                            batch_group_count=batch_group_count, precision=precision,
                            preferred_element_type=preferred_element_type, **kwargs)
        lhs, rhs = scope.operands(path, lhs, rhs)
        plain = (lhs.ndim == 4 and _nhwc(lhs, rhs, dimension_numbers) and len(set(window_strides)) == 1
                 and isinstance(padding, str) and padding in ("SAME", "VALID") and batch_group_count == 1
                 and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
                 and all(v is None for v in kwargs.values()))
        if plain and preferred_element_type is None and lhs.dtype == rhs.dtype == jnp.float32:
            out = conv2d(lhs, rhs, window_strides[0], padding, feature_group_count, scope.options.conv)
        else:
            out = original(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                           dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                           batch_group_count=batch_group_count, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
        scope.record(path, "conv", rhs, _conv_macs(rhs, out, dimension_numbers or NHWC), feature_group_count)
        return out

    return conv


def _dot_op(path: str, original):
    """A ``lax.dot_general`` for layer ``path``: inside a scope its left operand (the input)
    and right operand (the kernel) are fake-quantized first; outside one it is ``original``."""

    def dot(lhs, rhs, dimension_numbers, *args, **kwargs):
        scope = _SCOPE.get()
        if scope is None or not scope.takes(path):
            return original(lhs, rhs, dimension_numbers, *args, **kwargs)
        lhs, rhs = scope.operands(path, lhs, rhs)
        out = original(lhs, rhs, dimension_numbers, *args, **kwargs)
        scope.record(path, "dense", rhs, _dot_macs(lhs, out, dimension_numbers), 1)
        return out

    return dot


@contextlib.contextmanager
def _active(scope: _Scope):
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def _linen_interceptor(scope: _Scope):
    """``intercept_methods`` function: each found Linen layer's ``__call__`` runs with its
    operation field swapped for :func:`_conv_op` / :func:`_dot_op`."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        path = _path(module)
        scope.modules.setdefault(path, type(module))
        if context.method_name != "__call__" or not isinstance(module, QUANTIZABLE) or not scope.takes(path):
            return next_fun(*args, **kwargs)
        field = "conv_general_dilated" if isinstance(module, nn.Conv) else "dot_general"
        saved = getattr(module, field), getattr(module, f"{field}_cls")
        original = saved[1]() if saved[1] is not None else saved[0] or getattr(jax.lax, field)
        object.__setattr__(module, field, (_conv_op if field == "conv_general_dilated" else _dot_op)(path, original))
        object.__setattr__(module, f"{field}_cls", None)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, field, saved[0])
            object.__setattr__(module, f"{field}_cls", saved[1])

    return intercept


def _split(mutable) -> tuple[list[str], list[str]]:
    """``(the network's own mutable collections, the reported ones)`` of an ``apply``'s ``mutable``."""
    wanted = [mutable] if isinstance(mutable, str) else list(mutable or [])
    reported = [c for c in wanted if c in ("calibration", "layer_stats")]
    return [c for c in wanted if c not in reported], reported


def _report(layers: tuple[Layer, ...], scope: _Scope, reported: list[str]) -> dict:
    """The ``"calibration"`` and ``"layer_stats"`` collections of one call, by ``layer_<index>``."""
    state = {}
    if "calibration" in reported:
        state["calibration"] = {
            layer_key(i): tuple(jnp.quantile(jnp.abs(v), CALIBRATION_QUANTILE) for v in scope.inputs[layer.path])
            for i, layer in enumerate(layers)}
    if "layer_stats" in reported:
        state["layer_stats"] = {layer_key(i): jnp.array([layer.macs, layer.weights], jnp.int32)
                                for i, layer in enumerate(layers)}
    return state


def _scope_of(layers: tuple[Layer, ...], variables: dict, bits: Bits | None, options: QuantOptions) -> _Scope:
    index = {layer.path: i for i, layer in enumerate(layers)}
    a_clip = variables["quant"]["a_clip"] if bits is not None else None
    return _Scope(index, bits, a_clip, options, tuple(layer.signed for layer in layers))


class _Protocol:
    """qevo's model interface over a found set of layers (``layers``, ``options``)."""

    layers: tuple[Layer, ...]
    options: QuantOptions

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    def clone(self, **updates):
        """A copy with ``updates`` (``options=...``) replaced."""
        return dataclasses.replace(self, **updates)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel(_Protocol):
    """A Flax Linen network with qevo's model interface (made by :func:`quantize`).

    ``apply(variables, x, bits, train=False, mutable=False, rngs=None)`` runs the network
    with its found layers fake-quantized to ``bits`` (:class:`qevo.layers.Bits`, int32
    ``[L]`` each; None: float). ``variables`` are the network's own collections plus
    ``quant`` (``{"a_clip": float32 [L]}``, the activation clip ranges,
    :func:`qevo.calibration.calibrate`). Two collections a qevo model reports are computed
    here rather than stored: ``"calibration"`` (the 99.99th percentile of each layer's
    ``|input|``) and ``"layer_stats"`` (``[MACs per example, weights]`` per layer), under
    ``layer_<index>`` keys, when they are listed in ``mutable``.

    Attributes:
      model: the user's module, unchanged.
      layers: the found layers, in call order (:class:`Layer`).
      options: quantizer settings (``per_channel``, ``mode``) and the convolution kernels.
      float_others: the modules with parameters that stay float, ``(path, type name)``.
    """

    model: nn.Module
    layers: tuple[Layer, ...]
    options: QuantOptions = QuantOptions()
    float_others: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """The network's class name."""
        return type(self.model).__name__

    def apply(self, variables: dict, x, bits: Bits | None = None, train: bool = False, mutable=False,
              rngs=None):
        """Logits (and the updated collections when ``mutable`` lists any), as ``nn.Module.apply``."""
        own, reported = _split(mutable)
        scope = _scope_of(self.layers, variables, bits, self.options)
        kwargs = {"train": train} if _takes(self.model, "train") else {}
        with _active(scope), nn.intercept_methods(_linen_interceptor(scope)):
            out = self.model.apply({k: v for k, v in variables.items() if k != "quant"}, x, **kwargs,
                                   mutable=own or False, rngs=rngs)
        if not own and not reported:
            return out
        y, state = out if own else (out, {})
        return y, {**state, **_report(self.layers, scope, reported)}

    def init(self, key: jax.Array, x, bits: Bits | None = None, train: bool = False) -> dict:
        """The network's variables for inputs like ``x``, plus ``quant/a_clip`` (ones, ``[L]``)."""
        params_key, dropout_key = jax.random.split(key)
        kwargs = {"train": train} if _takes(self.model, "train") else {}
        variables = self.model.init({"params": params_key, "dropout": dropout_key}, x, **kwargs)
        return {**variables, "quant": {"a_clip": jnp.ones((self.num_layers,), jnp.float32)}}


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedNNX(_Protocol):
    """A Flax NNX network with qevo's model interface (made by :func:`quantize`).

    As :class:`QuantizedModel`, over the pure-dict state of a clone of the network:
    ``variables`` holds ``"params"`` (its ``nnx.Param`` state), ``"batch_stats"`` (its
    ``nnx.BatchStat`` state, if any) and ``quant``. Each call merges them into the clone's
    graph, switches it to ``train()`` or ``eval()``, reseeds its ``dropout`` stream from
    ``rngs`` and calls it as ``model(x)``. Its found layers (``nnx.Conv``, ``nnx.Linear``,
    ``nnx.LinearGeneral``) hold qevo's operations in their ``conv_general_dilated`` /
    ``dot_general`` attributes; outside qevo's calls these are the original operations.

    ``init`` returns the state the network was built with (NNX initializes at construction);
    ``name`` is the network's class name.
    """

    graphdef: object
    states: tuple
    layers: tuple[Layer, ...]
    options: QuantOptions = QuantOptions()
    float_others: tuple[tuple[str, str], ...] = ()
    name: str = ""

    def _merged(self, variables: dict):
        from flax import nnx

        params, batch_stats, rest = (jax.tree.map(lambda v: v, state) for state in self.states)
        nnx.replace_by_pure_dict(params, variables["params"])
        if variables.get("batch_stats"):
            nnx.replace_by_pure_dict(batch_stats, variables["batch_stats"])
        return nnx.merge(self.graphdef, params, batch_stats, rest)

    def apply(self, variables: dict, x, bits: Bits | None = None, train: bool = False, mutable=False,
              rngs=None):
        """Logits (and the updated collections when ``mutable`` lists any), as ``nn.Module.apply``."""
        from flax import nnx

        own, reported = _split(mutable)
        model = self._merged(variables)
        model.train() if train else model.eval()
        if rngs and "dropout" in rngs:
            nnx.reseed(model, dropout=rngs["dropout"])
        scope = _scope_of(self.layers, variables, bits, self.options)
        with _active(scope):
            y = model(x)
        if not own and not reported:
            return y
        state = {"batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))} if "batch_stats" in own else {}
        return y, {**state, **_report(self.layers, scope, reported)}

    def init(self, key: jax.Array, x, bits: Bits | None = None, train: bool = False) -> dict:
        """The network's state as built (``key`` and ``x`` unused), plus ``quant/a_clip`` (ones)."""
        from flax import nnx

        params, batch_stats, _ = self.states
        pure = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}
        return {**{k: v for k, v in pure.items() if v},
                "quant": {"a_clip": jnp.ones((self.num_layers,), jnp.float32)}}


def _found(scope: _Scope, params: dict, normalization: tuple[type, ...] = NORMALIZATION
           ) -> tuple[tuple[Layer, ...], tuple[tuple[str, str], ...]]:
    """The layers a discovery scope recorded, and the other parameter owners that stay float
    (except ``normalization`` layers, float by design)."""
    layers = tuple(
        Layer(path=path, kind=ops[0][0], kernel_shape=ops[0][1], groups=ops[0][3],
              macs=sum(op[2] for op in ops), weights=int(np.prod(ops[0][1])),
              signed=any(bool(jnp.any(x < 0)) for x in scope.inputs[path]))
        for path, ops in scope.ops.items())
    owners = {path.rpartition("/")[0] for path in traverse_util.flatten_dict(params, sep="/")}
    others = tuple((path, scope.modules[path].__name__ if path in scope.modules else "?")
                   for path in sorted(owners - set(scope.ops))
                   if not (path in scope.modules and issubclass(scope.modules[path], normalization)))
    return layers, others


def _discover(run, name: str, sample) -> _Scope:
    """Run ``run(scope)`` once as discovery; a network that fails on ``sample`` is a ConfigError."""
    scope = _Scope()
    try:
        with _active(scope):
            run(scope)
    except ConfigError:
        raise
    except Exception as e:  # the user's network on the user's sample: say which, keep the cause
        raise ConfigError(f"the model failed on a sample of shape {tuple(sample.shape)}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; give it inputs of "
                          "the shape it takes") from e
    if not scope.ops:
        raise ConfigError(f"{name} has no quantizable layer (flax Conv, Dense/Linear or DenseGeneral/LinearGeneral); "
                          "qevo quantizes only those: build its kernels with them (parameters of its own stay float)")
    return scope


def quantize(model, sample: jax.Array | np.ndarray, variables: dict | None = None,
             options: QuantOptions = QuantOptions(), key: jax.Array | None = None):
    """Find the quantizable layers of a Flax network by tracing it once on ``sample``.

    Args:
      model: a ``flax.linen`` module, called as ``model.apply(variables, x)`` (with
        ``train=`` when its ``__call__`` takes it), or a ``flax.nnx`` module, called as
        ``model(x)`` (a clone is quantized; the network itself stays as it is).
      sample: a few inputs ``[N, ...]`` as the network takes them (normalized); their
        signs decide which layers take signed activations.
      variables: the Linen network's variables; None initializes them from ``key``.
      options: quantizer settings and convolution kernels (:class:`qevo.layers.QuantOptions`).
      key: the initialization key when ``variables`` is None (default ``key(0)``).

    Returns:
      a :class:`QuantizedModel` (Linen) or :class:`QuantizedNNX` (NNX).

    Raises:
      ConfigError: ``model`` is no Flax module, fails on ``sample``, or has no quantizable layer.
    """
    from flax import nnx

    sample = jnp.asarray(sample)
    if isinstance(model, nnx.Module):
        return _quantize_nnx(model, sample, options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}")
    kwargs = {"train": False} if _takes(model, "train") else {}
    found = {}

    def run(scope):
        found["variables"] = variables if variables is not None else model.init(
            jax.random.key(0) if key is None else key, sample, **kwargs)
        with nn.intercept_methods(_linen_interceptor(scope)):
            model.apply(found["variables"], sample, **kwargs)

    scope = _discover(run, type(model).__name__, sample)
    layers, others = _found(scope, found["variables"].get("params", {}))
    return QuantizedModel(model=model, layers=layers, options=options, float_others=others)


NNX_QUANTIZABLE = ("Conv", "Linear", "LinearGeneral")
NNX_NORMALIZATION = ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm")


def _quantize_nnx(model, sample, options: QuantOptions) -> QuantizedNNX:
    from flax import nnx

    clone = nnx.clone(model)
    types = {}
    for path, module in nnx.iter_modules(clone):
        name = "/".join(map(str, path))
        types[name] = type(module)
        if isinstance(module, tuple(getattr(nnx, t) for t in NNX_QUANTIZABLE)):
            conv = isinstance(module, nnx.Conv)
            field = "conv_general_dilated" if conv else "dot_general"
            setattr(module, field, (_conv_op if conv else _dot_op)(name, getattr(module, field)))

    def run(scope):
        clone.eval()
        scope.modules.update(types)
        clone(sample)

    scope = _discover(run, type(model).__name__, sample)
    graphdef, params, batch_stats, rest = nnx.split(clone, nnx.Param, nnx.BatchStat, ...)
    layers, others = _found(scope, nnx.to_pure_dict(params), tuple(getattr(nnx, t) for t in NNX_NORMALIZATION))
    return QuantizedNNX(graphdef=graphdef, states=(params, batch_stats, rest), layers=layers, options=options,
                        float_others=others, name=type(model).__name__)
