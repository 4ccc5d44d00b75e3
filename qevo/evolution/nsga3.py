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

import flax.struct
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
        edges = (-1, *bars, n_partitions + n_obj - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(n_obj)])
    return np.asarray(rows, dtype=np.float64) / n_partitions


def _valid_rows(F: jax.Array) -> jax.Array:
    """bool ``[N]``: the row has only finite objective values."""
    return jnp.all(jnp.isfinite(F), axis=1)


def _no_worse(A: jax.Array, B: jax.Array, first: int) -> jax.Array:
    """bool ``[Na, Nb]``: ``A[a, m] <= B[b, m]`` for every objective ``m >= first``.

    Loops over the (static, small) objective axis so no ``[Na, Nb, M]`` array is built.
    """
    no_worse = jnp.ones((A.shape[0], B.shape[0]), dtype=bool)
    for m in range(first, A.shape[1]):
        no_worse &= A[:, m, None] <= B[None, :, m]
    return no_worse


def _rank_tiling(backend: str) -> tuple[int, int | None]:
    """Default ``(block_size, chunk_blocks)`` of :func:`non_dominated_rank` for a backend.

    On CPU small blocks against one earlier block at a time do the fewest comparisons; an
    accelerator pays per sequential step instead, so it takes bigger blocks and compares each
    against all earlier rows in one step.
    """
    return (256, 1) if backend == "cpu" else (1024, None)


@functools.partial(jax.jit, static_argnames=("block_size", "chunk_blocks"))
def non_dominated_rank(F: jax.Array, block_size: int | None = None, chunk_blocks: int | None = None) -> jax.Array:
    """Pareto front index of every row (0 = non-dominated), as pymoo's NonDominatedSorting.

    The front index of a point is the length of the longest chain of points dominating it.
    Rows are sorted lexicographically, so every dominator of a row precedes it, and a row
    dominates another exactly when it is no worse in every objective and not identical
    (runs of identical rows get one id). Rows are processed in blocks of ``block_size``:
    a block's ranks follow from the finished ranks of all earlier rows (compared
    ``chunk_blocks`` blocks at a time; the first objective needs no comparison there as it
    is sorted) and a fixed-point relaxation inside the block. About ``N^2 M / 2``
    comparisons in all (up to ``N^2 M`` with big chunks), memory
    ``O(N M + chunk_blocks * block_size^2)``.

    Args:
        F: float ``[N, M]``, minimised.
        block_size: rows per block (static); None = 256 on CPU, 1024 on accelerators.
        chunk_blocks: earlier blocks compared in one step (static); None = 1 on CPU, all
            on accelerators.

    Returns:
        int32 ``[N]``. Duplicated rows share a rank; invalid rows (NaN/inf) all get the rank
        one past the last finite front.
    """
    n, n_obj = F.shape
    default_block, default_chunk = _rank_tiling(jax.default_backend())
    block_size = block_size or default_block
    n_blocks = -(-n // block_size)
    chunk_blocks = min(chunk_blocks or default_chunk or n_blocks, n_blocks)
    chunk = chunk_blocks * block_size
    length = -(-n_blocks // chunk_blocks) * chunk
    valid = _valid_rows(F)
    F_clean = jnp.where(valid[:, None], F, 0)
    keys = [F_clean[:, m] for m in reversed(range(n_obj))] + [~valid]
    order = jnp.lexsort(keys)
    Fs = jnp.pad(F_clean[order], ((0, length - n), (0, 0)))
    vs = jnp.pad(valid[order], (0, length - n))
    position = jnp.arange(length, dtype=jnp.int32)
    starts_run = jnp.concatenate([jnp.ones(1, bool), jnp.any(Fs[1:] != Fs[:-1], axis=1) | (vs[1:] != vs[:-1])])
    run = jax.lax.cummax(jnp.where(starts_run, position, 0))

    def rows(start, size):
        return (jax.lax.dynamic_slice_in_dim(Fs, start, size),
                jax.lax.dynamic_slice_in_dim(vs, start, size),
                jax.lax.dynamic_slice_in_dim(run, start, size))

    def dominates(Fa, va, run_a, Fb, run_b, first):
        return _no_worse(Fa, Fb, first) & (run_a[:, None] != run_b[None, :]) & va[:, None]

    def from_earlier_rows(b, rank):
        Fb, _, run_b = rows(b * block_size, block_size)

        def body(c, best):
            Fa, va, run_a = rows(c * chunk, chunk)
            earlier = jax.lax.dynamic_slice_in_dim(position, c * chunk, chunk) < b * block_size
            ra = jax.lax.dynamic_slice_in_dim(rank, c * chunk, chunk)
            dom = dominates(Fa, va & earlier, run_a, Fb, run_b, 1)
            return jnp.maximum(best, jnp.max(jnp.where(dom, ra[:, None] + 1, 0), axis=0))

        n_chunks = (b + chunk_blocks - 1) // chunk_blocks
        return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros(block_size, jnp.int32))

    def within_block(b, lower):
        Fb, vb, run_b = rows(b * block_size, block_size)
        dom = dominates(Fb, vb, run_b, Fb, run_b, 0)

        def relax(r):
            return jnp.maximum(lower, jnp.max(jnp.where(dom, r[:, None] + 1, 0), axis=0))

        def step(carry):
            _, r = carry
            r_new = relax(relax(r))  # two steps per convergence test: half the loop's round trips
            return jnp.any(r_new != r), r_new

        return jax.lax.while_loop(lambda carry: carry[0], step, (jnp.bool_(True), lower))[1]

    def per_block(b, rank):
        r = within_block(b, from_earlier_rows(b, rank))
        return jax.lax.dynamic_update_slice_in_dim(rank, r, b * block_size, 0)

    rank_sorted = jax.lax.fori_loop(0, n_blocks, per_block, jnp.zeros(length, jnp.int32))[:n]
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


@jax.jit
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


@jax.jit
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
    residual = jnp.dot(A, plane, precision=jax.lax.Precision.HIGHEST) - ones
    accurate = jnp.all(jnp.abs(residual) <= 1e-8 + 1e-5 * ones)  # numpy.allclose(A @ plane, 1)
    usable = accurate & ~jnp.any(intercepts <= _MIN_INTERCEPT)
    from_plane = jnp.minimum(ideal + intercepts, worst)
    nadir = jnp.where(usable, from_plane, worst_of_front)
    return jnp.where(nadir - ideal <= _MIN_INTERCEPT, worst_of_population, nadir)


@jax.jit
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
        first_front = jnp.equal(non_dominated_rank(F), 0)
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


@jax.jit
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


def _random_subset(mask: jax.Array, n: jax.Array, priority: jax.Array) -> jax.Array:
    """bool like ``mask``: the ``min(n, mask.sum())`` set entries with the smallest random
    ``priority`` (uint32, same shape; equal priorities go to the lower index)."""
    size = mask.shape[0]
    order = jnp.lexsort((priority, ~mask))
    position = jnp.zeros(size, jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))
    return mask & (position < n)


