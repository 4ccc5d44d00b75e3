"""Weight sharing of a trained network (docs/spec.md#weight-sharing): cluster tables, shared networks,
population accuracy, the seed's fitness, and the compressed-model file.

A *shared layer* is every ``kernel`` of the model's ``params`` (biases, batch statistics
and clip ranges stay float and are not counted in the compression rates).  Layers are in
natural order of their parameter paths (``QConv_0``, ``QConv_1``, ..., ``QDense_0``, ...).

The k-means of every shared layer for every ``k`` in ``1..k_max`` is computed once, in
batched calls of :func:`qevo.sharing.kmeans.kmeans`, into a :class:`ClusterTable`: a lookup
table indexed by (layer, k).  A candidate network is then an int32 vector ``k_idx [L]``
(``k - 1`` per layer, ``-1`` = that layer left in float), and its kernels are gathers from
the table, so a population ``[P, L]`` is scored in one compiled call.

Shapes: ``L`` shared layers, ``n_l`` weights of layer ``l``, ``N = sum n_l``, ``P``
individuals, ``K = k_max``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import re
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qevo import checkpoint
from qevo.data.datasets import normalize
from qevo.errors import ConfigError
from qevo.evolution.population import batched_accuracy, population_map, replicated_jit, resolve_strategy
from qevo.models.losses import top1
from qevo.quant.interception import QevoModel
from qevo.sharing.codebook import CODEBOOK_BITS, check_format, model_compression_rates, quantize_codebook
from qevo.sharing.kmeans import kmeans, pack_layers

FORMAT_VERSION = 1
_TABLE_CALL_BYTES = 1 << 30  # rows * n_max * 12 bytes (values, mask, assignments) per k-means call


def _natural_key(path: tuple[str, ...]):
    return [int(t) if t.isdigit() else t for part in path for t in re.split(r"(\d+)", part)]


def kernel_paths(params: dict) -> tuple[tuple[str, ...], ...]:
    """Paths (tuples of names, within ``params``) of every ``kernel``, in natural order."""
    flat = traverse_util.flatten_dict(params)
    return tuple(sorted((p for p in flat if p[-1] == "kernel"), key=_natural_key))


def layer_name(path: tuple[str, ...]) -> str:
    """``"QConv_0/kernel"`` style name of a kernel path."""
    return "/".join(path)


def get_kernels(params: dict, paths) -> list[jax.Array]:
    """The kernels at ``paths`` of ``params``."""
    flat: dict = traverse_util.flatten_dict(params)
    return [flat[p] for p in paths]


def with_kernels(variables: dict, paths, kernels) -> dict:
    """``variables`` with ``params`` kernels at ``paths`` replaced by ``kernels`` (jit-friendly)."""
    flat = dict(traverse_util.flatten_dict(variables["params"]))
    for p, k in zip(paths, kernels, strict=True):
        flat[p] = k
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


@flax.struct.dataclass
class ClusterTable:
    """k-means of every shared layer for every k in 1..K.

    Attributes:
      centroids: float32 ``[L, K, K]``; ``centroids[l, k - 1, :k]`` is layer ``l``'s codebook
        for ``k`` clusters (cluster means of the raw weights), later entries 0.
      assign: uint8 (uint16 when ``K > 256``) ``[K, N]``; ``assign[k - 1, offsets[l]:offsets[l]
        + n_l]`` is the cluster of each weight of layer ``l`` (flattened kernel order).
      sse: float32 ``[L, K]``, squared error of the raw weights to their centroids.
      sizes: static ``(n_0, ..., n_{L-1})``.
      shapes: static kernel shapes.
    """

    centroids: jax.Array
    assign: jax.Array
    sse: jax.Array
    sizes: tuple[int, ...] = flax.struct.field(pytree_node=False)
    shapes: tuple[tuple[int, ...], ...] = flax.struct.field(pytree_node=False)

    @property
    def k_max(self) -> int:
        return self.centroids.shape[1]

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0, *self.sizes[:-1])))


def index_dtype(k_max: int):
    """Smallest unsigned integer type holding cluster indices ``0..k_max - 1``."""
    return np.uint8 if k_max <= 256 else np.uint16


def build_table(kernels, k_max: int, *, n_iter: int = 50, call_bytes: int = _TABLE_CALL_BYTES) -> ClusterTable:
    """Cluster every layer for every k in ``1..k_max``.

    Layers are taken largest first and grouped so that one :func:`qevo.sharing.kmeans.kmeans` call
    holds at most ``call_bytes`` of padded rows (LeNet-5 with ``k_max = 64``: one call of
    320 rows; a network with large layers: several calls, each batched over its layers'
    (layer, k) pairs).

    Args:
      kernels (list): L float arrays (any shapes), finite.
      k_max: largest number of clusters, ``1 <= k_max <= min(n_l)``, at most 128 (the
        k-means DP start uses 256 bins).
      n_iter: Lloyd iteration cap.
      call_bytes: memory bound of one call.

    Raises:
      ValueError: ``k_max`` out of range for these layers.
    """
    kernels = [np.asarray(k, np.float32) for k in kernels]
    sizes = tuple(int(k.size) for k in kernels)
    if not 1 <= k_max <= 128:
        raise ConfigError(f"k_max={k_max} is out of range; use 1..128")
    if k_max > min(sizes):
        raise ConfigError(f"k_max={k_max} exceeds the {min(sizes)} weights of the smallest shared layer; lower k_max")
    n_layers = len(kernels)
    offsets = np.cumsum((0, *sizes[:-1]))
    centroids = np.zeros((n_layers, k_max, k_max), np.float32)
    assign = np.zeros((k_max, sum(sizes)), index_dtype(k_max))
    sse = np.zeros((n_layers, k_max), np.float32)
    order = sorted(range(n_layers), key=lambda i: -sizes[i])
    groups, current = [], []
    for i in order:
        n_max = sizes[current[0]] if current else sizes[i]
        if current and (len(current) + 1) * k_max * n_max * 12 > call_bytes:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    ks = np.arange(1, k_max + 1, dtype=np.int32)
    for group in groups:
        values, mask = pack_layers([kernels[i] for i in group])
        rows = jnp.repeat(jnp.arange(len(group)), k_max)
        result = kmeans(values[rows], mask[rows], np.tile(ks, len(group)), k_max, n_iter=n_iter)
        cents, labels, errs = jax.device_get((result.centroids, result.assign, result.sse))
        for j, i in enumerate(group):
            block = slice(j * k_max, (j + 1) * k_max)
            centroids[i] = cents[block]
            sse[i] = errs[block]
            assign[:, offsets[i] : offsets[i] + sizes[i]] = labels[block, : sizes[i]]
    return ClusterTable(
        centroids=jnp.asarray(centroids), assign=jnp.asarray(assign), sse=jnp.asarray(sse),
        sizes=sizes, shapes=tuple(tuple(k.shape) for k in kernels),
    )


def table_kernels(table: ClusterTable, centroids: jax.Array, k_idx: jax.Array, float_kernels) -> list[jax.Array]:
    """Kernels of one candidate (jit-friendly).

    Args:
      table: the cluster table (its ``assign``, sizes and shapes are used).
      centroids: float32 ``[L, K, K]`` codebooks to gather from (``table.centroids``, or
        those rounded to a codebook format).
      k_idx: int32 ``[L]``, ``k - 1`` per layer, ``-1`` for the float kernel.
      float_kernels: the L float kernels.
    """
    out = []
    for j, (off, n, shape) in enumerate(zip(table.offsets, table.sizes, table.shapes, strict=True)):
        i = jnp.maximum(k_idx[j], 0)
        labels = jax.lax.dynamic_index_in_dim(table.assign[:, off : off + n], i, keepdims=False)
        shared = centroids[j, i][labels.astype(jnp.int32)].reshape(shape)
        out.append(jnp.where(k_idx[j] >= 0, shared, float_kernels[j]))
    return out


def compression_rates(k: jax.Array, sizes, fmt: str):
    """(mean-of-layers CR, size-weighted CR) of cluster counts ``k [..., L]`` (int, >= 1) with
    codebooks of format ``fmt``; float32 ``[...]`` each, jit-friendly."""
    return model_compression_rates(jnp.asarray(sizes, jnp.int32), jnp.asarray(k, jnp.int32),
                                   jnp.int32(CODEBOOK_BITS[fmt]))


@dataclasses.dataclass(frozen=True, eq=False)
class SharedEvaluator:
    """Accuracy (the mean of ``metric``) of populations of weight-shared networks of one float model.

    Attributes:
      model: a qevo model, called on the float path (``bits=None``).
      mean, std: per-channel normalisation of uint8 images.
      paths: kernel paths of the shared layers.
      strategy: ``"auto"``, ``"vmap"`` or ``"map"`` (as :class:`qevo.evolution.population.PopulationEvaluator`).
      chunk_size: individuals per ``lax.map`` step for ``"map"``.
      devices: devices the population calls spread over (default, empty: all, those of every
        process in a multi-process run); compile what calls them with :meth:`jit`.
      metric: ``metric(logits, labels) -> float32 [N]``, a per-example score in [0, 1]
        (default top-1; jit-traceable, :mod:`qevo.models.losses`).
    """

    model: QevoModel
    mean: tuple[float, ...]
    std: tuple[float, ...]
    paths: tuple[tuple[str, ...], ...]
    strategy: str = "auto"
    chunk_size: int | None = None
    devices: tuple = ()
    metric: Callable = top1
    _local: tuple[str, int | None] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        devices = tuple(self.devices or jax.devices())
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "_local", resolve_strategy(self.strategy, self.chunk_size, devices[0].platform))

    def jit(self, fn, **jit_kwargs):
        """``fn`` compiled with its inputs and outputs replicated over :attr:`devices`
        (:func:`qevo.evolution.population.replicated_jit`): how a function that calls
        :meth:`accuracy_of_k` or :meth:`accuracy_of_kernel_sets` is compiled."""
        return replicated_jit(fn, self.devices, **jit_kwargs)

    def _population(self, one, xs):
        return population_map(lambda x, _: one(x), xs, (), self.devices, *self._local)

    def accuracy(self, variables: dict, kernels, batches) -> jax.Array:
        """Mean metric (float32 in [0, 1], NaN on non-finite logits) of ``variables`` with ``kernels``."""
        v = with_kernels(variables, self.paths, kernels)
        return batched_accuracy(lambda x: self.model.apply(v, normalize(x, self.mean, self.std), None, train=False),
                                batches, self.metric)

    def accuracy_of_k(self, variables, table: ClusterTable, centroids, k_idx, batches) -> jax.Array:
        """float32 ``[P]``: accuracy of each row of ``k_idx`` int32 ``[P, L]`` (see :func:`table_kernels`)."""
        floats = get_kernels(variables["params"], self.paths)
        return self._population(
            lambda row: self.accuracy(variables, table_kernels(table, centroids, row, floats), batches), k_idx
        )

    def accuracy_of_kernel_sets(self, variables, kernel_sets, batches) -> jax.Array:
        """float32 ``[V]``: accuracy of V networks; ``kernel_sets`` holds L arrays ``[V, *shape_l]``
        and network ``v`` has kernels ``[x[v] for x in kernel_sets]``.  The compiled function
        depends only on the shapes, so one compilation serves every layer's refinement."""
        return self._population(lambda ks: self.accuracy(variables, list(ks), batches), list(kernel_sets))


