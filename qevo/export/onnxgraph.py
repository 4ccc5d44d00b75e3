"""ONNX graph of a qevo model's inference forward pass, built from its own trace.

The model is not described a second time: its forward pass (``model.apply(variables, x,
bits, train=False)``) is traced once with :func:`jax.make_jaxpr` while an ``override``
(:class:`qevo.quant.interception.Call`) replaces the operation of every quantizable layer, and
``flax.linen.intercept_methods`` every :class:`~qevo.quant.layers.BatchNorm` call, by a marker
primitive that names the layer. A layer's bias is the model's own addition after it. The
jaxpr is then walked once and each equation becomes ONNX nodes (``onnx.helper``):

* a marker of a quantizable layer: its input activation quantized as
  :func:`qevo.quant.quantizers.quantize_activation` does (``Clip`` to the layer's clip range, then
  ``QuantizeLinear``/``DequantizeLinear`` with the step ``clip / n``: uint8 zero point for
  unsigned levels, int8 for signed; 1-bit signed inputs as ``Sign(x) * clip``; width 32
  not quantized), its kernel as integer levels with per-output-channel scales through
  ``DequantizeLinear``, as a uint8 index tensor gathered from its codebook (weight
  sharing: ``Cast`` + ``Gather``, which onnxruntime runs), or as float32; then ``Conv``
  (between ``Transpose`` nodes: tensors stay NHWC as in JAX) or ``MatMul`` (plain 2-D
  convolutions and ``[.., in] @ [in, out]`` dense layers only);
* a BatchNorm right after such a layer (its only reader) folds into that layer's
  per-channel weight scale and bias (a negative factor negates the integer levels, so
  scales stay positive); any other BatchNorm is a ``Mul`` and an ``Add``;
* with ``arithmetic="integer"`` (a model whose own forward pass is
  :func:`qevo.quant.intforward.apply`'s integer arithmetic, such as a coevolution's result), a
  layer held as integer levels (:class:`~qevo.quant.intforward.IntKernel`) is that integer layer
  instead (:func:`_integer_layer`): its input's levels as
  :func:`qevo.quant.intforward.activation_levels` computes them (``Clip``, ``Mul`` by the same
  float32 inverse step, ``Round`` half to even, ``Cast`` to uint8, int8 for a signed
  input; not ``QuantizeLinear``, which divides by the step and rounds some activations on
  a level boundary to the other side), ``ConvInteger``/``MatMulInteger`` with the int8
  kernel levels (exact int32 sums), ``Cast`` to float32, the rescale by
  ``step * scale`` per output channel, and the BatchNorm after it unfolded,
  ``(y - mean) * factor + bias``, all in float32 (a graph every runtime takes). XLA's CPU
  compiler fuses those multiply-adds into FMAs (one rounding where the graph rounds twice),
  and the float layers around the integer ones (the first and last by default) sum in
  another order, so an activation within a rounding error of a level boundary can take the
  neighbouring level; everything else matches qevo's integer forward pass exactly;
* everything else maps one to one (``max`` with 0 to ``Relu``, ``min``/``max`` to
  ``Min``/``Max``, ``tanh``, ``reduce_window_max`` to ``MaxPool``, ``reduce_sum`` and the
  division of a mean, ``reshape`` with the batch axis kept symbolic, ``add``, ...); the
  calls of ``jit``, ``custom_jvp`` and ``custom_vjp`` functions are inlined and equations
  of constants are evaluated.

The graph takes uint8 images ``[N, H, W, C]`` (``N`` symbolic) as the dataset stores them,
normalises them inside (:func:`qevo.data.datasets.normalize`) and returns float32 logits
``[N, classes]``. Its opset is :data:`OPSET` (per-channel ``DequantizeLinear``; ``ReduceSum``
with its axes as an input; ``ConvInteger``/``MatMulInteger`` date from opset 10, ``Round``
and ``Clip`` with tensor bounds from 11), or :data:`OPSET_16BIT` where a quantized width
above 8 bits needs int16/uint16 levels.

onnxruntime's CPU provider (1.32) runs ``ConvInteger`` and ``MatMulInteger`` for every pair
of uint8/int8 input and weight types, ``ConvInteger`` with ``group`` (depthwise) too, and
their int32 sums were exact in tiny graphs at the extremes (255 or -128 times -128 over
576 products). On CPUs without VNNI instructions its uint8 x int8 kernels add pairs of
products in int16 with saturation (onnxruntime's documented reason for ``reduce_range``),
which 8-bit activations times 8-bit weights can reach (2 * 255 * 127 > 32767); narrower
widths cannot.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import onnx
from flax import traverse_util
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Primitive
from onnx import TensorProto, helper, numpy_helper

from qevo.errors import ConfigError, ExportError
from qevo.quant import intforward, onednn
from qevo.quant.interception import Call
from qevo.quant.intforward import IntKernel
from qevo.quant.layers import BatchNorm, Bits
from qevo.quant.quantizers import FLOAT_BITS
from qevo.sharing.codebook import SharedKernel

OPSET = 13
OPSET_16BIT = 21
MAX_BITS = 16  # widest quantized width an ONNX QuantizeLinear holds (int16/uint16, opset 21)


Kernel = IntKernel | SharedKernel


_marker = Primitive("qevo_export_layer")
_marker.def_abstract_eval(lambda x, *, path, shape: jax.core.ShapedArray(shape, x.dtype))


@dataclasses.dataclass(frozen=True)
class _Marked:
    """What the graph needs of one quantizable layer: its position, input signedness, kind,
    kernel shape and geometry (a :class:`qevo.quant.interception.Call` without its arrays)."""

    index: int
    signed: bool
    kind: str
    kernel_shape: tuple[int, ...]
    strides: int
    padding: str
    groups: int


def trace(model, variables: dict, image_shape: tuple[int, ...], bits: Bits | None):
    """The jaxpr of ``model``'s inference forward pass on one normalised float image
    ``[1, *image_shape]``, with a marker equation per quantizable layer and BatchNorm call,
    and ``{path: _Marked | BatchNorm}`` of the marked ones.

    Raises:
      ExportError: a quantizable layer that is no plain 2-D NHWC convolution or
        ``[.., in] @ [in, out]`` dense layer.
    """
    marked: dict[str, _Marked | nn.Module] = {}

    def layer(call: Call):
        if not call.plain:
            raise ExportError(f"layer {call.path} is no plain 2-D NHWC convolution (square strides, SAME/VALID "
                              "padding) or [.., in] @ [in, out] dense layer; the export takes only those")
        conv = call.kind == "conv"
        marked[call.path] = _Marked(
            index=call.index, signed=call.signed, kind=call.kind, kernel_shape=tuple(call.rhs.shape),
            strides=call.params["window_strides"][0] if conv else 1, padding=call.params["padding"] if conv else "",
            groups=call.params["feature_group_count"] if conv else 1)
        shape = jax.eval_shape(call.compute, call.lhs, call.rhs).shape
        return _marker.bind(call.lhs, path=call.path, shape=shape)

    def norm(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, BatchNorm):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        marked[path] = module
        return _marker.bind(args[0], path=path, shape=tuple(args[0].shape))

    def forward(x):
        with nn.intercept_methods(norm):
            return model.apply(variables, x, bits, train=False, override=layer)

    jaxpr = jax.make_jaxpr(forward)(jnp.zeros((1, *image_shape), jnp.float32))
    return jaxpr, marked


class _Graph:
    """Nodes and initializers of the graph being built, with unique names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _operand(g: _Graph, value) -> str:
    """A tensor name for a traced value (a name already) or a constant (a uniform one as a scalar)."""
    if isinstance(value, str):
        return value
    value = np.asarray(value)
    if value.size and np.all(value == value.flat[0]):
        value = value.reshape(-1)[0]
    return g.const(value.astype(np.float32) if value.dtype == np.float64 else value)


