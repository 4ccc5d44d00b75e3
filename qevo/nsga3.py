"""NSGA-III selection machinery (Deb & Jain 2014) in pure JAX, matching pymoo 0.6.

All objectives are minimised. Everything that runs per generation is jit-compiled with
fixed shapes: non-dominated ranking, hyperplane normalisation, association with reference
lines and niche-preserving survival. Rows holding NaN or +-inf are "invalid": they rank in
one front after every finite row, are ignored by the normalisation and are only selected
when nothing else is left. ``igd`` and ``hypervolume`` are numpy helpers for reporting.

Shapes: ``N`` individuals, ``M`` objectives, ``K`` reference directions.
"""

from __future__ import annotations

import functools
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np

_ASF_OFF_AXIS = 1e6  # pymoo's ASF weight for the off-axis objectives (1 / eps, eps = 1e-6)
_ASF_ZERO_BELOW = 1e-3  # translated objective values below this count as 0 in the ASF
_MIN_INTERCEPT = 1e-6  # smaller intercepts (or ranges) make the hyperplane degenerate
_ZERO_RANGE = 1e-12  # replaces a zero normalisation range


def das_dennis(n_obj: int, n_partitions: int) -> np.ndarray:
    """Das-Dennis reference directions on the unit simplex.

    Args:
        n_obj: number of objectives ``M``.
        n_partitions: number of divisions ``p`` of each axis.

    Returns:
        float64 ``[K, M]`` with ``K = C(p + M - 1, M - 1)``; each row is a multiple of ``1/p``
        per coordinate and sums to 1.
    """
    if n_partitions == 0:
        return np.full((1, n_obj), 1.0 / n_obj)
    rows = []
    for bars in itertools.combinations(range(n_partitions + n_obj - 1), n_obj - 1):
        edges = (-1,) + bars + (n_partitions + n_obj - 1,)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(n_obj)])
    return np.asarray(rows, dtype=np.float64) / n_partitions


def _valid_rows(F: jax.Array) -> jax.Array:
    """bool ``[N]``: the row has only finite objective values."""
    return jnp.all(jnp.isfinite(F), axis=1)


def _dominates(A: jax.Array, B: jax.Array) -> jax.Array:
    """bool ``[Na, Nb]``: row ``a`` of ``A [Na, M]`` Pareto-dominates row ``b`` of ``B [Nb, M]``.

    Loops over the (static, small) objective axis so no ``[Na, Nb, M]`` array is built.
    """
    no_worse = jnp.ones((A.shape[0], B.shape[0]), dtype=bool)
    better = jnp.zeros((A.shape[0], B.shape[0]), dtype=bool)
    for m in range(A.shape[1]):
        a, b = A[:, m, None], B[None, :, m]
        no_worse &= a <= b
        better |= a < b
    return no_worse & better


