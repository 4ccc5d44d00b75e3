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
A found 2-D convolution runs through qevo's CPU kernels (:func:`qevo.quant.layers.conv2d`) when
its options ask for them and its geometry allows it.

Modules with parameters that are not such layers (``nn.Embed``, ``nn.ConvTranspose``, a
user's own kernel) stay float; normalization layers are float by design.

qevo's own networks (:mod:`qevo.models.networks`) take this same path: nothing else in qevo
quantizes a layer. Whatever else must act on a found layer's operation (the integer forward
pass of :mod:`qevo.quant.intforward`, the ONNX trace of :mod:`qevo.export.onnxgraph`) does so through an
``override`` of ``apply``, which sees each call of the operation as a :class:`Call`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, overload

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qevo.errors import ConfigError
from qevo.quant import quantizers
from qevo.quant.layers import CALIBRATION_QUANTILE, BatchNorm, Bits, QuantOptions, conv2d, layer_key

if TYPE_CHECKING:
    from flax import nnx

QUANTIZABLE = (nn.Conv, nn.Dense, nn.DenseGeneral)
NORMALIZATION = (nn.BatchNorm, BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
NHWC = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One quantizable layer of a network, as the discovery trace saw it.

    Attributes:
      path: the module's path, ``"/"``-joined (``params[path...]["kernel"]`` is its kernel).
      kind: ``"conv"`` or ``"dense"``.
      kernel_shape: the kernel's shape (``HWIO`` for a 2-D convolution, ``[in, out]`` dense).
      groups: feature groups of a convolution (its input channels when depthwise); 1 for dense.
      macs: multiply-accumulates per example, summed over every call of the module and of
        the modules in ``shared``.
      weights: the element count of the kernel and of those in ``shared``.
      signed: its input took negative values in the discovery trace (no ReLU before it), so
        activations quantize to symmetric levels.
      shared: paths of other modules that take this layer's widths and clip range (a
        ResNet's projection shortcut beside its block's first convolution).
      name: how reports name the layer (its path unless :func:`quantize` was given names).
    """

    path: str
    kind: str
    kernel_shape: tuple[int, ...]
    groups: int
    macs: int
    weights: int
    signed: bool
    shared: tuple[str, ...] = ()
    name: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        """The layer's own path and those of ``shared``."""
        return (self.path, *self.shared)


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


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of a found layer's operation, as an ``override`` of ``apply`` sees it.

    Attributes:
      path: the calling module's path.
      index: its layer's position ``i`` in the model's layers.
      kind: ``"conv"`` or ``"dense"``.
      lhs: the layer's float input, not quantized.
      rhs: its float kernel, not quantized.
      params: the operation's other arguments (``window_strides``, ``padding``,
        ``dimension_numbers``, ``feature_group_count``, ... for a convolution;
        ``dimension_numbers`` for a dense layer).
      plain: a 2-D NHWC/HWIO convolution with square strides, ``"SAME"``/``"VALID"`` padding
        and no dilation (``params``'s ``window_strides[0]``, ``padding`` and
        ``feature_group_count`` describe it), or a dense ``[..., in] @ [in, out]``.
      bits: the call's widths (None: float).
      a_clip: float32 ``[L]`` activation clip ranges (None when ``bits`` is None).
      signed: the layer takes signed activations.
      options: the model's quantizer settings.
      compute: ``compute(lhs, rhs)``: the operation itself on any operands (float, in the
        kernels ``options`` ask for).
    """

    path: str
    index: int
    kind: str
    lhs: jax.Array
    rhs: jax.Array
    params: dict
    plain: bool
    bits: Bits | None
    a_clip: jax.Array | None
    signed: bool
    options: QuantOptions
    compute: Callable[..., jax.Array]


class _Scope:
    """One traced call of a network: what its found layers quantize to, and what they record.

    ``index`` maps the known layer paths to their positions (None: discovery, where every
    quantizable layer records and none quantizes); ``bits`` None keeps them float;
    ``override(call)`` may replace a found layer's operation (None: it runs as usual).
    Records: per path the layer's inputs and operations ``(kind, kernel shape, MACs per
    example, groups)``, and every called module's type."""

    def __init__(self, index: dict[str, int] | None = None, bits: Bits | None = None, a_clip: jax.Array | None = None,
                 options: QuantOptions = QuantOptions(), signed: tuple[bool, ...] = (), override=None):
        self.index, self.bits, self.a_clip, self.options, self.signed = index, bits, a_clip, options, signed
        self.override = override
        self.inputs: dict[str, list] = {}
        self.ops: dict[str, list] = {}
        self.modules: dict[str, type] = {}

    def takes(self, path: str) -> bool:
        return self.index is None or path in self.index

    def run(self, path: str, kind: str, lhs, rhs, params: dict, plain: bool, compute):
        """A found layer's operation on ``lhs`` and ``rhs``: overridden, or on its input and
        kernel fake-quantized at its widths; the input and the operation are recorded."""
        self.inputs.setdefault(path, []).append(lhs)
        out = None
        if self.override is not None and self.index is not None:
            i = self.index[path]
            out = self.override(Call(path, i, kind, lhs, rhs, params, plain, self.bits, self.a_clip,
                                     self.signed[i], self.options, compute))
        if out is None:
            if self.index is None or self.bits is None or self.a_clip is None:  # discovery, or float
                out = compute(lhs, rhs)
            else:
                i, o = self.index[path], self.options
                x = quantizers.quantize_activation(lhs, self.bits.a[i], self.a_clip[i], signed=self.signed[i],
                                                   mode=o.mode)
                w = quantizers.quantize_weight(rhs, self.bits.w[i], per_channel=o.per_channel, mode=o.mode)
                out = compute(x, w)
        macs = (_conv_macs(rhs, out, params["dimension_numbers"] or NHWC) if kind == "conv"
                else _dot_macs(lhs, out, params["dimension_numbers"]))
        self.ops.setdefault(path, []).append((kind, tuple(rhs.shape), macs, params.get("feature_group_count", 1)))
        return out