def seed_fitness(acc, cr, acc_target, cr_target) -> jax.Array:
    """The seed's Fit = 1 / sqrt((1 - ACC/ACC_t)^2 + (1 - CR/CR_t)^2), maximised.

    acc, cr: float ``[P]``; targets: scalars.  A point exactly on both targets gets
    ``1 / 1e-6`` instead of infinity.
    """
    d = jnp.sqrt((1 - acc / acc_target) ** 2 + (1 - cr / cr_target) ** 2)
    return 1.0 / jnp.maximum(d, 1e-6)


def constrained_fitness(fit, acc, floor) -> jax.Array:
    """float32 ``[P]`` to minimise: ``-fit`` where ``acc >= floor``, else ``1 + (floor - acc)``
    (after every feasible row; closer to the floor is better).  NaN accuracy: ``+inf``."""
    out = jnp.where(acc >= floor, -fit, 1.0 + (floor - acc))
    return jnp.where(jnp.isfinite(acc), out, jnp.inf).astype(jnp.float32)


# ----------------------------------------------------------------- refinement (focus / spread)


def cluster_layer_2d(kernel, k: int, spreads, focuses, *, k_slots: int | None = None, n_iter: int = 50):
    """k-means of one layer in the seed's tanh space for V (spread, focus) pairs, one call.

    The weights are padded to the next power of two, so that a network's layers share a few
    compilations when they also share ``k_slots`` (MobileNetV2's 53 layers of about 30
    sizes: 12 padded sizes); the padding and the slots cost little, as the Lloyd steps loop
    over the first k centroids only.

    Args:
      kernel: float array of one layer (n weights).
      k: clusters, ``1 <= k <= n``.
      spreads, focuses: float ``[V]``.
      k_slots: centroid slots, ``max(k, 2) <= k_slots <= 128`` (default: the next power of
        two from ``max(k, 2)``).

    Returns:
      ``(centroids float32 [V, k_slots], assign int32 [V, n])``; centroid entries from k on
      are 0.
    """
    n = int(np.size(kernel))
    k_slots = 1 << (max(k, 2) - 1).bit_length() if k_slots is None else int(k_slots)
    values, mask = pack_layers([kernel], length=1 << (n - 1).bit_length())
    v = len(spreads)
    values, mask = jnp.repeat(values, v, axis=0), jnp.repeat(mask, v, axis=0)
    result = _kmeans_2d(values, mask, jnp.full(v, k, jnp.int32), jnp.asarray(spreads, jnp.float32),
                        jnp.asarray(focuses, jnp.float32), k_max=k_slots, n_iter=n_iter)
    return result.centroids, result.assign[:, :n]