@functools.partial(jax.jit, static_argnames=("block_size",))
def non_dominated_rank(F: jax.Array, block_size: int = 256) -> jax.Array:
    """Pareto front index of every row (0 = non-dominated), as pymoo's NonDominatedSorting.

    The front index of a point is the length of the longest chain of points dominating it.
    Rows are sorted lexicographically, so every dominator of a row precedes it; rows are
    then processed in blocks of ``block_size``: a block's ranks follow from the finished
    ranks of all earlier blocks (block pairs, ``O(N^2 M / 2)`` comparisons in all, memory
    ``O(block_size^2)``) and a fixed-point relaxation inside the block.

    Args:
        F: float ``[N, M]``, minimised.
        block_size: rows per block (static).

    Returns:
        int32 ``[N]``. Duplicated rows share a rank; invalid rows (NaN/inf) all get the rank
        one past the last finite front.
    """
    n, n_obj = F.shape
    valid = _valid_rows(F)
    F_clean = jnp.where(valid[:, None], F, 0)
    keys = [F_clean[:, m] for m in reversed(range(n_obj))] + [~valid]
    order = jnp.lexsort(keys)
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    Fs = jnp.pad(F_clean[order], ((0, pad), (0, 0)))
    vs = jnp.pad(valid[order], (0, pad))

    def block(b):
        start = b * block_size
        return (jax.lax.dynamic_slice_in_dim(Fs, start, block_size),
                jax.lax.dynamic_slice_in_dim(vs, start, block_size))

    def from_earlier_blocks(b, rank):
        Fb, _ = block(b)

        def body(a, best):
            Fa, va = block(a)
            ra = jax.lax.dynamic_slice_in_dim(rank, a * block_size, block_size)
            dom = _dominates(Fa, Fb) & va[:, None]
            return jnp.maximum(best, jnp.max(jnp.where(dom, ra[:, None] + 1, 0), axis=0))

        return jax.lax.fori_loop(0, b, body, jnp.zeros(block_size, jnp.int32))

    def within_block(b, lower):
        Fb, vb = block(b)
        dom = _dominates(Fb, Fb) & vb[:, None]

        def relax(r):
            return jnp.maximum(lower, jnp.max(jnp.where(dom, r[:, None] + 1, 0), axis=0))

        def not_fixed(carry):
            return carry[0]

        def step(carry):
            _, r = carry
            r_new = relax(r)
            return jnp.any(r_new != r), r_new

        return jax.lax.while_loop(not_fixed, step, (jnp.bool_(True), lower))[1]

    def per_block(b, rank):
        r = within_block(b, from_earlier_blocks(b, rank))
        return jax.lax.dynamic_update_slice_in_dim(rank, r, b * block_size, 0)

    rank_sorted = jax.lax.fori_loop(0, n_blocks, per_block,
                                    jnp.zeros(n_blocks * block_size, jnp.int32))[:n]
    rank = jnp.zeros(n, jnp.int32).at[order].set(rank_sorted)
    last_valid = jnp.max(jnp.where(valid, rank, -1))
    return jnp.where(valid, rank, last_valid + 1)


@flax.struct.dataclass
class NSGA3State:
    """Normalisation memory carried across generations (pymoo's HyperplaneNormalization).

    Attributes:
        ideal_point: ``[M]`` component-wise minimum of every finite objective seen so far.
        worst_point: ``[M]`` component-wise maximum of every finite objective seen so far.
        extreme_points: ``[M, M]`` row ``i`` is the extreme point of axis ``i`` from the
            previous generation (``+inf`` before the first one).
    """

    ideal_point: jax.Array
    worst_point: jax.Array
    extreme_points: jax.Array


def init_state(n_obj: int, dtype=jnp.float32) -> NSGA3State:
    """The state before any generation: ideal +inf, worst -inf, no extreme points (+inf)."""
    return NSGA3State(
        ideal_point=jnp.full((n_obj,), jnp.inf, dtype),
        worst_point=jnp.full((n_obj,), -jnp.inf, dtype),
        extreme_points=jnp.full((n_obj, n_obj), jnp.inf, dtype),
    )


def extreme_points(F: jax.Array, candidate: jax.Array, ideal: jax.Array,
                   previous: jax.Array) -> jax.Array:
    """Extreme point of each axis by the achievement scalarising function (pymoo's get_extreme_points_c).

    The candidates are the previous extreme points followed by the rows of ``F`` with
    ``candidate`` set; translated values below 1e-3 count as 0 and off-axis objectives
    are weighted 1e6. Ties go to the first candidate, so old extreme points are kept.

    Args:
        F: float ``[N, M]``.
        candidate: bool ``[N]``, rows that may become extreme points (pymoo: first front).
        ideal: float ``[M]``.
        previous: float ``[M, M]``, last generation's extreme points (+inf rows: none).

    Returns:
        float ``[M, M]``, row ``i`` the extreme point for axis ``i``.
    """
    n_obj = F.shape[1]
    pool = jnp.concatenate([previous, F], axis=0)
    usable = jnp.concatenate([jnp.ones(n_obj, bool), candidate])
    shifted = pool - ideal
    shifted = jnp.where(shifted < _ASF_ZERO_BELOW, 0, shifted)
    weights = jnp.where(jnp.eye(n_obj, dtype=bool), 1.0, _ASF_OFF_AXIS).astype(F.dtype)
    asf = jnp.max(shifted[None, :, :] * weights[:, None, :], axis=2)
    asf = jnp.where(usable[None, :], asf, jnp.inf)
    return pool[jnp.argmin(asf, axis=1)]