_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("qevo_interception_scope", default=None)


def _plain_conv(lhs, rhs, params: dict) -> bool:
    """Whether a convolution is 2-D NHWC/HWIO with square strides, ``"SAME"``/``"VALID"``
    padding, no dilation and no other option (what qevo's CPU kernels and integer layers take)."""
    return (lhs.ndim == 4 and _nhwc(lhs, rhs, params["dimension_numbers"]) and len(set(params["window_strides"])) == 1
            and isinstance(params["padding"], str) and params["padding"] in ("SAME", "VALID")
            and params["batch_group_count"] == 1 and params["precision"] is None
            and params["preferred_element_type"] is None
            and all(d == 1 for d in (*(params["lhs_dilation"] or ()), *(params["rhs_dilation"] or ())))
            and all(v is None for k, v in params.items() if k not in _CONV_ARGS))


_CONV_ARGS = ("window_strides", "padding", "lhs_dilation", "rhs_dilation", "dimension_numbers", "feature_group_count",
              "batch_group_count", "precision", "preferred_element_type")


def _conv_op(path: str, original):
    """A ``lax.conv_general_dilated`` for layer ``path``: inside a scope it runs as
    :meth:`_Scope.run` says (fake-quantized, or overridden), 2-D NHWC/HWIO convolutions
    without dilation through :func:`qevo.quant.layers.conv2d` (qevo's CPU kernels, the float
    network in ``options.precision``); outside one it is ``original``."""

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None, **kwargs):
        params = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                      precision=precision, preferred_element_type=preferred_element_type, **kwargs)
        scope = _SCOPE.get()
        if scope is None or not scope.takes(path):
            return original(lhs, rhs, **params)
        plain = _plain_conv(lhs, rhs, params)

        def compute(x, k):
            if plain and x.dtype == k.dtype == jnp.float32:
                precision = scope.options.precision if scope.bits is None else "float32"
                return conv2d(x, k, window_strides[0], padding, feature_group_count, scope.options.conv, precision)
            return original(x, k, **params)

        return scope.run(path, "conv", lhs, rhs, params, plain, compute)

    return conv


