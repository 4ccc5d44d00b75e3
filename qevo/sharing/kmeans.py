"""Batched k-means of layer weights in pure JAX (weight sharing, docs/spec.md#clustering).

Many (layer, k) pairs are clustered in one compiled call.  Each row of the batch is one
layer's weights, padded to a common length ``n_max`` and masked; each row has its own
number of clusters ``k`` (an int32 that may be traced, ``1 <= k <= k_max``), its own
``spread`` and ``focus``.  Shapes are static: centroid arrays have ``k_max`` entries per
row, and the entries ``>= k`` are unused (reported as 0).

Algorithm, per row:

1. Sort the valid weights (padding goes to the end) and centre them on their mean.
2. Initialise the k centroids with the exact optimum of 1-D k-means over *bins* of
   consecutive sorted weights, by dynamic programming (no PRNG; deterministic).  A row of
   ``n <= n_bins`` weights has one weight per bin, so there the DP finds the global
   optimum.  Larger rows get ``n_bins`` bins of equal mass under the mean of the empirical
   and the uniform distribution function ("quantiles" of a mixture): no bin holds more
   than ``2 n / n_bins`` weights or spans more than ``2 / n_bins`` of the range, so both the
   dense centre and sparse outliers are resolved.  The DP minimises the summed SSE (in the
   transformed 2-D space when spread/focus are used) of k contiguous runs of bins; run
   costs come from a pairwise (Chan et al.) merge of bin statistics, accurate in float32
   where differences of prefix sums of squares would cancel.  Cost ``O(n_bins^2)`` per row
   and per cluster.
   Plain quantile initialisation (centroid j at quantile (j + 1/2) / k) was tried first
   (NumPy prototype) and rejected: on the tests' LeNet-5-like weights with outliers, Lloyd
   from it ended more than 1 % above scikit-learn's SSE (k-means++, 10 restarts) in 14 of
   20 (layer, k) cases, up to 64x (conv1, k = 50); from the DP start the worst of all
   250 LeNet-5 (layer, k <= 50) pairs of ``benchmarks/kmeans.py`` is 0.06 % above, and
   the median 1.5 % below.  There is no k-means++ option: the DP start needs no PRNG key
   and does better.
3. Lloyd iterations in a ``lax.while_loop`` until every row of the chunk has converged
   (largest centroid move ``<= tol * (max(w) - min(w))`` of that row) or ``n_iter``
   iterations; ``n_iter_run`` counts each row's own iterations.
   - Plain 1-D (spread and focus statically zero): clusters are intervals of the sorted
     weights cut at centroid midpoints, so an iteration is ``k_max`` binary searches plus
     prefix sums, ``O(k_max log n_max)`` per row: no distance matrix.
   - 2-D (``tanh_transform`` space): squared Euclidean distances to every centroid,
     ``O(n_max k)`` per row, as a running minimum over the centroids (no ``[n_max, k_max]``
     array).
   An empty cluster keeps its previous centroid; in 1-D such a centroid stays between its
   neighbours, so the centroids stay sorted.  (Clusters rarely empty out from the DP
   start; a row with fewer distinct values than k is the typical case.)
4. A last assignment step to the final centroids; each reported centroid is the mean of
   the *raw* weights assigned to it (first coordinate), and ``sse`` the squared error of
   the raw weights to those means.

Rows are sorted by k and processed in chunks (``jax.lax.map`` over chunks, each chunk
``vmap``-ed; the DP is batched natively), so a chunk's loops stop near its own largest
k.  Memory per row is about ``4 * (16 n_max + 3 n_bins^2 + k_max n_bins)`` bytes (0.8 MiB
of DP tables at n_bins = 256 and k_max = 50, plus 64 bytes per weight slot); the default
chunk holds as many rows as fit in 256 MiB, e.g. 68 rows at LeNet-5's fc1 size
(n_max = 48000), so all 250 (layer, k) pairs of LeNet-5 run in 4 chunks (measured peak
resident memory of the process: 0.76 GB on CPU, compile included).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.core
import jax.numpy as jnp
import numpy as np

_CHUNK_BYTES = 1 << 28


@flax.struct.dataclass
class KMeansResult:
    """Result of ``kmeans`` for a batch of B rows.

    centroids: float32 [B, k_max], cluster means of the raw weights; entries >= k are 0.
      On the 1-D path the first k entries are in ascending order.
    assign: int32 [B, n_max], the cluster of each weight; -1 at padded (masked) positions.
    sse: float32 [B], sum over the row's weights of (weight - its centroid)^2.
    n_iter_run: int32 [B], Lloyd iterations the row ran before it converged or hit n_iter.
    """

    centroids: jax.Array
    assign: jax.Array
    sse: jax.Array
    n_iter_run: jax.Array


def pack_layers(weights: list[np.ndarray], length: int = 0) -> tuple[jax.Array, jax.Array]:
    """Flatten and pad a list of L weight arrays into one batch.

    Returns values float32 [L, n_max] (zero padded) and mask bool [L, n_max], with
    n_max the largest layer size or ``length`` if that is larger (a fixed length lets
    layers of different sizes share one compiled k-means).  Raises ValueError for an empty
    list, an empty layer or a non-finite weight.
    """
    if len(weights) == 0:
        raise ValueError("pack_layers: no layers given")
    flat = [np.asarray(w, dtype=np.float32).reshape(-1) for w in weights]
    for i, w in enumerate(flat):
        if w.size == 0:
            raise ValueError(f"pack_layers: layer {i} has no weights")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"pack_layers: layer {i} has non-finite weights (NaN or inf)")
    n_max = max(length, *(w.size for w in flat))
    values = np.zeros((len(flat), n_max), np.float32)
    mask = np.zeros((len(flat), n_max), bool)
    for i, w in enumerate(flat):
        values[i, : w.size] = w
        mask[i, : w.size] = True
    return jnp.asarray(values), jnp.asarray(mask)


def tanh_transform(x, mask, spread, focus) -> jax.Array:
    """The seed's 2-D clustering space (its equation 3).

    x, mask: [..., n] weights and validity; spread, focus: broadcastable to x.shape[:-1].
    Returns [..., n, 2]: (x, spread * (max(w) - min(w)) * tanh(focus * (x - mean(w)))),
    with max, min and mean over the valid weights of each row.  spread = 0 or focus = 0
    gives a second coordinate of exactly 0.  The second coordinate is 0 at masked
    positions, whose first coordinate is x unchanged.
    """
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.asarray(mask, bool)
    spread = jnp.asarray(spread, jnp.float32)[..., None]
    focus = jnp.asarray(focus, jnp.float32)[..., None]
    count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(mask, x, 0.0), axis=-1, keepdims=True) / count
    hi = jnp.max(jnp.where(mask, x, -jnp.inf), axis=-1, keepdims=True)
    lo = jnp.min(jnp.where(mask, x, jnp.inf), axis=-1, keepdims=True)
    y = jnp.where(mask, _tanh_coord(jnp.where(mask, x - mean, 0.0), hi - lo, spread, focus), 0.0)
    return jnp.stack([x, y], axis=-1)


def quantize_weights(values, result: KMeansResult) -> jax.Array:
    """Replace every weight by its centroid (the shared weights).

    values [B, n_max] float32, result from ``kmeans`` on those values.  Returns [B, n_max];
    masked positions (assign = -1) keep their value.
    """
    values = jnp.asarray(values, jnp.float32)
    shared = jnp.take_along_axis(result.centroids, jnp.maximum(result.assign, 0), axis=1)
    return jnp.where(result.assign >= 0, shared, values)


def kmeans(
    values,
    mask,
    k,
    k_max: int,
    *,
    n_iter: int = 50,
    spread=0.0,
    focus=0.0,
    tol: float = 1e-6,
    n_bins: int = 256,
    batch_size: int | None = None,
) -> KMeansResult:
    """Cluster each row's valid weights into its own number of clusters.

    values: float [B, n_max]; mask: bool [B, n_max]; k: int [B] (or a scalar), traced or
    concrete, 1 <= k <= min(k_max, valid weights of the row); k_max: static int.
    spread, focus: broadcastable to [B].  When both are concrete (Python or NumPy numbers,
    or concrete arrays) and spread * focus == 0 for every row, the fast 1-D path runs;
    otherwise (traced, or some row transformed) distances are taken in the
    ``tanh_transform`` space, where spread * focus == 0 gives the same clustering as 1-D.
    n_iter: static cap on Lloyd iterations.  tol: convergence threshold on the largest
    centroid move, relative to the row's weight range (max - min).  n_bins: static number
    of DP bins, >= 2 * k_max.  batch_size: static rows per chunk (default: chunks under
    256 MiB).  Weights must be finite (``pack_layers`` checks).

    Concrete k is checked (ValueError); traced k is clipped to [1, k_max] and must not
    exceed the row's number of valid weights (else some clusters come out empty).
    """
    values = jnp.asarray(values, jnp.float32)
    mask = jnp.asarray(mask, bool)
    if values.ndim != 2 or values.shape != mask.shape:
        raise ValueError(f"kmeans: values and mask must be [B, n_max] of one shape, "
                         f"got {values.shape} and {mask.shape}")
    n_rows, n_max = values.shape
    if not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"kmeans: k_max must be a positive int, got {k_max!r}")
    if n_bins < 2 * k_max:
        raise ValueError(f"kmeans: n_bins must be >= 2 * k_max = {2 * k_max}, got {n_bins}")
    if n_iter < 0:
        raise ValueError(f"kmeans: n_iter must be >= 0, got {n_iter}")
    if n_max >= 1 << 24:
        raise ValueError(f"kmeans: rows of {n_max} weights; at most 2^24 - 1 (float32 counts stay exact below 2^24)")
    if not isinstance(k, jax.core.Tracer) and not isinstance(mask, jax.core.Tracer):
        k_np = np.broadcast_to(np.asarray(k), (n_rows,))
        n_valid = np.asarray(mask).sum(axis=1)
        bad = (k_np < 1) | (k_np > k_max) | (k_np > n_valid)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"kmeans: row {i} asks for k={int(k_np[i])} clusters; need 1 <= k <= min(k_max={k_max}, "
                f"valid weights={int(n_valid[i])})"
            )
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (n_rows,))
    spread = jnp.broadcast_to(jnp.asarray(spread, jnp.float32), (n_rows,))
    focus = jnp.broadcast_to(jnp.asarray(focus, jnp.float32), (n_rows,))
    two_d = not _statically_untransformed(spread, focus)
    if batch_size is None:
        per_row = 4 * (16 * n_max + 3 * n_bins * n_bins + k_max * n_bins)
        batch_size = max(1, _CHUNK_BYTES // per_row)
    if batch_size < 1:
        raise ValueError(f"kmeans: batch_size must be >= 1, got {batch_size}")
    n_chunks = -(-n_rows // batch_size)
    return _kmeans_jit(
        values, mask, k, spread, focus, jnp.float32(tol),
        k_max=int(k_max), n_iter=int(n_iter), n_bins=int(n_bins),
        n_chunks=n_chunks, chunk=-(-n_rows // n_chunks), two_d=two_d,
    )


def _statically_untransformed(spread, focus) -> bool:
    """True when spread and focus are concrete and spread * focus == 0 on every row."""
    if isinstance(spread, jax.core.Tracer) or isinstance(focus, jax.core.Tracer):
        return False
    return bool(np.all(np.asarray(spread) * np.asarray(focus) == 0))


@functools.partial(jax.jit, static_argnames=("k_max", "n_iter", "n_bins", "n_chunks", "chunk", "two_d"))
def _kmeans_jit(values, mask, k, spread, focus, tol, *, k_max, n_iter, n_bins, n_chunks, chunk, two_d):
    """Rows sorted by k (so that the loops of a chunk stop at similar counts), padded to
    n_chunks * chunk rows (padding rows: one valid weight, k = 1), run chunk by chunk."""
    n_rows, _n_max = values.shape
    pad = n_chunks * chunk - n_rows
    k = jnp.clip(k, 1, k_max)
    order = jnp.argsort(k)
    values = jnp.pad(values[order], ((0, pad), (0, 0)))
    mask = jnp.pad(mask[order], ((0, pad), (0, 0))).at[n_rows:, 0].set(True)
    k = jnp.pad(k[order], (0, pad), constant_values=1)
    spread = jnp.pad(spread[order], (0, pad))
    focus = jnp.pad(focus[order], (0, pad))
    run = functools.partial(_kmeans_chunk, tol=tol, k_max=k_max, n_iter=n_iter, n_bins=n_bins, two_d=two_d)
    chunked = [a.reshape((n_chunks, chunk, *a.shape[1:])) for a in (values, mask, k, spread, focus)]
    out = jax.lax.map(lambda a: run(*a), chunked)
    back = jnp.zeros(n_rows, jnp.int32).at[order].set(jnp.arange(n_rows, dtype=jnp.int32))
    centroids, assign, sse, n_run = (o.reshape((n_chunks * chunk, *o.shape[2:]))[back] for o in out)
    return KMeansResult(centroids=centroids, assign=assign, sse=sse, n_iter_run=n_run)


class _Row(NamedTuple):
    """One row's weights, sorted and centred (n_max entries; the n valid ones first).

    n: int32 valid count; mu: mean of the valid weights; width: max - min;
    x_inf: sorted centred weights, +inf padded; coords [d, n_max]: sorted centred weights
    (and the tanh coordinate when d = 2), zero padded; prefix [d, n_max + 1]: their prefix
    sums; w [n_max]: 1 at valid entries.
    """

    n: jax.Array
    mu: jax.Array
    width: jax.Array
    x_inf: jax.Array
    coords: jax.Array
    prefix: jax.Array
    w: jax.Array


def _prepare_row(x, m, spread, focus, *, two_d) -> _Row:
    """Sort and centre one row x [n_max] with mask m; the tanh coordinate when two_d."""
    n_max = x.shape[0]
    n = jnp.sum(m, dtype=jnp.int32)
    xs = _sort_floats(jnp.where(m, x, jnp.inf))
    valid = jnp.arange(n_max) < n
    mu = jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(n, 1)
    width = xs[jnp.maximum(n - 1, 0)] - xs[0]
    xc = jnp.where(valid, xs - mu, 0.0)
    coords = [xc]
    if two_d:
        coords.append(jnp.where(valid, _tanh_coord(xc, width, spread, focus), 0.0))
    coords = jnp.stack(coords)
    prefix = jnp.pad(jnp.cumsum(coords, axis=1), ((0, 0), (1, 0)))
    return _Row(n, mu, width, jnp.where(valid, xs - mu, jnp.inf), coords, prefix, valid.astype(jnp.float32))


def _kmeans_chunk(values, mask, k, spread, focus, *, tol, k_max, n_iter, n_bins, two_d):
    """A chunk of C rows: values, mask [C, n_max]; k, spread, focus [C]."""
    rows = jax.vmap(functools.partial(_prepare_row, two_d=two_d))(values, mask, spread, focus)
    edges, cost = jax.vmap(functools.partial(_bin_costs, n_bins=n_bins))(rows)
    last_start = _dp_last_starts(cost, k, k_max)
    start = jax.vmap(_dp_centroids)(rows, edges, last_start, k)
    refine = functools.partial(_refine_row, tol=tol, n_iter=n_iter, two_d=two_d)
    return jax.vmap(refine)(rows, start, values, mask, k, spread, focus)


def _refine_row(row: _Row, start, x, m, k, spread, focus, *, tol, n_iter, two_d):
    """Lloyd iterations from start [d, k_max], then the final assignment of the raw row x [n_max].

    Returns (centroids [k_max], assign [n_max], sse, n_iter_run).
    """
    k_max = start.shape[1]
    active = jnp.arange(k_max) < k
    tol_abs = tol * row.width
    step = _lloyd_step_2d if two_d else _lloyd_step_1d

    def body(state):
        cents, it, _ = state
        new = step(row, cents, k)
        shift = jnp.max(jnp.where(active, jnp.abs(new - cents), 0.0))
        return new, it + 1, shift <= tol_abs

    def cond(state):
        _, it, done = state
        return (it < n_iter) & ~done

    cents, n_run, _ = jax.lax.while_loop(cond, body, (start, jnp.int32(0), jnp.bool_(False)))

    x0 = jnp.where(m, x - row.mu, 0.0)
    if two_d:
        labels = _nearest(jnp.stack([x0, _tanh_coord(x0, row.width, spread, focus)]), cents, k)
    else:
        mids = jnp.where(jnp.arange(k_max - 1) < k - 1, 0.5 * (cents[0, :-1] + cents[0, 1:]), jnp.inf)
        labels = jnp.searchsorted(mids, x0, side="left").astype(jnp.int32)
    labels = jnp.where(m, labels, 0)
    wm = m.astype(jnp.float32)
    counts = jax.ops.segment_sum(wm, labels, k_max)
    sums = jax.ops.segment_sum(wm * x0, labels, k_max)
    means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), cents[0])
    sse = jnp.sum(wm * (x0 - means[labels]) ** 2)
    return jnp.where(active, means + row.mu, 0.0), jnp.where(m, labels, -1), sse, n_run


def _sort_floats(x):
    """Ascending sort of a float32 vector (no NaN) through order-preserving int32 keys.

    XLA's CPU sort is several times faster on int32 keys than on floats.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    keys = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    keys = jax.lax.sort(keys, is_stable=False)
    return jax.lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ jnp.int32(0x7FFFFFFF), keys), jnp.float32)