@functools.partial(jax.jit, static_argnames=("k_max", "n_iter"))
def _kmeans_2d(values, mask, k, spread, focus, *, k_max, n_iter):
    """Traced spread and focus select the 2-D path of :func:`qevo.sharing.kmeans.kmeans`."""
    return kmeans(values, mask, k, k_max, n_iter=n_iter, spread=spread, focus=focus)


def variant_kernels(centroids, assign, shape, fmt: str) -> jax.Array:
    """``[V, *shape]`` kernels from V codebooks ``[V, k_max]`` and assignments ``[V, n]``,
    codebooks rounded to ``fmt``."""
    c = quantize_codebook(centroids, fmt)
    return jnp.take_along_axis(c, assign, axis=1).reshape((-1, *shape))


# ----------------------------------------------------------------- compressed model file


@dataclasses.dataclass(frozen=True)
class Layer:
    """One shared layer as stored: ``indices`` (uint8/uint16, the kernel's shape), its
    codebook of ``k`` entries in float32 (before rounding), ``spread``/``focus`` used."""

    indices: np.ndarray
    codebook: np.ndarray
    spread: float = 0.0
    focus: float = 0.0


def encode_codebook(codebook: np.ndarray, fmt: str) -> tuple[np.ndarray, np.float32]:
    """Storage form of a float32 codebook ``[k]`` in format ``fmt``: ``(values, scale)``.

    float32 and float16: the values in that dtype, scale 1; float8: the e4m3 bit patterns
    (uint8) of ``codebook / scale``; int8: int8 levels.  :func:`decode_codebook` gives back
    exactly ``quantize_codebook(codebook, fmt)``.
    """
    c = np.asarray(codebook, np.float32)
    check_format(fmt)
    if fmt in ("float32", "float16"):
        return c.astype(np.float32 if fmt == "float32" else np.float16), np.float32(1.0)
    absmax = np.float32(np.max(np.abs(c))) if c.size else np.float32(0)
    top = np.float32(448.0 if fmt == "float8" else 127.0)
    scale = np.float32(absmax / top) if absmax > 0 else np.float32(1.0)
    if fmt == "float8":
        bits = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(c / scale).astype(jnp.float8_e4m3fn), jnp.uint8))
        return bits, scale
    return np.clip(np.round(c / scale), -127, 127).astype(np.int8), scale