def _dot_op(path: str, original):
    """A ``lax.dot_general`` for layer ``path``: inside a scope it runs as
    :meth:`_Scope.run` says (fake-quantized, or overridden); outside one it is ``original``."""

    def dot(lhs, rhs, dimension_numbers, *args, **kwargs):
        scope = _SCOPE.get()
        if scope is None or not scope.takes(path):
            return original(lhs, rhs, dimension_numbers, *args, **kwargs)
        plain = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2 and not args and all(
            v is None for v in kwargs.values())
        return scope.run(path, "dense", lhs, rhs, {"dimension_numbers": dimension_numbers, **kwargs}, plain,
                         lambda x, k: original(x, k, dimension_numbers, *args, **kwargs))

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
    operation field swapped for :func:`_conv_op` / :func:`_dot_op`; with
    ``options.batch_axis``, each normalization layer that has an ``axis_name`` reduces over it."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        path = _path(module)
        scope.modules.setdefault(path, type(module))
        axis = scope.options.batch_axis
        if context.method_name == "__call__" and axis is not None and isinstance(module, NORMALIZATION) \
                and getattr(module, "axis_name", axis) is None:
            object.__setattr__(module, "axis_name", axis)
            try:
                return next_fun(*args, **kwargs)
            finally:
                object.__setattr__(module, "axis_name", None)
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
            layer_key(i): tuple(jnp.quantile(jnp.abs(v), CALIBRATION_QUANTILE)
                                for path in layer.paths for v in scope.inputs.get(path, []))
            for i, layer in enumerate(layers)}
    if "layer_stats" in reported:
        state["layer_stats"] = {
            layer_key(i): jnp.array([sum(op[2] for path in layer.paths for op in scope.ops.get(path, [])),
                                     layer.weights], jnp.int32)
            for i, layer in enumerate(layers)}
    return state


def _scope_of(layers: tuple[Layer, ...], variables: dict, bits: Bits | None, options: QuantOptions,
              override=None) -> _Scope:
    index = {path: i for i, layer in enumerate(layers) for path in layer.paths}
    a_clip = variables["quant"]["a_clip"] if bits is not None else None
    return _Scope(index, bits, a_clip, options, tuple(layer.signed for layer in layers), override)


class _Protocol:
    """qevo's model interface over a found set of layers (``layers``, ``options``)."""

    layers: tuple[Layer, ...]
    options: QuantOptions
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # each model is a dataclass

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name or layer.path for layer in self.layers)

    def clone(self, **updates):
        """A copy with ``updates`` (``options=...``) replaced."""
        return dataclasses.replace(self, **updates)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel(_Protocol):
    """A Flax Linen network with qevo's model interface (made by :func:`quantize`).

    ``apply(variables, x, bits, train=False, mutable=False, rngs=None)`` runs the network
    with its found layers fake-quantized to ``bits`` (:class:`qevo.quant.layers.Bits`, int32
    ``[L]`` each; None: float). ``variables`` are the network's own collections plus
    ``quant`` (``{"a_clip": float32 [L]}``, the activation clip ranges,
    :func:`qevo.quant.calibration.calibrate`). Two collections a qevo model reports are computed
    here rather than stored: ``"calibration"`` (the 99.99th percentile of each layer's
    ``|input|``) and ``"layer_stats"`` (``[MACs per example of this call's inputs, weights]``
    per layer), under
    ``layer_<index>`` keys, when they are listed in ``mutable``.

    Attributes:
      model: the user's module, unchanged.
      layers: the found layers, in call order (:class:`Layer`).
      options: quantizer settings (``per_channel``, ``mode``) and the convolution kernels.
      float_others: the modules with parameters that stay float, ``(path, type name)``.
      paths: the found layers' module paths (with their shared ones) in call order.
    """

    model: nn.Module
    layers: tuple[Layer, ...]
    options: QuantOptions = QuantOptions()
    float_others: tuple[tuple[str, str], ...] = ()
    paths: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The network's class name."""
        return type(self.model).__name__

    def apply(self, variables: dict, x, bits: Bits | None = None, train: bool = False,
              mutable: bool | str | list[str] = False, rngs: dict | None = None, override=None):
        """Logits (and the updated collections when ``mutable`` lists any), as
        ``nn.Module.apply``; ``override(call: Call)`` may return a found layer's output in
        place of its (fake-quantized) operation, or None to leave it."""
        own, reported = _split(mutable)
        scope = _scope_of(self.layers, variables, bits, self.options, override)
        kwargs: dict[str, Any] = {"train": train} if _takes(self.model, "train") else {}
        with _active(scope), nn.intercept_methods(_linen_interceptor(scope)):
            out = self.model.apply({k: v for k, v in variables.items() if k != "quant"}, x, **kwargs,
                                   mutable=own or False, rngs=rngs)
        if not own and not reported:
            return out
        y, state = out if own else (out, {})
        return y, {**state, **_report(self.layers, scope, reported)}

    def init(self, key: jax.Array, x, bits: Bits | None = None, train: bool = False) -> dict:
        """The network's variables for inputs like ``x``, plus ``quant/a_clip`` (ones, ``[L]``):
        ``key`` is the ``params`` stream (as ``nn.Module.init(key, ...)`` takes it), a key
        folded from it the ``dropout`` stream."""
        kwargs: dict[str, Any] = {"train": train} if _takes(self.model, "train") else {}
        variables = self.model.init({"params": key, "dropout": jax.random.fold_in(key, 1)}, x, **kwargs)
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

    graphdef: nnx.GraphDef
    states: tuple
    layers: tuple[Layer, ...]
    options: QuantOptions = QuantOptions()
    float_others: tuple[tuple[str, str], ...] = ()
    paths: tuple[str, ...] = ()
    name: str = ""

    def _merged(self, variables: dict):
        from flax import nnx

        params, batch_stats, rest = (jax.tree.map(lambda v: v, state) for state in self.states)
        nnx.replace_by_pure_dict(params, variables["params"])
        if variables.get("batch_stats"):
            nnx.replace_by_pure_dict(batch_stats, variables["batch_stats"])
        return nnx.merge(self.graphdef, params, batch_stats, rest)

    def apply(self, variables: dict, x, bits: Bits | None = None, train: bool = False,
              mutable: bool | str | list[str] = False, rngs: dict | None = None, override=None):
        """Logits (and the updated collections when ``mutable`` lists any), as
        :meth:`QuantizedModel.apply`."""
        from flax import nnx

        own, reported = _split(mutable)
        model = self._merged(variables)
        model.train() if train else model.eval()
        if rngs and "dropout" in rngs:
            nnx.reseed(model, dropout=rngs["dropout"])
        scope = _scope_of(self.layers, variables, bits, self.options, override)
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