def _tanh_coord(centred, width, spread, focus):
    """Second coordinate of the seed's transform from centred weights and the range max - min."""
    return spread * width * jnp.tanh(focus * centred)


def _lloyd_step_1d(row: _Row, cents, k):
    """One Lloyd step on sorted 1-D weights: the clusters are the intervals between the
    midpoints of consecutive (sorted) centroids, found by binary search; their sums come
    from prefix sums.  cents [1, k_max] -> [1, k_max]."""
    c = cents[0]
    k_max = c.shape[0]
    cuts = jnp.searchsorted(row.x_inf, 0.5 * (c[:-1] + c[1:]), side="right").astype(jnp.int32)
    cuts = jnp.where(jnp.arange(k_max - 1) < k - 1, cuts, row.n)
    edges = jnp.concatenate([jnp.zeros(1, jnp.int32), cuts, row.n[None]])
    counts = (edges[1:] - edges[:-1]).astype(jnp.float32)
    sums = row.prefix[0, edges[1:]] - row.prefix[0, edges[:-1]]
    new = jnp.where((counts > 0) & (jnp.arange(k_max) < k), sums / jnp.maximum(counts, 1.0), c)
    return new[None]


def _nearest(points, cents, k):
    """Nearest of the first k centroids (ties: the lowest index): points [d, n], cents
    [d, k_max] -> int32 [n].  A running minimum over the centroids, vectorised over the
    points (on CPU about 10x faster than an argmin over a [n, k_max] distance matrix)."""

    def visit(j, acc):
        low, arg = acc
        dist = jnp.sum((points - cents[:, j, None]) ** 2, axis=0)
        better = dist < low
        return jnp.where(better, dist, low), jnp.where(better, j, arg)

    n = points.shape[1]
    init = (jnp.full(n, jnp.inf), jnp.zeros(n, jnp.int32))
    return jax.lax.fori_loop(0, k, visit, init)[1]


