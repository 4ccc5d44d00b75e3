"""Batched k-means of layer weights in pure JAX (weight sharing, SPEC section 2).

Many (layer, k) pairs are clustered in one compiled call.  Each row of the batch is one
layer's weights, padded to a common length ``n_max`` and masked; each row has its own
number of clusters ``k`` (a traced int32, ``1 <= k <= k_max``), its own ``spread`` and
``focus``.  Shapes are static: centroid arrays have ``k_max`` entries per row and the
entries ``>= k`` are unused (reported as 0).

Algorithm, per row (all rows run in lock step under ``vmap``):

1. Sort the valid weights (the padding goes to the end) and centre them on their mean.
2. Initialise ``k`` centroids.
   - ``init="dp"`` (default): the exact optimum of 1-D k-means over *bins* of consecutive
     sorted weights, found by dynamic programming.  A row with ``n <= n_bins`` weights has
     one weight per bin, so the DP is the exact global optimum.  Otherwise the
     ``n_bins + 1`` bin edges are the union of ``n_bins // 2`` equal-count bins (resolve the
     dense centre) and ``n_bins // 2`` equal-width bins (resolve sparse outliers).  The DP
     minimises the summed SSE (in the transformed 2-D space when spread/focus are used) of
     ``k`` contiguous runs of bins; run costs come from a numerically stable pairwise
     (Chan/Welford) merge of bin statistics, not from differences of prefix sums of
     squares, which cancel catastrophically in float32.  Cost: ``O(n_bins^2 * k_max)``
     per row.
   - ``init="quantile"``: centroid j is the sorted weight at quantile ``(j + 1/2) / k``
     (first coordinate for 2-D).  Cheaper, but 1-D Lloyd from it often stalls in a poor
     local optimum when the weights have outliers (10-300 % above scikit-learn's SSE on
     LeNet-5-like weights, against <= 0 % for ``"dp"``).
3. Lloyd iterations in a ``lax.while_loop`` until every row has converged (largest
   centroid move ``<= tol * (max(w) - min(w))`` of that row) or ``n_iter`` iterations.
   - Plain 1-D (spread and focus statically zero): clusters are intervals of the sorted
     weights, so an iteration is ``k_max`` binary searches plus prefix sums: ``O(k_max log
     n_max)`` per row, no distance matrix.
   - 2-D (``tanh_transform``): squared Euclidean distances to all centroids in the
     transformed space, ``[n_max, k_max]`` per row.
   An empty cluster keeps its previous centroid (with the DP initialisation every initial
   cluster holds weights, and in 1-D an emptied cluster stays between its neighbours, so
   the centroids stay sorted).
4. A final assignment step to the last centroids; each reported centroid is then the mean
   of the *raw* weights assigned to it, and ``sse`` is the squared error of the raw
   weights to those means.

Memory: rows are processed in chunks of ``batch_size`` rows (``jax.lax.map`` with a
batch size; each chunk is ``vmap``-ed).  Per row the working set is about
``4 * (16 n_max + 3 n_bins^2 + k_max n_bins)`` bytes, plus ``8 n_max k_max`` bytes of
distances on the 2-D path; the default chunk keeps a chunk under 256 MiB (for LeNet-5's
fc1, n_max = 48000, k_max = 50: 68 rows per chunk in 1-D, 12 in 2-D).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

INITS = ("dp", "quantile")
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


def pack_layers(weights: list[np.ndarray]) -> tuple[jax.Array, jax.Array]:
    """Flatten and pad a list of L weight arrays into one batch.

    Returns values float32 [L, n_max] (zero padded) and mask bool [L, n_max], with
    n_max the largest layer size.  Raises ValueError for an empty list, an empty layer or a
    non-finite weight.
    """
    if len(weights) == 0:
        raise ValueError("pack_layers: no layers given")
    flat = [np.asarray(w, dtype=np.float32).reshape(-1) for w in weights]
    for i, w in enumerate(flat):
        if w.size == 0:
            raise ValueError(f"pack_layers: layer {i} has no weights")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"pack_layers: layer {i} has non-finite weights (NaN or inf)")
    n_max = max(w.size for w in flat)
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
    centred = jnp.where(mask, x - mean, 0.0)
    y = jnp.where(mask, spread * (hi - lo) * jnp.tanh(focus * centred), 0.0)
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
    init: str = "dp",
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
    centroid move, relative to the row's weight range (max - min).  init: "dp" or
    "quantile" (see the module docstring).  n_bins: static even number of DP bins,
    >= 2 * k_max.  batch_size: static rows per chunk (default: chunks under 256 MiB).

    Concrete k is checked (ValueError); traced k is clipped to [1, k_max] and must not
    exceed the row's number of valid weights (else some clusters come out empty).
    """
    values = jnp.asarray(values, jnp.float32)
    mask = jnp.asarray(mask, bool)
    if values.ndim != 2 or values.shape != mask.shape:
        raise ValueError(f"kmeans: values and mask must be [B, n_max] of one shape, got {values.shape} and {mask.shape}")
    n_rows, n_max = values.shape
    if not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"kmeans: k_max must be a positive int, got {k_max!r}")
    if init not in INITS:
        raise ValueError(f"kmeans: unknown init {init!r}; choose one of {INITS}")
    if n_bins % 2 or n_bins < 2 * k_max:
        raise ValueError(f"kmeans: n_bins must be even and >= 2 * k_max = {2 * k_max}, got {n_bins}")
    if n_iter < 0:
        raise ValueError(f"kmeans: n_iter must be >= 0, got {n_iter}")
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
        per_row = 4 * (16 * n_max + 3 * n_bins * n_bins + k_max * n_bins + (2 * n_max * k_max if two_d else 0))
        batch_size = int(np.clip(_CHUNK_BYTES // per_row, 1, max(n_rows, 1)))
    return _kmeans_jit(
        values, mask, k, spread, focus, jnp.float32(tol),
        k_max=int(k_max), n_iter=int(n_iter), init=init, n_bins=int(n_bins),
        batch_size=int(batch_size), two_d=two_d,
    )


def _statically_untransformed(spread, focus) -> bool:
    """True when spread and focus are concrete and spread * focus == 0 on every row."""
    if isinstance(spread, jax.core.Tracer) or isinstance(focus, jax.core.Tracer):
        return False
    return bool(np.all(np.asarray(spread) * np.asarray(focus) == 0))


@functools.partial(jax.jit, static_argnames=("k_max", "n_iter", "init", "n_bins", "batch_size", "two_d"))
def _kmeans_jit(values, mask, k, spread, focus, tol, *, k_max, n_iter, init, n_bins, batch_size, two_d):
    row = functools.partial(
        _kmeans_row, tol=tol, k_max=k_max, n_iter=n_iter, init=init, n_bins=n_bins, two_d=two_d
    )
    centroids, assign, sse, n_run = jax.lax.map(
        lambda a: row(*a), (values, mask, jnp.clip(k, 1, k_max), spread, focus), batch_size=batch_size
    )
    return KMeansResult(centroids=centroids, assign=assign, sse=sse, n_iter_run=n_run)


def _kmeans_row(x, m, k, spread, focus, *, tol, k_max, n_iter, init, n_bins, two_d):
    """One row: x [n_max], m [n_max], scalars k, spread, focus -> (centroids, assign, sse, n_iter_run)."""
    n_max = x.shape[0]
    n = jnp.sum(m, dtype=jnp.int32)
    keyed = jnp.where(m, x, jnp.inf)
    order = jnp.argsort(keyed)
    xs = keyed[order]
    valid = jnp.arange(n_max) < n
    w = valid.astype(jnp.float32)
    mu = jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(n, 1)
    xc = jnp.where(valid, xs - mu, 0.0)
    x_inf = jnp.where(valid, xs - mu, jnp.inf)
    width = xs[jnp.maximum(n - 1, 0)] - xs[0]
    tol_abs = tol * width
    coords = [xc]
    if two_d:
        coords.append(tanh_transform(xs, valid, spread, focus)[:, 1])

    if init == "dp":
        start = _dp_init(coords, w, x_inf, n, k, k_max=k_max, n_bins=n_bins)
    else:
        idx = jnp.minimum(((2 * jnp.arange(k_max) + 1) * n) // (2 * k), jnp.maximum(n - 1, 0))
        start = [c[idx] for c in coords]

    active = jnp.arange(k_max) < k
    if two_d:
        step = functools.partial(_lloyd_step_2d, coords=coords, w=w, k=k)
    else:
        prefix = jnp.concatenate([jnp.zeros(1), jnp.cumsum(xc)])
        step = functools.partial(_lloyd_step_1d, x_inf=x_inf, prefix=prefix, n=n, k=k)

    def body(state):
        cents, it, _ = state
        new = step(cents)
        shift = jnp.max(jnp.where(active, jnp.max(jnp.abs(jnp.stack(new) - jnp.stack(cents)), axis=0), 0.0))
        return new, it + 1, shift <= tol_abs

    def cond(state):
        _, it, done = state
        return (it < n_iter) & ~done

    cents, n_run, _ = jax.lax.while_loop(cond, body, (start, jnp.int32(0), jnp.bool_(False)))

    if two_d:
        labels = _nearest_2d(coords, cents, k)
    else:
        mids = jnp.where(jnp.arange(k_max - 1) < k - 1, 0.5 * (cents[0][:-1] + cents[0][1:]), jnp.inf)
        labels = jnp.searchsorted(mids, x_inf, side="left").astype(jnp.int32)
    labels = jnp.where(valid, jnp.minimum(labels, k_max - 1), 0)
    counts = jax.ops.segment_sum(w, labels, k_max)
    sums = jax.ops.segment_sum(w * xc, labels, k_max)
    means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), cents[0])
    sse = jnp.sum(w * (xc - means[labels]) ** 2)
    centroids = jnp.where(active, means + mu, 0.0)
    assign = jnp.zeros(n_max, jnp.int32).at[order].set(jnp.where(valid, labels, -1))
    return centroids, assign, sse, n_run


def _lloyd_step_1d(cents, *, x_inf, prefix, n, k):
    """One Lloyd step on sorted 1-D data: clusters are intervals cut at centroid midpoints.

    cents: [c] with c [k_max] sorted centroids (centred units); x_inf [n_max] sorted centred
    weights, +inf padded; prefix [n_max + 1] prefix sums of the zero-padded weights.
    """
    (c,) = cents
    k_max = c.shape[0]
    cuts = jnp.searchsorted(x_inf, 0.5 * (c[:-1] + c[1:]), side="right").astype(jnp.int32)
    cuts = jnp.where(jnp.arange(k_max - 1) < k - 1, cuts, n)
    edges = jnp.concatenate([jnp.zeros(1, jnp.int32), cuts, n[None]])
    counts = (edges[1:] - edges[:-1]).astype(jnp.float32)
    sums = prefix[edges[1:]] - prefix[edges[:-1]]
    new = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)
    return [jnp.where(jnp.arange(k_max) < k, new, c)]