@dataclasses.dataclass(frozen=True)
class _Layers:
    """What the layer markers read: the marked layers, flat variables, widths, stored kernels, folds."""

    modules: dict  # path -> _Marked | BatchNorm
    params: dict
    stats: dict
    bits: Bits | None
    clips: np.ndarray
    kernels: dict
    folded: dict  # layer path -> BatchNorm path folded into it
    integer: bool  # the layers of IntKernels run in integer arithmetic

    def batch_norm(self, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-channel float32 ``(mean, factor, bias)`` of BatchNorm ``path``:
        ``y = (x - mean) * factor + bias`` with ``factor = scale * rsqrt(var + eps)``, the
        reciprocal square root correctly rounded (as XLA folds it in qevo's jitted forward)."""
        eps = np.float32(self.modules[path].epsilon)
        var = (self.stats[f"{path}/var"] + eps).astype(np.float64)
        factor = self.params[f"{path}/scale"] * (1 / np.sqrt(var)).astype(np.float32)
        return self.stats[f"{path}/mean"], factor.astype(np.float32), self.params[f"{path}/bias"]

    def affine(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(factor, offset)`` of BatchNorm ``path``: ``y = x * factor + offset``."""
        mean, factor, bias = self.batch_norm(path)
        return factor, (bias - mean * factor).astype(np.float32)

    def runs_integer(self, path: str) -> bool:
        """Whether layer ``path`` runs in integer arithmetic (:func:`_integer_layer`)."""
        return self.integer and isinstance(self.kernels.get(path), IntKernel)


def _quantize_input(g: _Graph, x: str, bits: int, clip: float | np.floating, signed: bool) -> str:
    """Nodes of :func:`qevo.quant.quantizers.quantize_activation` (``"absmax"``/``"mse"``) on ``x``."""
    if bits >= FLOAT_BITS:
        return x
    clip = np.float32(clip)
    low = -clip if signed else np.float32(0)
    x = g.node("Clip", [x, g.const(low), g.const(clip)])
    if signed and bits == 1:
        return g.node("Mul", [g.node("Sign", [x]), g.const(clip)])
    n = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    step = clip * (np.float32(1) / np.float32(max(n, 1)))
    if step == 0:
        return g.node("Mul", [x, g.const(np.float32(0))])
    zero = (np.int8 if signed else np.uint8) if bits <= 8 else (np.int16 if signed else np.uint16)
    scale, zero_point = g.const(np.float32(step), "step"), g.const(zero(0), "zero_point")
    q = g.node("QuantizeLinear", [x, scale, zero_point], "levels")
    return g.node("DequantizeLinear", [q, scale, zero_point])


def _weights(g: _Graph, kernel, stored: Kernel | None, factor: np.ndarray | None, conv: bool) -> str:
    """The float weight tensor of a layer (ONNX layout: ``OIHW`` or ``[in, out]``), with a
    folded per-output-channel ``factor``."""
    order = (3, 2, 0, 1) if conv else (0, 1)
    axis = 0 if conv else 1
    out_shape = [-1, 1, 1, 1] if conv else [1, -1]
    if isinstance(stored, IntKernel):
        q, scale = np.asarray(stored.q), np.asarray(stored.scale, np.float32)
        if factor is not None:
            q = (q * np.where(factor < 0, -1, 1).astype(q.dtype)).astype(q.dtype)
            scale = (scale * np.abs(factor)).astype(np.float32)
        return g.node("DequantizeLinear", [g.const(q.transpose(order), "levels"), g.const(scale, "scale")],
                      "weights", axis=axis)
    if isinstance(stored, SharedKernel):
        index = g.node("Cast", [g.const(np.asarray(stored.indices).transpose(order), "indices")], to=TensorProto.INT32)
        w = g.node("Gather", [g.const(np.asarray(stored.codebook, np.float32), "codebook"), index], "weights")
        return w if factor is None else g.node("Mul", [w, g.const(factor.reshape(out_shape))])
    w = np.asarray(kernel, np.float32)
    w = w if factor is None else w * factor
    return g.const(w.transpose(order).astype(np.float32), "weights")


def _conv(g: _Graph, op: str, x: str, weights: list[str], layer: _Marked, in_shape: tuple[int, ...]) -> str:
    """``op`` (``Conv`` or ``ConvInteger``) with ``layer``'s kernel size, strides, padding
    and groups on the NHWC tensor ``x`` of shape ``in_shape`` (transposed to NCHW and back);
    ``weights``: the OIHW kernel (and the bias of a ``Conv``)."""
    kh, kw, s = *layer.kernel_shape[:2], layer.strides
    pads = ([onednn.same_padding(n, k, s) for n, k in zip(in_shape[1:3], (kh, kw), strict=True)]
            if layer.padding == "SAME" else [(0, 0), (0, 0)])
    nchw = g.node("Transpose", [x], perm=[0, 3, 1, 2])
    y = g.node(op, [nchw, *weights], op.lower(), kernel_shape=[kh, kw], strides=[s, s], group=layer.groups,
               pads=[pads[0][0], pads[1][0], pads[0][1], pads[1][1]])
    return g.node("Transpose", [y], f"{op.lower()}_nhwc", perm=[0, 2, 3, 1])


def _affine(g: _Graph, x: str, factor: np.ndarray, offset: np.ndarray) -> str:
    """float32 ``x * factor + offset`` with per-channel float32 constants."""
    return g.node("Add", [g.node("Mul", [x, g.const(np.asarray(factor, np.float32), "factor")]),
                          g.const(np.asarray(offset, np.float32), "offset")])


def _integer_layer(g: _Graph, layers: _Layers, path: str, x: str, in_shape: tuple[int, ...]) -> str:
    """Nodes of layer ``path`` as :func:`qevo.quant.intforward.apply` runs it (``"integer"``), and of
    the BatchNorm folded after it: the activation levels of ``x`` (``Clip``, ``Mul`` by the
    float32 inverse step, ``Round`` half to even, ``Cast`` to uint8, or int8 for a signed
    input), ``ConvInteger``/``MatMulInteger`` with the int8 kernel levels (exact int32 sums),
    ``Cast`` to float32, the rescale by ``step * scale`` per output channel and the bias, then
    the BatchNorm ``(y - mean) * factor + bias``, in float32 (the layer's own bias is the
    model's addition after it).

    Raises:
      ConfigError: an activation width outside 2..8 or kernel levels that are not int8
        (the integer forward pass takes neither).
    """
    layer, kernel = layers.modules[path], layers.kernels[path]
    assert layers.bits is not None  # integer layers have widths
    bits, clip = int(layers.bits.a[layer.index]), np.float32(layers.clips[layer.index])
    q = np.asarray(kernel.q)
    if not intforward.MIN_ACTIVATION_BITS <= bits <= intforward.MAX_WEIGHT_BITS or q.dtype != np.int8:
        raise ConfigError(f"layer {path} has {bits}-bit activations and {q.dtype} levels; integer arithmetic takes "
                          f"{intforward.MIN_ACTIVATION_BITS}..{intforward.MAX_WEIGHT_BITS}-bit activations and "
                          "int8 levels")
    signed = layer.signed
    step, inverse = (np.float32(v) for v in intforward.activation_step(bits, clip, signed))
    x = g.node("Clip", [x, g.const(-clip if signed else np.float32(0)), g.const(clip)])
    x = g.node("Round", [g.node("Mul", [x, g.const(inverse, "inverse")])])
    x = g.node("Cast", [x], "levels", to=TensorProto.INT8 if signed else TensorProto.UINT8)
    if layer.kind == "conv":
        acc = _conv(g, "ConvInteger", x, [g.const(q.transpose(3, 2, 0, 1), "levels")], layer, in_shape)
    else:
        acc = g.node("MatMulInteger", [x, g.const(q, "levels")])
    y = g.node("Cast", [acc], "accumulator", to=TensorProto.FLOAT)
    rescale = (step * np.asarray(kernel.scale, np.float32)).astype(np.float32)
    norm = layers.folded.get(path)
    if norm is None:
        return g.node("Mul", [y, g.const(rescale, "rescale")])
    mean, factor, offset = layers.batch_norm(norm)
    return _affine(g, _affine(g, y, rescale, -mean), factor, offset)


def _layer(g: _Graph, layers: _Layers, path: str, x: str, in_shape: tuple[int, ...]) -> str:
    """Nodes of a marked BatchNorm, or of a quantizable layer (its operation, without the
    model's bias) with a folded BatchNorm."""
    layer = layers.modules[path]
    if isinstance(layer, BatchNorm):
        factor, offset = layers.affine(path)
        return g.node("Add", [g.node("Mul", [x, g.const(factor)]), g.const(offset)], "batch_norm")
    if layers.runs_integer(path):
        return _integer_layer(g, layers, path, x, in_shape)
    conv = layer.kind == "conv"
    if layers.bits is not None:
        x = _quantize_input(g, x, int(layers.bits.a[layer.index]), float(layers.clips[layer.index]), layer.signed)
    kernel = layers.params[f"{path}/kernel"]
    factor = None
    if path in layers.folded:
        factor, offset = layers.affine(layers.folded[path])
    w = _weights(g, kernel, layers.kernels.get(path), factor, conv)
    if not conv:
        return g.node("MatMul", [x, w], "dense")
    bias = [g.const(offset, "bias")] if factor is not None else []
    return _conv(g, "Conv", x, [w, *bias], layer, in_shape)


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min"}
_UNARY = {"tanh": "Tanh", "exp": "Exp", "neg": "Neg", "logistic": "Sigmoid", "sqrt": "Sqrt", "abs": "Abs",
          "sign": "Sign", "copy": "Identity", "copy_p": "Identity"}
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _inner(eqn) -> ClosedJaxpr | None:
    """The jaxpr a call-like equation (``jit``, ``custom_jvp_call``, ...) runs, or None."""
    for key in _CALLS:
        inner = eqn.params.get(key)
        if isinstance(inner, ClosedJaxpr):
            return inner
        if isinstance(inner, Jaxpr):
            return ClosedJaxpr(inner, [])
    return None


def _emit(g: _Graph, layers: _Layers, eqn, ins: list) -> list:
    """ONNX nodes of one equation with traced inputs; returns its outputs (names or constants)."""
    name = eqn.primitive.name
    if name == _marker.name:
        path = eqn.params["path"]
        if isinstance(layers.modules[path], BatchNorm) and path in layers.folded.values():
            return [ins[0]]
        return [_layer(g, layers, path, ins[0], eqn.invars[0].aval.shape)]
    inner = _inner(eqn)
    if inner is not None:
        return _walk(g, layers, inner.jaxpr, inner.consts, ins)
    if name in _BINARY:
        a, b = ins
        if name == "max" and not isinstance(b, str) and not np.any(np.asarray(b)):
            return [g.node("Relu", [a])]
        if name == "max" and not isinstance(a, str) and not np.any(np.asarray(a)):
            return [g.node("Relu", [b])]
        return [g.node(_BINARY[name], [_operand(g, a), _operand(g, b)])]
    if name in _UNARY:
        return [g.node(_UNARY[name], [ins[0]])]
    if name == "rsqrt":
        return [g.node("Reciprocal", [g.node("Sqrt", [ins[0]])])]
    if (name == "integer_pow" and eqn.params["y"] == 2) or name == "square":
        return [g.node("Mul", [ins[0], ins[0]])]
    if name == "clamp":
        low, x, high = ins
        return [g.node("Clip", [x, _operand(g, np.float32(low)), _operand(g, np.float32(high))])]
    if name == "convert_element_type":
        dtype = np.dtype(eqn.params["new_dtype"])
        if dtype == eqn.invars[0].aval.dtype:
            return [ins[0]]
        return [g.node("Cast", [ins[0]], to=helper.np_dtype_to_tensor_dtype(dtype))]
    if name == "reshape":
        old, new = eqn.invars[0].aval.shape, tuple(eqn.params["new_sizes"])
        if old[0] != new[0]:
            raise ExportError(f"the model reshapes {old} to {new}, moving the batch axis; the export keeps it first")
        return [g.node("Reshape", [ins[0], g.const(np.array([0, *new[1:]], np.int64), "shape")])]
    if name == "transpose":
        return [g.node("Transpose", [ins[0]], perm=list(eqn.params["permutation"]))]
    if name == "reduce_sum":
        axes = g.const(np.array(eqn.params["axes"], np.int64), "axes")
        return [g.node("ReduceSum", [ins[0], axes], keepdims=0)]
    if name == "reduce_window_max":
        dims, strides = eqn.params["window_dimensions"], eqn.params["window_strides"]
        pads = eqn.params["padding"]
        if dims[0] != 1 or dims[3] != 1 or strides[0] != 1 or strides[3] != 1 or pads[0] != (0, 0) \
                or pads[3] != (0, 0) or any(d != 1 for d in (*eqn.params["base_dilation"],
                                                           *eqn.params["window_dilation"])):
            raise ExportError(f"the model pools with window {dims}, strides {strides}, padding {pads}; the export "
                              "pools over H and W of NHWC tensors only")
        nchw = g.node("Transpose", [ins[0]], perm=[0, 3, 1, 2])
        y = g.node("MaxPool", [nchw], "max_pool", kernel_shape=list(dims[1:3]), strides=list(strides[1:3]),
                   pads=[pads[1][0], pads[2][0], pads[1][1], pads[2][1]])
        return [g.node("Transpose", [y], perm=[0, 2, 3, 1])]
    raise ExportError(f"the model uses the JAX operation {name!r}, which the export has no ONNX form for; "
                      "export a network of the operations qevo's own networks use")


def _walk(g: _Graph, layers: _Layers, jaxpr, consts, args: list) -> list:
    """Emit ``jaxpr`` with inputs ``args`` (tensor names or constants); returns its outputs."""
    env = dict(zip(jaxpr.constvars, (np.asarray(c) for c in consts), strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(v):
        return np.asarray(v.val) if isinstance(v, Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if any(isinstance(x, str) for x in ins):
            outs = _emit(g, layers, eqn, ins)
        else:
            result = eqn.primitive.bind(*ins, **eqn.params)
            outs = [np.asarray(r) for r in (result if eqn.primitive.multiple_results else [result])]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _folds(jaxpr, modules: dict) -> dict[str, str]:
    """``{layer path: BatchNorm path}`` of the BatchNorms whose input is a quantizable
    layer's output read by nothing else."""
    uses: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, Literal):
                uses[v] = uses.get(v, 0) + 1
    for v in jaxpr.outvars:
        if not isinstance(v, Literal):
            uses[v] = uses.get(v, 0) + 1
    made = {eqn.outvars[0]: eqn.params["path"] for eqn in jaxpr.eqns if eqn.primitive is _marker}
    folded = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive is _marker and isinstance(modules[eqn.params["path"]], BatchNorm):
            source = made.get(eqn.invars[0])
            if source is not None and uses[eqn.invars[0]] == 1 and not isinstance(modules[source], BatchNorm):
                folded[source] = eqn.params["path"]
    return folded


def opset_for(bits: Bits | None) -> int:
    """:data:`OPSET`, or :data:`OPSET_16BIT` when a quantized width is above 8 bits.

    Raises:
      ConfigError: a quantized width above :data:`MAX_BITS` (no ONNX integer type for it).
    """
    if bits is None:
        return OPSET
    widths = np.concatenate([np.asarray(bits.w).ravel(), np.asarray(bits.a).ravel()])
    quantized = widths[widths < FLOAT_BITS]
    wide = sorted({int(b) for b in quantized if b > MAX_BITS})
    if wide:
        raise ConfigError(f"widths {wide} have no ONNX integer type (QuantizeLinear holds up to {MAX_BITS} bits); "
                          "export models whose quantized widths are 1..16")
    return OPSET_16BIT if quantized.size and quantized.max() > 8 else OPSET


def build(model, variables: dict, bits: Bits | None, kernels: dict[str, Kernel],
          image_shape: tuple[int, int, int], mean, std, name: str = "qevo",
          arithmetic: str = "float") -> onnx.ModelProto:
    """The ONNX model of ``model``'s inference forward pass.

    Args:
      model: a qevo model (:class:`qevo.quant.interception.QuantizedModel`; its layers' own
        convolution kernels are not traced).
      variables: its float variables (``params``; ``batch_stats``; ``quant/a_clip``).
      bits: concrete int ``[L]`` widths (``None``: the float network; a layer's input is
        quantized where its activation width is below 32).
      kernels: ``{module path: IntKernel | SharedKernel}`` of the layers whose kernels are
        stored as integer levels or shared indices; the other kernels are float32.
      image_shape: ``(H, W, C)``.
      mean, std: per-channel normalisation (:func:`qevo.data.datasets.normalize`).
      name: the graph's name.
      arithmetic: ``"float"``: quantized layers as qevo's fake quantization (dequantized
        levels, float sums); ``"integer"``: the layers of IntKernels as
        :func:`qevo.quant.intforward.apply` runs them (integer levels, exact int32 sums).

    Returns:
      A checked ``onnx.ModelProto``: input ``images`` uint8 ``[N, H, W, C]``, output
      ``logits`` float32 ``[N, classes]``.

    Raises:
      ConfigError: an unknown ``arithmetic``; widths the graph cannot hold (:func:`opset_for`,
        :func:`_integer_layer`).
    """
    if arithmetic not in intforward.ARITHMETICS:
        raise ConfigError(f"arithmetic must be one of {intforward.ARITHMETICS}, got {arithmetic!r}")
    opset = opset_for(bits)
    host = jax.device_get(variables)
    closed, modules = trace(model, host, image_shape, bits)
    params = traverse_util.flatten_dict(host["params"], sep="/")
    layers = _Layers(
        modules=modules, params={k: np.asarray(v, np.float32) for k, v in params.items()},
        stats={k: np.asarray(v, np.float32)
               for k, v in traverse_util.flatten_dict(host.get("batch_stats", {}), sep="/").items()},
        bits=None if bits is None else Bits(w=np.asarray(bits.w), a=np.asarray(bits.a)),
        clips=np.asarray(host["quant"]["a_clip"], np.float32), kernels=kernels,
        folded=_folds(closed.jaxpr, modules), integer=arithmetic == "integer" and bits is not None,
    )
    g = _Graph()
    x = g.node("Cast", ["images"], to=TensorProto.FLOAT)
    x = g.node("Div", [x, g.const(np.float32(255.0))])
    x = g.node("Sub", [x, g.const(np.asarray(mean, np.float32))])
    x = g.node("Div", [x, g.const(np.asarray(std, np.float32))], "normalized")
    (out,) = _walk(g, layers, closed.jaxpr, closed.consts, [x])
    g.nodes.append(helper.make_node("Identity", [out], ["logits"], name="logits"))
    classes = closed.jaxpr.outvars[0].aval.shape[-1]
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", *image_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        g.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="qevo",
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run(proto_or_path, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """float32 logits ``[N, classes]`` of an ONNX model (path or proto) in onnxruntime
    (CPU, default graph optimisations) on uint8 ``images [N, H, W, C]``, ``batch_size`` at a time."""
    import onnxruntime

    model = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.concatenate([np.asarray(session.run(["logits"], {"images": images[i:i + batch_size]})[0])
                           for i in range(0, len(images), batch_size)])


def level_count(proto: onnx.ModelProto) -> dict[str, int]:
    """``{element type name: count}`` of the model's initializers (how its weights are stored)."""
    counts: dict[str, int] = {}
    for t in proto.graph.initializer:
        key = TensorProto.DataType.Name(t.data_type).lower()
        counts[key] = counts.get(key, 0) + math.prod(t.dims)
    return counts
