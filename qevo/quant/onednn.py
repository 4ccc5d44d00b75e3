"""oneDNN convolutions on the CPU, called from compiled JAX programs as XLA FFI custom calls.

XLA:CPU runs every convolution, forward or backward, through one generic kernel, and its
gradients are slow: a ResNet-20 training step at batch 128 ran at about 190 images/s on a
2-core CPU with XLA's convolutions, against 719 for PyTorch (channels_last) on the same
cores, and at 697 with this module (``python -m benchmarks.train_speed``). PyTorch's CPU
convolutions are oneDNN's direct kernels; this module calls the same library (Intel's
``onednn-cpu-gomp`` wheel, installed with qevo on x86-64 Linux) for the forward pass and
both gradients, inside the compiled program, with no copy: images stay NHWC, kernels HWIO.

The bridge, ``qevo/kernels/onednn_conv.cc``, is compiled when qevo is installed (its
``CMakeLists.txt``, through scikit-build-core) into ``qevo/libqevo_onednn.so``. Where it
could not be built (no C++ compiler, no oneDNN wheel for the platform) the install wrote
why into ``qevo/onednn_build.txt``; then, or with ``QEVO_ONEDNN=0``, :func:`available` is
False, :func:`status` says why, and qevo keeps XLA's paths.

Which kernels oneDNN runs depends on the CPU: :func:`implementations` asks it for one
convolution, :func:`record` for every convolution of a traced program, and
:func:`rounds_to_bfloat16` reads from an implementation's name whether ``precision=
"bfloat16"`` really rounds the operands (bf16 arithmetic units) or stays float32.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.metadata
import os
import pathlib
import warnings

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

DISABLE_ENV = "QEVO_ONEDNN"
BRIDGE, NOT_BUILT = "libqevo_onednn.so", "onednn_build.txt"
TARGETS = {"forward": "QevoConvForward", "input_grad": "QevoConvInputGrad", "kernel_grad": "QevoConvKernelGrad"}
RUNTIME = "onednn-cpu-gomp"
PRIMITIVES = ("forward", "input_grad", "kernel_grad")


class OneDNNUnavailable(RuntimeError):
    """The oneDNN path cannot be used here; the message says why."""


def _dist_file(dist: str, suffix: str) -> pathlib.Path | None:
    """The installed file of distribution ``dist`` whose path ends with ``suffix``, or None."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in d.files or ():
        if str(f).replace("\\", "/").endswith(suffix):
            return pathlib.Path(str(d.locate_file(f))).resolve()
    return None