QevoModel = QuantizedModel | QuantizedNNX  # a network with qevo's model interface


def _found(scope: _Scope, params: dict, negative: dict[str, bool], share=None, names=None,
           normalization: tuple[type, ...] = NORMALIZATION) -> tuple[tuple[Layer, ...], tuple[tuple[str, str], ...]]:
    """The layers a discovery scope recorded (a path that ``share`` maps to another takes
    that layer's widths; ``names`` name them; ``negative``: whether a path's input took a
    negative value), and the other parameter owners that stay float (except
    ``normalization`` layers, float by design)."""
    owner = {path: (share(path) if share else None) or path for path in scope.ops}
    for path, target in owner.items():
        if target not in scope.ops or owner[target] != target:
            raise ConfigError(f"share maps layer {path} to {target}, which is no layer of its own; "
                              f"map it to one of {[p for p in scope.ops if owner[p] == p]}")
    mains = [path for path in scope.ops if owner[path] == path]
    if names is not None and len(names) != len(mains):
        raise ConfigError(f"{len(names)} layer names for {len(mains)} layers; give one name per layer")
    layers = []
    for i, path in enumerate(mains):
        group = [path, *(p for p in scope.ops if p != path and owner[p] == path)]
        ops = [op for p in group for op in scope.ops[p]]
        layers.append(Layer(
            path=path, kind=ops[0][0], kernel_shape=ops[0][1], groups=ops[0][3], macs=sum(op[2] for op in ops),
            weights=sum(int(np.prod(scope.ops[p][0][1])) for p in group),
            signed=any(negative[p] for p in group),
            shared=tuple(group[1:]), name=names[i] if names is not None else path))
    owners = {path.rpartition("/")[0] for path in traverse_util.flatten_dict(params, sep="/")}
    others = tuple((path, scope.modules[path].__name__ if path in scope.modules else "?")
                   for path in sorted(owners - set(scope.ops))
                   if not (path in scope.modules and issubclass(scope.modules[path], normalization)))
    return tuple(layers), others


def _discover(run, name: str, sample, arguments=lambda: ()) -> tuple[_Scope, dict, dict]:
    """Trace ``run(scope, sample, *arguments()) -> params`` once, jitted, as discovery: the scope's
    records, the params, and per path whether each call's input took a negative value. A
    network that fails on ``sample`` is a ConfigError."""
    scope = _Scope()

    def traced(sample, *args):
        with _active(scope):
            params = run(scope, sample, *args)
        return params, {path: [jnp.any(x < 0) for x in xs] for path, xs in scope.inputs.items()}

    try:
        params, negative = jax.jit(traced)(sample, *arguments())
    except ConfigError:
        raise
    except Exception as e:  # the user's network on the user's sample: say which, keep the cause
        raise ConfigError(f"the model failed on a sample of shape {tuple(sample.shape)}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; give it inputs of "
                          "the shape it takes") from e
    if not scope.ops:
        raise ConfigError(f"{name} has no quantizable layer (flax Conv, Dense/Linear or DenseGeneral/LinearGeneral); "
                          "qevo quantizes only those: build its kernels with them (parameters of its own stay float)")
    return scope, params, {path: any(bool(v) for v in values) for path, values in negative.items()}