def _lloyd_step_2d(row: _Row, cents, k):
    """One Lloyd step with squared Euclidean distances in the transformed space; new
    centroids are the cluster means of both coordinates.  cents [2, k_max] -> [2, k_max]."""
    k_max = cents.shape[1]
    labels = _nearest(row.coords, cents, k)
    counts = jax.ops.segment_sum(row.w, labels, k_max)
    sums = jax.vmap(lambda p: jax.ops.segment_sum(row.w * p, labels, k_max))(row.coords)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), cents)


def _bin_costs(row: _Row, *, n_bins):
    """Bin edges (int32 [n_bins + 1], indices into the sorted row) and cost [n_bins, n_bins]:
    cost[a, b] is the SSE (summed over coordinates) of bins a..b as one cluster, +inf for
    a > b.  Bins are merged pairwise (Chan et al.'s update), which stays accurate in float32.

    n <= n_bins: one weight per bin (trailing bins empty), so the DP is exact.  Otherwise
    bins of equal mass under G = (rank / n + (w - min) / (max - min)) / 2, the mean of the
    empirical and the uniform distribution function: no bin holds more than 2 n / n_bins
    weights (resolves the dense centre) or spans more than 2 / n_bins of the range
    (resolves sparse outliers).  G rises along the sorted row, so every bin is a run.
    """
    n, n_max = row.n, row.w.shape[0]
    rank = jnp.arange(n_max)
    uniform_cdf = jnp.clip((row.x_inf - row.x_inf[0]) / jnp.where(row.width > 0, row.width, 1.0), 0.0, 1.0)
    mixture = 0.5 * rank / jnp.maximum(n, 1) + 0.5 * uniform_cdf
    ids = jnp.where(n <= n_bins, rank, jnp.floor(n_bins * mixture).astype(jnp.int32))
    ids = jnp.clip(ids, 0, n_bins - 1)
    counts = jax.ops.segment_sum(row.w, ids, n_bins, indices_are_sorted=True)
    upper = jnp.triu(jnp.ones((n_bins, n_bins), jnp.float32))
    edges = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.round(counts @ upper).astype(jnp.int32)])  # exact below 2^24
    sums = jax.vmap(lambda p: jax.ops.segment_sum(p, ids, n_bins, indices_are_sorted=True))(row.coords)
    means = sums / jnp.maximum(counts, 1.0)
    m2 = jax.ops.segment_sum(
        row.w * jnp.sum((row.coords - means[:, ids]) ** 2, axis=0), ids, n_bins, indices_are_sorted=True
    )

    first = jnp.arange(n_bins)

    def merge(state, b):
        # state: statistics of the runs a..b-1 for every start a; bin b joins the runs with a <= b.
        cnt_a, means_a, m2_a = state
        total = cnt_a + counts[b]
        frac_b = jnp.where(total > 0, counts[b] / jnp.maximum(total, 1.0), 0.0)
        delta = means[:, b, None] - means_a
        new_m2 = m2_a + m2[b] + jnp.sum(delta * delta, axis=0) * cnt_a * frac_b
        live = first <= b
        state = (
            jnp.where(live, total, cnt_a),
            jnp.where(live, means_a + delta * frac_b, means_a),
            jnp.where(live, new_m2, m2_a),
        )
        return state, jnp.where(live, new_m2, jnp.inf)

    zeros = jnp.zeros(n_bins)
    _, cost_cols = jax.lax.scan(merge, (zeros, jnp.zeros_like(means), zeros), first)
    return edges, cost_cols.T