def nadir_point(extremes: jax.Array, ideal: jax.Array, worst: jax.Array,
                worst_of_front: jax.Array, worst_of_population: jax.Array) -> jax.Array:
    """Nadir estimate from the hyperplane through the extreme points (pymoo's get_nadir_point).

    Intercepts come from solving ``(E - ideal) x = 1``; if the solve is inaccurate
    (``allclose`` fails, e.g. singular) or an intercept is <= 1e-6 the worst point of the
    first front is used instead; otherwise the nadir is capped at the historic worst point.
    Any axis whose range is then <= 1e-6 takes the worst value of the population.

    Args:
        extremes: ``[M, M]``; ideal, worst, worst_of_front, worst_of_population: ``[M]``.

    Returns:
        float ``[M]``.
    """
    A = extremes - ideal
    ones = jnp.ones_like(ideal)
    plane = jnp.linalg.solve(A, ones)
    intercepts = 1 / plane
    accurate = jnp.all(jnp.abs(A @ plane - ones) <= 1e-8 + 1e-5 * ones)
    usable = accurate & ~jnp.any(intercepts <= _MIN_INTERCEPT)
    from_plane = jnp.minimum(ideal + intercepts, worst)
    nadir = jnp.where(usable, from_plane, worst_of_front)
    return jnp.where(nadir - ideal <= _MIN_INTERCEPT, worst_of_population, nadir)


def normalize(F: jax.Array, state: NSGA3State, first_front: jax.Array | None = None
              ) -> tuple[jax.Array, NSGA3State, jax.Array]:
    """Hyperplane normalisation of ``F``, updating the carried state (pymoo's HyperplaneNormalization.update).

    Args:
        F: float ``[N, M]``, the merged population (all of it counts for the ideal, worst and
            worst-of-population points).
        state: previous generation's :class:`NSGA3State`.
        first_front: bool ``[N]``, the non-dominated rows (extreme-point candidates and
            worst-of-front); computed with :func:`non_dominated_rank` when omitted.

    Returns:
        ``(F_norm [N, M], new state, nadir [M])`` with ``F_norm = (F - ideal) / (nadir - ideal)``
        (a zero range replaced by 1e-12). Invalid rows do not enter any of the points.
    """
    valid = _valid_rows(F)
    if first_front is None:
        first_front = non_dominated_rank(F) == 0
    front = first_front & valid
    ideal = jnp.minimum(state.ideal_point, jnp.min(jnp.where(valid[:, None], F, jnp.inf), axis=0))
    worst_of_population = jnp.max(jnp.where(valid[:, None], F, -jnp.inf), axis=0)
    worst = jnp.maximum(state.worst_point, worst_of_population)
    worst_of_front = jnp.max(jnp.where(front[:, None], F, -jnp.inf), axis=0)
    extremes = extreme_points(F, front, ideal, state.extreme_points)
    nadir = nadir_point(extremes, ideal, worst, worst_of_front, worst_of_population)
    scale = nadir - ideal
    scale = jnp.where(scale == 0, _ZERO_RANGE, scale)
    new_state = NSGA3State(ideal_point=ideal, worst_point=worst, extreme_points=extremes)
    return (F - ideal) / scale, new_state, nadir


def perpendicular_distance(F_norm: jax.Array, ref_dirs: jax.Array) -> jax.Array:
    """float ``[N, K]``: distance from each point to each reference line through the origin.

    Same arithmetic as pymoo's calc_perpendicular_distance, looping over objectives so that
    no ``[N, K, M]`` array is formed.
    """
    ref_dirs = jnp.asarray(ref_dirs, F_norm.dtype)
    n_obj = F_norm.shape[1]
    norm = jnp.sqrt(sum(ref_dirs[:, m] ** 2 for m in range(n_obj)))
    unit = ref_dirs / norm[:, None]
    projection = sum(F_norm[:, m, None] * ref_dirs[None, :, m] for m in range(n_obj)) / norm
    squared = sum((projection * unit[None, :, m] - F_norm[:, m, None]) ** 2 for m in range(n_obj))
    return jnp.sqrt(squared)