def decode_codebook(values: np.ndarray, scale, fmt: str) -> np.ndarray:
    """float32 ``[k]`` codebook from its storage form (see :func:`encode_codebook`)."""
    if fmt in ("float32", "float16"):
        return np.asarray(values).astype(np.float32)
    if fmt == "float8":
        floats = jax.lax.bitcast_convert_type(jnp.asarray(values, jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)
        return np.asarray(floats * jnp.float32(scale))
    return np.asarray(jnp.asarray(values, jnp.int8).astype(jnp.float32) * jnp.float32(scale))


def _digest(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(tree, sep="/").items()):
        a = np.ascontiguousarray(leaf)
        h.update(f"{path}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_compressed(path, variables: dict, paths, layers: list[Layer], fmt: str, meta: dict) -> None:
    """Write a compressed model: per shared layer its indices and encoded codebook, the
    other variables (biases, batch statistics, clips) as they are, and a SHA-256 of it all.

    ``meta`` (JSON-able: model name, accuracies, ...) is stored beside; ``load_compressed``
    checks the digest, the format and the shapes.
    """
    params = dict(traverse_util.flatten_dict(jax.device_get(variables["params"])))
    shared = {}
    for i, (p, layer) in enumerate(zip(paths, layers, strict=True)):
        params.pop(p)
        values, scale = encode_codebook(layer.codebook, fmt)
        shared[f"{i:04d}"] = {"indices": np.asarray(layer.indices), "codebook": values,
                              "scale": np.asarray(scale, np.float32)}
    rest = {k: v for k, v in jax.device_get(variables).items() if k != "params"}
    tree = {
        "shared": shared,
        "params": {"/".join(k): np.asarray(v) for k, v in params.items()},
        "rest": rest,
    }
    info = {
        "format_version": FORMAT_VERSION,
        "codebook_format": fmt,
        "layers": [layer_name(p) for p in paths],
        "k": [int(layer.codebook.shape[0]) for layer in layers],
        "spread": [float(layer.spread) for layer in layers],
        "focus": [float(layer.focus) for layer in layers],
        "sha256": _digest(tree),
        **meta,
    }
    checkpoint.save(path, tree, info)


def load_compressed(path, template: dict) -> tuple[dict, dict]:
    """Float variables of a saved compressed model (shared kernels expanded) and its meta.

    Args:
      path (str | os.PathLike): a file written by :func:`save_compressed`.
      template: variables of the model it is loaded into (shapes are checked against it).

    Raises:
      CheckpointError: missing, corrupt (bad digest) or mismatched file (other model,
        shapes, unknown format, index out of its codebook).
    """
    variables, _, meta = read_compressed(path, template)
    return variables, meta


def read_compressed(path, template: dict) -> tuple[dict, list[tuple[np.ndarray, np.ndarray]], dict]:
    """:func:`load_compressed`'s variables and meta, and between them the shared kernels as
    stored, read from the file once: per kernel of :func:`kernel_paths` its ``indices``
    (uint8/uint16, the kernel's shape) and decoded float32 codebook ``[k]``.

    Raises:
      CheckpointError: as :func:`load_compressed`.
    """
    path = pathlib.Path(path)
    tree, meta = checkpoint.load(path)
    err = checkpoint.CheckpointError
    if meta.get("format_version") != FORMAT_VERSION or "sha256" not in meta:
        raise err(f"{path} is not a qevo compressed model (format_version {FORMAT_VERSION}); "
                  "save it with python -m qevo.sharing")
    if _digest(tree) != meta["sha256"]:
        raise err(f"{path} is corrupt: its contents do not match the SHA-256 recorded when it was saved; "
                  "compress the model again")
    fmt = meta["codebook_format"]
    if fmt not in CODEBOOK_BITS:
        raise err(f"{path}: unknown codebook format {fmt!r}")
    paths = kernel_paths(template["params"])
    names = [layer_name(p) for p in paths]
    if meta["layers"] != names:
        raise err(f"{path} holds shared layers {meta['layers']}, but this model has {names}; "
                  "load it into the model it was compressed from")
    flat: dict = traverse_util.flatten_dict(jax.device_get(template["params"]))
    params, shared = {}, {}
    for key, want in flat.items():
        name = "/".join(key)
        if key in paths:
            i = paths.index(key)
            entry = tree["shared"].get(f"{i:04d}") if isinstance(tree.get("shared"), dict) else None
            if entry is None:
                raise err(f"{path} lacks shared layer {name}")
            codebook = decode_codebook(entry["codebook"], entry["scale"], fmt)
            idx = np.asarray(entry["indices"])
            if idx.shape != np.shape(want):
                raise err(f"{path}: layer {name} has indices of shape {idx.shape}, "
                          f"the model expects {np.shape(want)}")
            if idx.size and int(idx.max()) >= codebook.shape[0]:
                raise err(f"{path}: layer {name} has an index {int(idx.max())} "
                          f"beyond its {codebook.shape[0]}-entry codebook")
            params[key] = codebook[idx.astype(np.int64)]
            shared[key] = (idx, codebook)
        else:
            value = tree.get("params", {}).get(name)
            if value is None or np.shape(value) != np.shape(want):
                raise err(f"{path}: parameter {name} is missing or has another shape "
                          f"than this model's {np.shape(want)}")
            params[key] = np.asarray(value)
    variables = {"params": traverse_util.unflatten_dict(params)}
    for collection, value in template.items():
        if collection == "params":
            continue
        stored = tree.get("rest", {}).get(collection)
        if stored is None or (jax.tree_util.tree_map(np.shape, stored)
                              != jax.tree_util.tree_map(np.shape, jax.device_get(value))):
            raise err(f"{path}: collection {collection!r} is missing or does not match this model")
        variables[collection] = stored
    return jax.tree_util.tree_map(jnp.asarray, variables), [shared[p] for p in paths], meta