def _nearest_2d(coords, cents, k):
    """Index of the nearest of the first k centroids: coords list of [n_max], cents list of [k_max]."""
    k_max = cents[0].shape[0]
    dist = sum((p[:, None] - c[None, :]) ** 2 for p, c in zip(coords, cents))
    dist = jnp.where(jnp.arange(k_max)[None, :] < k, dist, jnp.inf)
    return jnp.argmin(dist, axis=1).astype(jnp.int32)


def _lloyd_step_2d(cents, *, coords, w, k):
    """One Lloyd step with distances in the transformed space; cluster means of each coordinate."""
    k_max = cents[0].shape[0]
    labels = _nearest_2d(coords, cents, k)
    counts = jax.ops.segment_sum(w, labels, k_max)
    return [
        jnp.where(counts > 0, jax.ops.segment_sum(w * p, labels, k_max) / jnp.maximum(counts, 1.0), c)
        for p, c in zip(coords, cents)
    ]


def _bin_edges(x_inf, n, n_bins):
    """n_bins + 1 nondecreasing indices into the sorted row, from 0 to n.

    n <= n_bins: one weight per bin (trailing bins empty).  Otherwise the union of
    n_bins // 2 equal-count and n_bins // 2 equal-width bins.
    """
    half = n_bins // 2
    equal_count = (jnp.arange(half + 1) * n) // half
    lo, hi = x_inf[0], x_inf[jnp.maximum(n - 1, 0)]
    thresholds = lo + jnp.arange(half + 1) * ((hi - lo) / half)
    equal_width = jnp.minimum(jnp.searchsorted(x_inf, thresholds, side="left"), n).at[-1].set(n)
    merged = jnp.sort(jnp.concatenate([equal_count, equal_width.astype(equal_count.dtype)]))[1:]
    singles = jnp.minimum(jnp.arange(n_bins + 1), n)
    return jnp.where(n <= n_bins, singles, merged).astype(jnp.int32)