def associate(F_norm: jax.Array, ref_dirs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest reference line of each normalised point (pymoo's associate_to_niches).

    Args:
        F_norm: float ``[N, M]`` from :func:`normalize`.
        ref_dirs: ``[K, M]``.

    Returns:
        ``(niche int32 [N], dist float [N])``: index of the closest line (first on ties) and
        the perpendicular distance to it.
    """
    dist = perpendicular_distance(F_norm, ref_dirs)
    niche = jnp.argmin(dist, axis=1).astype(jnp.int32)
    return niche, jnp.take_along_axis(dist, niche[:, None], axis=1)[:, 0]


def _random_subset(mask: jax.Array, n: jax.Array, key: jax.Array) -> jax.Array:
    """bool like ``mask``: ``min(n, mask.sum())`` of its set entries, uniformly at random."""
    size = mask.shape[0]
    priority = jax.random.permutation(key, size)
    order = jnp.argsort(jnp.where(mask, priority, size + priority))
    position = jnp.zeros(size, jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))
    return mask & (position < n)


def _segment_min(values: jax.Array, segment: jax.Array, n_segments: int, empty) -> jax.Array:
    """``[n_segments]`` minimum of ``values`` per segment id, ``empty`` where a segment has none."""
    return jnp.full((n_segments,), empty, values.dtype).at[segment].min(values)


def niching(last_front: jax.Array, n_remaining: jax.Array, niche_count: jax.Array,
            niche: jax.Array, dist: jax.Array, key: jax.Array) -> jax.Array:
    """Niche-preserving choice of ``n_remaining`` members of the last front (pymoo's niching).

    Each round takes the niches, among those still holding an unchosen last-front member,
    with the smallest count; if there are more than places left a random subset of them.
    Every such niche gets one member: the one closest to its line if the niche is empty
    (random among equal distances), else a random one. Counts then grow and rounds repeat.

    Args:
        last_front: bool ``[N]``, members of the front that is split.
        n_remaining: int scalar, places left after the earlier fronts (<= last_front.sum()).
        niche_count: int32 ``[K]``, members of the earlier fronts per niche.
        niche: int32 ``[N]``; dist: float ``[N]``, from :func:`associate`.
        key: PRNG key.

    Returns:
        bool ``[N]``, the chosen last-front members.
    """
    n, n_niches = niche.shape[0], niche_count.shape[0]
    dist = jnp.where(jnp.isnan(dist), jnp.inf, dist)
    index = jnp.arange(n, dtype=jnp.int32)

    def unfinished(carry):
        return carry[2] < n_remaining

    def round_(carry):
        chosen, count, n_chosen, key = carry
        key, k_niche, k_member = jax.random.split(key, 3)
        available = last_front & ~chosen
        has_member = jnp.zeros(n_niches, jnp.int32).at[niche].max(available.astype(jnp.int32)) > 0
        lowest = jnp.min(jnp.where(has_member, count, jnp.iinfo(jnp.int32).max))
        picked_niche = _random_subset(has_member & (count == lowest), n_remaining - n_chosen, k_niche)
        contender = available & picked_niche[niche]
        primary = jnp.where(count[niche] == 0, dist, 0)
        contender &= primary == _segment_min(jnp.where(contender, primary, jnp.inf), niche, n_niches, jnp.inf)[niche]
        bits = jax.random.bits(k_member, (n,), jnp.uint32)
        no_bits = jnp.iinfo(jnp.uint32).max
        contender &= bits == _segment_min(jnp.where(contender, bits, no_bits), niche, n_niches, no_bits)[niche]
        winner = contender & (index == _segment_min(jnp.where(contender, index, n), niche, n_niches, n)[niche])
        count = count + jnp.zeros(n_niches, jnp.int32).at[niche].add(winner.astype(jnp.int32))
        return chosen | winner, count, n_chosen + jnp.sum(winner, dtype=jnp.int32), key

    start = (jnp.zeros(n, bool), niche_count.astype(jnp.int32), jnp.int32(0), key)
    return jax.lax.while_loop(unfinished, round_, start)[0]


@functools.partial(jax.jit, static_argnames=("n_survive",))
def survive(F: jax.Array, ref_dirs: jax.Array, n_survive: int, state: NSGA3State,
            key: jax.Array) -> tuple[jax.Array, NSGA3State]:
    """NSGA-III environmental selection of ``n_survive`` rows of a merged population.

    Fronts are taken whole until the next one would overflow ("last front"); the state
    is updated with the whole population and its first front; the last front is split by
    :func:`niching` with niche counts from the earlier fronts. If the last front is the
    front of invalid rows, a random subset of it fills the remaining places.

    Args:
        F: float ``[N, M]``, e.g. parents and offspring (``N = 2 n_survive``).
        ref_dirs: ``[K, M]`` reference directions.
        n_survive: survivors (static, <= N).
        state: carried normalisation state.
        key: PRNG key (consumed).

    Returns:
        ``(idx int32 [n_survive], new state)``; ``idx`` lists survivors by front, then index.
    """
    n = F.shape[0]
    rank = non_dominated_rank(F)
    last_rank = jnp.sort(rank)[n_survive - 1]
    F_norm, state, _ = normalize(F, state, rank == 0)
    niche, dist = associate(F_norm, ref_dirs)
    earlier = rank < last_rank
    last_front = rank == last_rank
    n_remaining = n_survive - jnp.sum(earlier, dtype=jnp.int32)
    niche_count = jnp.zeros(ref_dirs.shape[0], jnp.int32).at[niche].add(earlier.astype(jnp.int32))
    k_invalid, k_niche = jax.random.split(key)
    invalid_last = ~jnp.any(last_front & _valid_rows(F))
    chosen = jax.lax.cond(
        invalid_last,
        lambda: _random_subset(last_front, n_remaining, k_invalid),
        lambda: niching(last_front, n_remaining, niche_count, niche, dist, k_niche),
    )
    selected = earlier | chosen
    order = jnp.argsort(jnp.where(selected, rank, jnp.iinfo(jnp.int32).max), stable=True)
    return order[:n_survive].astype(jnp.int32), state


def igd(F: np.ndarray, pareto_front: np.ndarray) -> float:
    """Inverted generational distance: mean over ``pareto_front [P, M]`` of the Euclidean
    distance to the nearest row of ``F [N, M]`` (as pymoo's IGD indicator)."""
    F = np.asarray(F, np.float64)
    pareto_front = np.asarray(pareto_front, np.float64)
    d = np.sqrt(((pareto_front[:, None, :] - F[None, :, :]) ** 2).sum(axis=2))
    return float(d.min(axis=1).mean())


def _hv_2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by ``points [n, 2]`` (all strictly better than ``ref [2]``)."""
    points = points[np.lexsort((points[:, 1], points[:, 0]))]
    area, best_y = 0.0, ref[1]
    for x, y in points:
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def _hv_recursive(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume by slicing along the last objective (exact; fine for small fronts)."""
    if points.shape[0] == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(ref[0] - points[:, 0].min())
    if points.shape[1] == 2:
        return _hv_2d(points, ref)
    points = points[np.argsort(points[:, -1], kind="stable")]
    levels = np.append(points[:, -1], ref[-1])
    volume = 0.0
    for i in range(points.shape[0]):
        depth = levels[i + 1] - levels[i]
        if depth > 0:
            volume += depth * _hv_recursive(points[: i + 1, :-1], ref[:-1])
    return volume


def hypervolume(F: np.ndarray, ref_point: np.ndarray) -> float:
    """Exact hypervolume dominated by ``F [N, M]`` and bounded by ``ref_point [M]``.

    Rows not strictly better than the reference point in every objective add nothing
    (as pymoo's HV indicator). Any ``M`` works; cost grows quickly beyond ``M = 4``.
    """
    F = np.asarray(F, np.float64)
    ref_point = np.asarray(ref_point, np.float64)
    inside = np.all(F < ref_point, axis=1)
    return _hv_recursive(F[inside], ref_point)