def _segment_min(values: jax.Array, segment: jax.Array, n_segments: int, empty) -> jax.Array:
    """``[n_segments]`` minimum of ``values`` per segment id, ``empty`` where a segment has none."""
    return jnp.full((n_segments,), empty, values.dtype).at[segment].min(values)


def _water_level(available: jax.Array, count: jax.Array, n_places: jax.Array, top: int) -> jax.Array:
    """Largest level ``L`` in ``[0, top]`` with ``sum(min(available, max(0, L - count))) <= n_places``.

    Binary search with a static number of steps; ``available`` and ``count`` are int32 ``[K]``.
    """

    def placed(level):
        return jnp.sum(jnp.minimum(available, jnp.maximum(0, level - count)))

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi + 1) // 2
        fits = placed(mid) <= n_places
        return jnp.where(fits, mid, lo), jnp.where(fits, hi, jnp.maximum(lo, mid - 1))

    return jax.lax.fori_loop(0, int(top).bit_length(), step, (jnp.int32(0), jnp.int32(top)))[0]


def niching(last_front: jax.Array, n_remaining: jax.Array, niche_count: jax.Array,
            niche: jax.Array, dist: jax.Array, key: jax.Array) -> jax.Array:
    """Niche-preserving choice of ``n_remaining`` members of the last front (pymoo's niching).

    pymoo fills niches in rounds: each round every niche with the lowest count, among those
    still holding an unchosen last-front member, gets one member (a random subset of these
    niches in the final, partial round); the first member of an empty niche is the one
    closest to its line (random among equal distances), any later one is random. The result
    of these rounds is computed here in one pass with the same distribution: the rounds
    raise every niche to a common "water level" ``L`` (niche ``j`` gets
    ``min(available_j, max(0, L - count_j))`` members), a random subset of the niches that
    could go one higher takes the places left, and each niche takes its quota from its
    members ordered closest-first (empty niches only) and otherwise at random.

    Args:
        last_front: bool ``[N]``, members of the front that is split.
        n_remaining: int scalar, places left after the earlier fronts (<= last_front.sum()).
        niche_count: int32 ``[K]``, members of the earlier fronts per niche.
        niche: int32 ``[N]``; dist: float ``[N]``, from :func:`associate` (NaN counts as +inf).
        key: PRNG key.

    Returns:
        bool ``[N]``, the chosen last-front members (``n_remaining`` of them).
    """
    n, n_niches = niche.shape[0], niche_count.shape[0]
    count = niche_count.astype(jnp.int32)
    bits = jax.random.bits(key, (n_niches + n,), jnp.uint32)
    niche_bits, member_bits = bits[:n_niches], bits[n_niches:]
    available = jnp.zeros(n_niches, jnp.int32).at[niche].add(last_front.astype(jnp.int32))
    level = _water_level(available, count, n_remaining, 2 * n + 1)
    share = jnp.minimum(available, jnp.maximum(0, level - count))
    could_rise = (count <= level) & (available > level - count)
    quota = share + _random_subset(could_rise, n_remaining - jnp.sum(share), niche_bits)

    dist = jnp.where(jnp.isnan(dist), jnp.inf, dist)
    index = jnp.arange(n, dtype=jnp.int32)
    no_bits = jnp.uint32(jnp.iinfo(jnp.uint32).max)
    closest = last_front & (count[niche] == 0)
    closest &= dist == _segment_min(jnp.where(closest, dist, jnp.inf), niche, n_niches, jnp.inf)[niche]
    closest &= member_bits == _segment_min(jnp.where(closest, member_bits, no_bits), niche, n_niches, no_bits)[niche]
    closest &= index == _segment_min(jnp.where(closest, index, n), niche, n_niches, n)[niche]

    group = jnp.where(last_front, niche, n_niches)
    order = jnp.lexsort((member_bits, ~closest, group))
    group_start = jnp.cumsum(available) - available
    place_sorted = index - jnp.append(group_start, 0)[group[order]]
    place = jnp.zeros(n, jnp.int32).at[order].set(place_sorted)
    return last_front & (place < quota[niche])