def _dp_init(coords, w, x_inf, n, k, *, k_max, n_bins):
    """Centroids (list of [k_max] per coordinate) of the optimal k contiguous runs of bins."""
    n_max = w.shape[0]
    edges = _bin_edges(x_inf, n, n_bins)
    ids = jnp.clip(jnp.searchsorted(edges, jnp.arange(n_max), side="right") - 1, 0, n_bins - 1)
    counts = jax.ops.segment_sum(w, ids, n_bins)
    means = [jax.ops.segment_sum(w * p, ids, n_bins) / jnp.maximum(counts, 1.0) for p in coords]
    m2 = sum(jax.ops.segment_sum(w * (p - mean[ids]) ** 2, ids, n_bins) for p, mean in zip(coords, means))

    first = jnp.arange(n_bins)

    def merge(state, b):
        # state: statistics of bins a..b-1 for every start a; add bin b to the runs with a <= b.
        cnt_a, means_a, m2_a = state
        cnt_b = counts[b]
        total = cnt_a + cnt_b
        frac_b = jnp.where(total > 0, cnt_b / jnp.maximum(total, 1.0), 0.0)
        deltas = [mb[b] - ma for ma, mb in zip(means_a, means)]
        new_means = [ma + d * frac_b for ma, d in zip(means_a, deltas)]
        new_m2 = m2_a + m2[b] + sum(d * d for d in deltas) * cnt_a * frac_b
        live = first <= b
        state = (
            jnp.where(live, total, cnt_a),
            [jnp.where(live, nm, ma) for nm, ma in zip(new_means, means_a)],
            jnp.where(live, new_m2, m2_a),
        )
        return state, jnp.where(live, new_m2, jnp.inf)

    zeros = jnp.zeros(n_bins)
    _, cost_cols = jax.lax.scan(merge, (zeros, [zeros for _ in coords], zeros), first)
    cost = cost_cols.T  # cost[a, b]: SSE of bins a..b as one cluster (inf for a > b)

    def extend(best, _):
        # best[b]: least SSE of j clusters over bins 0..b; the new last cluster starts at a >= 1.
        cand = best[:-1, None] + cost[1:, :]
        return jnp.min(cand, axis=0), jnp.argmin(cand, axis=0).astype(jnp.int32) + 1

    _, last_start = jax.lax.scan(extend, cost[0], None, length=k_max - 1)

    def backtrack(b, j):
        # j: cluster index from k_max - 1 down to 1; last_start[j - 1] is for j + 1 clusters.
        a = last_start[j - 1, b]
        live = j < k
        return jnp.where(live, a - 1, b), jnp.where(live, a, n_bins)

    _, starts_rev = jax.lax.scan(backtrack, jnp.int32(n_bins - 1), jnp.arange(k_max - 1, 0, -1))
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), starts_rev[::-1]])
    ends = jnp.concatenate([starts[1:], jnp.full(1, n_bins, jnp.int32)])
    lo, hi = edges[starts], edges[ends]
    size = (hi - lo).astype(jnp.float32)
    fallback = jnp.minimum(lo, jnp.maximum(n - 1, 0))
    out = []
    for p in coords:
        prefix = jnp.concatenate([jnp.zeros(1), jnp.cumsum(p)])
        out.append(jnp.where(size > 0, (prefix[hi] - prefix[lo]) / jnp.maximum(size, 1.0), p[fallback]))
    return out