def _bridge() -> pathlib.Path:
    """The bridge built at install; else :class:`OneDNNUnavailable` saying why it cannot be used."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        raise OneDNNUnavailable(f"disabled by {DISABLE_ENV}=0")
    bridge = _dist_file("qevo", f"qevo/{BRIDGE}")
    if bridge is None:
        why = _dist_file("qevo", f"qevo/{NOT_BUILT}")
        raise OneDNNUnavailable("the oneDNN bridge was not built when qevo was installed: " + (
            why.read_text().strip() if why else "reinstall qevo (pip install .) to build it"))
    return bridge


@functools.cache
def _library() -> ctypes.CDLL:
    """Load oneDNN, then the bridge, and register its FFI targets."""
    bridge = _bridge()
    dnnl = _dist_file(RUNTIME, "/libdnnl.so.3")
    if dnnl is None:
        raise OneDNNUnavailable(f"the {RUNTIME} package is not installed (pip install {RUNTIME}; x86-64 Linux only)")
    try:
        ctypes.CDLL(str(dnnl), mode=ctypes.RTLD_GLOBAL)  # the bridge's libdnnl.so.3
        lib = ctypes.CDLL(str(bridge))
    except OSError as e:
        raise OneDNNUnavailable(f"loading {bridge} failed: {e}") from None
    for symbol in TARGETS.values():
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


@functools.cache
def unavailable() -> str | None:
    """None when the oneDNN path is ready (loading it on the first call), else why not
    (warned once, in one line, unless ``QEVO_ONEDNN=0`` asked for it)."""
    try:
        _library()
    except OneDNNUnavailable as e:
        if os.environ.get(DISABLE_ENV) != "0":
            warnings.warn(f"qevo: CPU convolutions use XLA's kernels (slower to train): {e}", stacklevel=2)
        return str(e)
    return None


def available() -> bool:
    """Whether CPU convolutions can run through oneDNN in this process."""
    return unavailable() is None


@dataclasses.dataclass(frozen=True)
class Status:
    """What runs qevo's CPU convolutions in this process (:func:`status`).

    Attributes:
      available: whether oneDNN runs them (else XLA's kernels, :func:`qevo.quant.layers.conv2d`).
      reason: why not, when not ``available``.
      version: oneDNN's version, when ``available``.
      bfloat16: the precision that ``precision="bfloat16"`` gets here (:func:`record` of
        a ResNet-20 3x3 convolution, 32 channels, batch 128): ``"bfloat16"``, ``"float32"``
        (no oneDNN kernel for this CPU's bfloat16 units, or no oneDNN) or ``"mixed"``.
      implementations: oneDNN's names for that convolution's forward pass and gradients,
        ``{"float32": {...}, "bfloat16": {...}}`` (:func:`implementations`).
    """

    available: bool
    reason: str | None
    version: str | None
    bfloat16: str
    implementations: dict


PROBE = ((128, 16, 16, 32), (3, 3, 32, 32), 1, "SAME", 1)


@functools.cache
def status() -> Status:
    """What runs qevo's CPU convolutions here: oneDNN (its version, and what its kernels do
    with ``precision="bfloat16"`` on this CPU) or XLA's kernels, and why."""
    why = unavailable()
    if why is not None:
        return Status(False, why, None, "float32", {})
    image, kernel, strides, padding, groups = PROBE
    bf16 = record(lambda x, k: conv2d(x, k, strides, padding, groups, "bfloat16"),
                  jax.ShapeDtypeStruct(image, np.float32), jax.ShapeDtypeStruct(kernel, np.float32))
    return Status(True, None, version(), bf16["precision"],
                  {p: implementations(*PROBE, precision=p) for p in ("float32", "bfloat16")})


def _text(call, *args) -> str:
    out = ctypes.create_string_buffer(4096)
    code = call(*args, out, ctypes.c_size_t(len(out)))
    if code:
        raise OneDNNUnavailable(f"oneDNN has no convolution for these shapes: {out.value.decode()}")
    return out.value.decode()


def version() -> str:
    """oneDNN's version, ``"major.minor.patch"``. Call only when :func:`available`."""
    call = _library().QevoOneDNNVersion
    call.restype = None
    return _text(lambda out, size: call(out, size) or 0)


def _names(geometry: list[int]) -> dict[str, str]:
    call = _library().QevoConvImplementations
    call.restype = ctypes.c_int
    names = _text(call, (ctypes.c_int64 * len(geometry))(*geometry)).split("\n")
    return dict(zip(PRIMITIVES, names, strict=True))


def implementations(image_shape, kernel_shape, strides: int, padding: str, groups: int,
                    precision: str = "float32") -> dict[str, str]:
    """oneDNN's names for the implementations it runs for one convolution (``image_shape``
    ``[N, H, W, C]``, ``kernel_shape`` ``[K, K, C / groups, O]``, as :func:`conv2d` takes them):
    ``{"forward", "input_grad", "kernel_grad"}``, for example ``"brg:avx512_core"``. The name
    carries the instruction set (see :func:`rounds_to_bfloat16`). Call only when :func:`available`."""
    a = _attributes(image_shape, kernel_shape, strides, padding, groups, precision)
    return _names([*image_shape, *_output_shape(image_shape, kernel_shape, strides, a)[1:], *kernel_shape[:2],
                   *(int(a[k]) for k in _GEOMETRY_ATTRIBUTES)])


def rounds_to_bfloat16(implementation: str) -> bool:
    """Whether a float32 convolution that oneDNN runs with implementation ``implementation``
    in its bf16 math mode (``precision="bfloat16"``) rounds its operands to bfloat16: only
    its kernels for bfloat16 arithmetic units do (AMX, AVX512-BF16: names with ``amx`` or
    ``bf16``); every other kernel keeps exact float32 products."""
    return "amx" in implementation or "bf16" in implementation


def _equations(jaxpr: Jaxpr, primitive: str) -> list:
    """The equations of ``primitive`` in ``jaxpr`` and in the programs inside it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, ClosedJaxpr | Jaxpr):
                    found += _equations(sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub, primitive)
    return found


def record(fn, *args) -> dict:
    """What runs the convolutions of ``fn(*args)`` (traced, not run), for a run's ``results.json``.

    With oneDNN: ``{"kernels": "onednn 3.2.0", "precision": ..., "implementations": [...]}``,
    the sorted implementation names of every convolution's forward pass and both gradients.
    ``precision`` is ``"bfloat16"`` when each of them rounds its operands to bfloat16
    (:func:`rounds_to_bfloat16`), ``"float32"`` when none does, ``"mixed"`` otherwise.
    Without oneDNN calls: ``{"kernels": "xla", "precision": ...}``, ``"bfloat16"`` when a
    convolution of the program takes bfloat16 operands (float32 sums), else ``"float32"``."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    calls = [e for e in _equations(jaxpr, "ffi_call") if e.params["target_name"] == TARGETS["forward"]]
    if not calls:
        bf16 = any(e.invars[0].aval.dtype == jax.numpy.bfloat16 for e in _equations(jaxpr, "conv_general_dilated"))
        return {"kernels": "xla", "precision": "bfloat16" if bf16 else "float32"}
    rounded, names = set(), set()
    for eqn in calls:
        attributes = dict(eqn.params["attributes"])
        image, kernel = (v.aval.shape for v in eqn.invars)
        out = eqn.params["result_avals"][0].shape
        found = _names([*image, *out[1:], *kernel[:2], *(int(attributes[k]) for k in _GEOMETRY_ATTRIBUTES)])
        names.update(found.values())
        rounded.update(bool(attributes["bf16"]) and rounds_to_bfloat16(n) for n in found.values())
    precision = "mixed" if len(rounded) > 1 else "bfloat16" if rounded == {True} else "float32"
    return {"kernels": f"onednn {version()}", "precision": precision, "implementations": sorted(names)}


def same_padding(size: int, kernel: int, strides: int) -> tuple[int, int]:
    """``(before, after)`` padding of one axis of ``size`` pixels for a ``"SAME"``
    convolution (as XLA pads it: the odd pixel after)."""
    total = max((-(-size // strides) - 1) * strides + kernel - size, 0)
    return total // 2, total - total // 2


def padding_pairs(size: tuple[int, int], kernel: tuple[int, int], strides: int, padding: str) -> list[tuple[int, int]]:
    """Explicit ``[(top, bottom), (left, right)]`` padding of ``"SAME"`` or ``"VALID"``."""
    if padding == "VALID":
        return [(0, 0), (0, 0)]
    return [same_padding(n, k, strides) for n, k in zip(size, kernel, strict=True)]


_GEOMETRY_ATTRIBUTES = ("sh", "sw", "pt", "pl", "pb", "pr", "groups", "bf16")


def _attributes(image_shape, kernel_shape, strides: int, padding: str, groups: int, precision: str) -> dict:
    (pt, pb), (pl, pr) = padding_pairs(image_shape[1:3], kernel_shape[:2], strides, padding)
    return {name: np.int64(v) for name, v in
            {"sh": strides, "sw": strides, "pt": pt, "pl": pl, "pb": pb, "pr": pr, "groups": groups,
             "bf16": precision == "bfloat16"}.items()}


def _output_shape(image_shape, kernel_shape, strides: int, a: dict) -> tuple[int, int, int, int]:
    """``[N, H', W', O]`` of a convolution with attributes ``a`` (:func:`_attributes`)."""
    out_h = (image_shape[1] + int(a["pt"] + a["pb"]) - kernel_shape[0]) // strides + 1
    out_w = (image_shape[2] + int(a["pl"] + a["pr"]) - kernel_shape[1]) // strides + 1
    return image_shape[0], out_h, out_w, kernel_shape[3]


def _call(target: str, out_shape, *operands, **attributes) -> jax.Array:
    out = jax.ShapeDtypeStruct(out_shape, np.float32)
    return jax.ffi.ffi_call(TARGETS[target], out, vmap_method="sequential")(*operands, **attributes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d(x: jax.Array, kernel: jax.Array, strides: int, padding: str, groups: int,
           precision: str = "float32") -> jax.Array:
    """oneDNN convolution, float32: ``x [N, H, W, C]``, ``kernel [K, K, C / groups, O]`` ->
    ``[N, H', W', O]``, as ``jax.lax.conv_general_dilated`` with NHWC/HWIO/NHWC
    dimension numbers computes it; both gradients are oneDNN's too. Call only when
    :func:`available`; batching (``vmap``) runs the calls one after another.

    ``precision="bfloat16"`` lets oneDNN round the operands (of the gradients too) to
    bfloat16 and sum their products in float32, where it has a kernel for the CPU's
    bfloat16 units; elsewhere it stays exact float32 (:func:`implementations` tells which,
    per convolution). ``"float32"`` is exact."""
    a = _attributes(x.shape, kernel.shape, strides, padding, groups, precision)
    return _call("forward", _output_shape(x.shape, kernel.shape, strides, a), x, kernel, **a)


def _conv_fwd(x, kernel, strides, padding, groups, precision):
    return conv2d(x, kernel, strides, padding, groups, precision), (x, kernel)


def _conv_bwd(strides, padding, groups, precision, residuals, g):
    x, kernel = residuals
    attributes = _attributes(x.shape, kernel.shape, strides, padding, groups, precision)
    return (_call("input_grad", x.shape, g, kernel, **attributes),
            _call("kernel_grad", kernel.shape, x, g, **attributes))


conv2d.defvjp(_conv_fwd, _conv_bwd)