@jax.jit
def select(F: jax.Array, ref_dirs: jax.Array, n_survive: jax.Array, state: NSGA3State,
           key: jax.Array) -> tuple[jax.Array, jax.Array, NSGA3State]:
    """NSGA-III environmental selection as a mask; ``n_survive`` may be traced.

    Fronts are taken whole until the next one would overflow ("last front"); the state
    is updated with the whole population and its first front; the last front is split by
    :func:`niching` with niche counts from the earlier fronts. Invalid rows form the last
    front of all, so they are only taken when the valid rows do not suffice (then at random:
    their distances count as +inf).

    Args:
        F: float ``[N, M]``, e.g. parents and offspring.
        ref_dirs: ``[K, M]`` reference directions.
        n_survive: int scalar, survivors (1 <= n_survive <= N).
        state: carried normalisation state.
        key: PRNG key (consumed).

    Returns:
        ``(selected bool [N] with n_survive set, rank int32 [N], new state)``.
    """
    rank = non_dominated_rank(F)
    last_rank = jnp.sort(rank)[n_survive - 1]
    F_norm, state, _ = normalize(F, state, rank == 0)
    niche, dist = associate(F_norm, ref_dirs)
    earlier = rank < last_rank
    last_front = rank == last_rank
    n_remaining = n_survive - jnp.sum(earlier, dtype=jnp.int32)
    niche_count = jnp.zeros(ref_dirs.shape[0], jnp.int32).at[niche].add(earlier.astype(jnp.int32))
    chosen = niching(last_front, n_remaining, niche_count, niche, dist, key)
    return earlier | chosen, rank, state


@functools.partial(jax.jit, static_argnames=("n_survive",))
def _survivor_indices(selected: jax.Array, n_survive: int) -> jax.Array:
    """int32 ``[n_survive]``: the indices where ``selected`` is set, ascending."""
    return jnp.flatnonzero(selected, size=n_survive).astype(jnp.int32)


def survive(F: jax.Array, ref_dirs: jax.Array, n_survive: int, state: NSGA3State,
            key: jax.Array) -> tuple[jax.Array, NSGA3State]:
    """NSGA-III survival: indices of ``n_survive`` rows of a merged population (see :func:`select`).

    Works eagerly (the heavy part, :func:`select`, is compiled once per input shape and
    shared by every ``n_survive``) and inside ``jit``/``scan``.

    Args:
        F: float ``[N, M]``, e.g. parents and offspring (``N = 2 n_survive``).
        ref_dirs: ``[K, M]`` reference directions.
        n_survive: survivors, a Python int (static), 1 <= n_survive <= N.
        state: carried normalisation state.
        key: PRNG key (consumed).

    Returns:
        ``(idx int32 [n_survive] ascending, new state)``.
    """
    selected, _, state = select(F, ref_dirs, n_survive, state, key)
    return _survivor_indices(selected, n_survive), state


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
    inside = np.all(F < ref_point, axis=1)  # noqa: SIM300 - F is the objective matrix, not a constant
    return _hv_recursive(F[inside], ref_point)