def _random_variables(model: nn.Module, sample, kwargs: dict) -> dict:
    """Variables of ``model``'s structure holding random values, without compiling its
    initializers: kernels ``N(0, 1/fan_in)`` (activations keep their scale through the
    layers), other parameters ``N(0, 1)``, every other collection ones (running variances
    stay positive). Enough to see which layers' inputs can be negative."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample, **kwargs))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if path[0].key != "params":
            return np.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) >= 2 else 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@overload
def quantize(model: nn.Module, sample: jax.Array | np.ndarray, variables: dict | None = None,
             options: QuantOptions = ..., share=None, names: tuple[str, ...] | None = None) -> QuantizedModel: ...
@overload
def quantize(model: object, sample: jax.Array | np.ndarray, variables: dict | None = None,
             options: QuantOptions = ..., share=None, names: tuple[str, ...] | None = None) -> QevoModel: ...
def quantize(model, sample: jax.Array | np.ndarray, variables: dict | None = None,
             options: QuantOptions = QuantOptions(), share=None, names: tuple[str, ...] | None = None) -> QevoModel:
    """Find the quantizable layers of a Flax network by tracing it once on ``sample``.

    Args:
      model (flax.linen.Module | flax.nnx.Module): a ``flax.linen`` module, called as
        ``model.apply(variables, x)`` (with ``train=`` when its ``__call__`` takes it), or a
        ``flax.nnx`` module, called as ``model(x)`` (a clone is quantized; the network itself
        stays as it is).
      sample: a few inputs ``[N, ...]`` as the network takes them (normalized); where a
        layer's input takes a negative value on them, the layer takes signed activations.
      variables: the Linen network's variables for that trace; None: random ones (see
        :func:`_random_variables`; the structure is traced, nothing is compiled).
      options: quantizer settings and convolution kernels (:class:`qevo.quant.layers.QuantOptions`).
      share (Callable | None): ``share(path) -> path | None``: the layer whose widths and clip range a found
        layer takes instead of its own (a projection shortcut beside its block's first
        convolution), or None for its own.
      names: one name per layer (after ``share``) for reports; default: the paths.

    Returns:
      model (QuantizedModel | QuantizedNNX): a :class:`QuantizedModel` (Linen) or :class:`QuantizedNNX` (NNX).

    Raises:
      ConfigError: ``model`` is no Flax module, fails on ``sample``, has no quantizable
        layer, or ``share`` or ``names`` do not fit its layers.
    """
    from flax import nnx

    sample = jnp.asarray(sample)
    if isinstance(model, nnx.Module):
        return _quantize_nnx(model, sample, options, share, names)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}")
    kwargs: dict[str, Any] = {"train": False} if _takes(model, "train") else {}

    def run(scope, sample, given):
        with nn.intercept_methods(_linen_interceptor(scope)):
            model.apply(given, sample, **kwargs)
        return given.get("params", {})

    def arguments():
        return (variables if variables is not None else _random_variables(model, sample, kwargs),)

    scope, params, negative = _discover(run, type(model).__name__, sample, arguments)
    layers, others = _found(scope, params, negative, share, names)
    return QuantizedModel(model=model, layers=layers, options=options, float_others=others, paths=tuple(scope.ops))


NNX_QUANTIZABLE = ("Conv", "Linear", "LinearGeneral")
NNX_NORMALIZATION = ("BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm")


def _quantize_nnx(model, sample, options: QuantOptions, share, names) -> QuantizedNNX:
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

    clone.eval()
    graphdef, params, batch_stats, rest = nnx.split(clone, nnx.Param, nnx.BatchStat, ...)

    def run(scope, sample):
        scope.modules.update(types)
        nnx.merge(graphdef, params, batch_stats, rest)(sample)
        return {}

    scope, _, negative = _discover(run, type(model).__name__, sample)
    layers, others = _found(scope, nnx.to_pure_dict(params), negative, share, names,
                            tuple(getattr(nnx, t) for t in NNX_NORMALIZATION))
    return QuantizedNNX(graphdef=graphdef, states=(params, batch_stats, rest), layers=layers, options=options,
                        float_others=others, paths=tuple(scope.ops), name=type(model).__name__)