def _dp_last_starts(cost, k, k_max):
    """Dynamic programme over runs of bins, natively batched over the chunk.

    cost [C, M, M] from ``_bin_costs``; k [C].  Returns int32 [C, k_max - 1, M]: entry
    [r, j - 1, b] is the first bin of the last cluster in the best split of bins 0..b into
    j + 1 clusters (ties: the smallest).  Runs max(k) - 1 steps of an O(M^2) (min, +)
    product per row, each as a running minimum over the start bin a (vectorised over rows
    and end bins b, which XLA on CPU runs faster than a min/argmin over a minor axis).
    """
    n_rows, n_bins, _ = cost.shape

    def extend(j, state):
        best, table = state

        def candidate(a, acc):
            low, arg = acc
            value = best[:, a - 1, None] + cost[:, a, :]
            better = value < low
            return jnp.where(better, value, low), jnp.where(better, a, arg)

        init = (jnp.full((n_rows, n_bins), jnp.inf), jnp.ones((n_rows, n_bins), jnp.int32))
        low, arg = jax.lax.fori_loop(1, n_bins, candidate, init)
        return low, table.at[:, j].set(arg)

    table = jnp.ones((n_rows, k_max - 1, n_bins), jnp.int32)
    _, table = jax.lax.fori_loop(0, jnp.max(k) - 1, extend, (cost[:, 0, :], table))
    return table


def _dp_centroids(row: _Row, edges, last_start, k):
    """Backtrack the DP for this row's k: [d, k_max] means of the k runs (unused entries:
    the last valid weight)."""
    k_max = last_start.shape[0] + 1
    n_bins = edges.shape[0] - 1

    def backtrack(b, j):
        # j: cluster index from k_max - 1 down to 1.
        a = last_start[j - 1, b]
        live = j < k
        return jnp.where(live, a - 1, b), jnp.where(live, a, n_bins)

    _, starts_rev = jax.lax.scan(backtrack, jnp.int32(n_bins - 1), jnp.arange(k_max - 1, 0, -1))
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), starts_rev[::-1]])
    ends = jnp.concatenate([starts[1:], jnp.full(1, n_bins, jnp.int32)])
    lo, hi = edges[starts], edges[ends]
    size = (hi - lo).astype(jnp.float32)
    fallback = row.coords[:, jnp.minimum(lo, jnp.maximum(row.n - 1, 0))]
    return jnp.where(size > 0, (row.prefix[:, hi] - row.prefix[:, lo]) / jnp.maximum(size, 1.0), fallback)
