"""oneDNN convolutions on the CPU, called from compiled JAX programs as XLA FFI custom calls.

XLA:CPU runs every convolution, forward or backward, through one generic kernel, and its
gradients are slow: a ResNet-20 training step at batch 128 ran at about 190 images/s on a
2-core CPU with XLA's convolutions, against 719 for PyTorch (channels_last) on the same
cores, and at 697 with this module (``python -m benchmarks.train_speed``). PyTorch's CPU
convolutions are oneDNN's direct kernels; this module calls the same library (Intel's
``onednn-cpu-gomp`` wheel, installed with qevo on x86-64 Linux) for the forward pass and
both gradients, inside the compiled program, with no copy: images stay NHWC, kernels HWIO.

The bridge, ``qevo/kernels/onednn_conv.cc``, is compiled on first use with the system
C++ compiler (``$CXX``, else ``c++``) against the installed jaxlib's FFI headers and
oneDNN, and cached under ``<qevo cache>/kernels/`` (see :func:`qevo.data.default_cache_dir`),
keyed by its source and the versions it was built against. Where a part is missing (no
oneDNN wheel for the platform, no compiler) or ``QEVO_ONEDNN=0`` is set,
:func:`available` is False, :func:`status` says why, and qevo keeps XLA's paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import warnings

import jax
import numpy as np

DISABLE_ENV = "QEVO_ONEDNN"
SOURCE = pathlib.Path(__file__).resolve().parent / "kernels" / "onednn_conv.cc"
TARGETS = {"forward": "QevoConvForward", "input_grad": "QevoConvInputGrad", "kernel_grad": "QevoConvKernelGrad"}
RUNTIME, HEADERS = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"


class OneDNNUnavailable(RuntimeError):
    """The oneDNN path cannot be used here; the message says why."""


def _dist_file(dist: str, suffix: str) -> pathlib.Path:
    """The installed file of distribution ``dist`` whose path ends with ``suffix``."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise OneDNNUnavailable(f"the {dist} package is not installed "
                                f"(pip install {dist}; x86-64 Linux only)") from None
    for f in d.files or ():
        if str(f).replace("\\", "/").endswith(suffix):
            return pathlib.Path(d.locate_file(f)).resolve()
    raise OneDNNUnavailable(f"{dist} {d.version} has no {suffix}")


def _build(library: pathlib.Path, include: pathlib.Path, out: pathlib.Path) -> None:
    """Compile the bridge into ``out`` (atomically: a half-written library is never seen)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise OneDNNUnavailable(f"no C++ compiler ({cxx!r} not found; set $CXX or install g++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = pathlib.Path(tmp) / out.name
        cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", f"-I{include}",
               str(SOURCE), str(library), f"-Wl,-rpath,{library.parent}", "-o", str(partial)]
        print(f"qevo: compiling the oneDNN convolution bridge once into {out.parent}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise OneDNNUnavailable(f"compiling {SOURCE.name} failed ({' '.join(cmd)}): {done.stderr.strip()[-2000:]}")
        os.replace(partial, out)


def _load() -> None:
    """Find oneDNN, build the bridge if its cached copy is missing, register the FFI targets."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        raise OneDNNUnavailable(f"disabled by {DISABLE_ENV}=0")
    library = _dist_file(RUNTIME, "/libdnnl.so.3")
    include = _dist_file(HEADERS, "include/oneapi/dnnl/dnnl.hpp").parents[2]
    from qevo.data import default_cache_dir

    key = [SOURCE.read_bytes().decode(), str(library), jax.__version__, importlib.metadata.version(RUNTIME)]
    digest = hashlib.sha1("\0".join(key).encode()).hexdigest()[:16]
    out = default_cache_dir() / "kernels" / digest / "libqevo_onednn.so"
    if not out.exists():
        _build(library, include, out)
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        raise OneDNNUnavailable(f"loading {out} failed: {e}") from None
    for symbol in TARGETS.values():
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def status() -> str | None:
    """None when the oneDNN path is ready (building it on the first call), else why not."""
    try:
        _load()
    except OneDNNUnavailable as e:
        if os.environ.get(DISABLE_ENV) != "0":
            warnings.warn(f"qevo: CPU convolutions use XLA's kernels (slower to train): {e}", stacklevel=2)
        return str(e)
    return None


def available() -> bool:
    """Whether CPU convolutions can run through oneDNN in this process."""
    return status() is None


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


def _attributes(image_shape, kernel_shape, strides: int, padding: str, groups: int, precision: str) -> dict:
    (pt, pb), (pl, pr) = padding_pairs(image_shape[1:3], kernel_shape[:2], strides, padding)
    return {name: np.int64(v) for name, v in
            {"sh": strides, "sw": strides, "pt": pt, "pl": pl, "pb": pb, "pr": pr, "groups": groups,
             "bf16": precision == "bfloat16"}.items()}


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
    bfloat16 and sum their products in float32, on AMX or AVX512-BF16 units where the CPU
    has them (exact float32 where it has neither); ``"float32"`` is exact."""
    a = _attributes(x.shape, kernel.shape, strides, padding, groups, precision)
    out_h = (x.shape[1] + int(a["pt"] + a["pb"]) - kernel.shape[0]) // strides + 1
    out_w = (x.shape[2] + int(a["pl"] + a["pr"]) - kernel.shape[1]) // strides + 1
    return _call("forward", (x.shape[0], out_h, out_w, kernel.shape[3]), x, kernel, **a)


def _conv_fwd(x, kernel, strides, padding, groups, precision):
    return conv2d(x, kernel, strides, padding, groups, precision), (x, kernel)


def _conv_bwd(strides, padding, groups, precision, residuals, g):
    x, kernel = residuals
    attributes = _attributes(x.shape, kernel.shape, strides, padding, groups, precision)
    return (_call("input_grad", x.shape, g, kernel, **attributes),
            _call("kernel_grad", kernel.shape, x, g, **attributes))


conv2d.defvjp(_conv_fwd, _conv_bwd)
