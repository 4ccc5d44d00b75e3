"""qevo.evolution.nsga3 against pymoo 0.6 as the oracle."""

import concurrent.futures
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pymoo.algorithms.moo.nsga3 import (
    NSGA3,
    HyperplaneNormalization,
    ReferenceDirectionSurvival,
    associate_to_niches,
    get_nadir_point,
    niching,
)
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.indicators.hv import HV
from pymoo.indicators.igd import IGD
from pymoo.optimize import minimize
from pymoo.problems import get_problem
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from pymoo.util.ref_dirs import get_reference_directions

from qevo.evolution import nsga3


def pymoo_rank(F):
    return NonDominatedSorting().do(F, return_rank=True)[1]


def pymoo_fronts(F):
    return NonDominatedSorting().do(F)


@pytest.mark.parametrize("n_obj,n_partitions", [(2, 12), (3, 12), (5, 6)])
def test_das_dennis_equals_pymoo(n_obj, n_partitions):
    ours = nsga3.das_dennis(n_obj, n_partitions)
    theirs = get_reference_directions("das-dennis", n_obj, n_partitions=n_partitions)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.sum(axis=1), 1.0)
    as_set = lambda R: set(map(tuple, np.round(R * n_partitions).astype(int)))  # noqa: E731
    assert as_set(ours) == as_set(theirs)
    assert len(as_set(ours)) == len(ours)


@pytest.mark.parametrize("n,n_obj", [(10, 2), (10, 5), (200, 2), (200, 3), (200, 4), (200, 5), (5000, 2), (5000, 5)])
def test_rank_random_continuous(n, n_obj):
    F = np.random.default_rng(n * 10 + n_obj).random((n, n_obj)).astype(np.float32)
    np.testing.assert_array_equal(nsga3.non_dominated_rank(jnp.asarray(F)), pymoo_rank(F))


def test_rank_duplicated_continuous_rows():
    rng = np.random.default_rng(8)
    F = rng.random((600, 3)).astype(np.float32)
    F[::3] = F[rng.integers(0, 600, 200)]
    ranks = np.asarray(nsga3.non_dominated_rank(jnp.asarray(F)))
    np.testing.assert_array_equal(ranks, pymoo_rank(F))
    assert len(np.unique(F, axis=0)) < 550


@pytest.mark.parametrize("n_obj", [2, 3, 4, 5])
def test_rank_integer_ties_and_duplicates(n_obj):
    rng = np.random.default_rng(n_obj)
    F = rng.integers(0, 5, (400, n_obj)).astype(np.float32)
    F[:100] = F[rng.integers(100, 400, 100)]
    ranks = np.asarray(nsga3.non_dominated_rank(jnp.asarray(F)))
    np.testing.assert_array_equal(ranks, pymoo_rank(F))
    _, first, counts = np.unique(F, axis=0, return_index=True, return_counts=True)
    assert np.any(counts > 1)
    for row in F[first[counts > 1]]:
        assert len(set(ranks[np.all(F == row, axis=1)])) == 1  # noqa: SIM300 - F is an array, not a constant


@pytest.mark.parametrize("block_size, chunk_blocks", [(8, 1), (64, 1), (256, 1), (8, 3), (32, 1000), (1024, 1000)])
def test_rank_independent_of_tiling(block_size, chunk_blocks):
    F = np.random.default_rng(7).random((300, 2))
    F[::7] = F[3]  # duplicated rows across blocks and chunks
    ranks = nsga3.non_dominated_rank(jnp.asarray(F), block_size=block_size, chunk_blocks=chunk_blocks)
    np.testing.assert_array_equal(ranks, pymoo_rank(F))


def test_rank_invalid_rows_last():
    rng = np.random.default_rng(3)
    F = rng.random((500, 3)).astype(np.float32)
    bad = rng.choice(500, 40, replace=False)
    F[bad[:20], 1] = np.nan
    F[bad[20:30], 0] = np.inf
    F[bad[30:], 2] = -np.inf
    ranks = np.asarray(nsga3.non_dominated_rank(jnp.asarray(F)))
    ok = np.ones(500, bool)
    ok[bad] = False
    np.testing.assert_array_equal(ranks[ok], pymoo_rank(F[ok]))
    assert np.all(ranks[~ok] == ranks[ok].max() + 1)


def test_rank_all_invalid():
    F = jnp.full((6, 2), jnp.nan)
    np.testing.assert_array_equal(nsga3.non_dominated_rank(F), np.zeros(6))


def test_state_starts_empty():
    state = nsga3.init_state(4)
    assert np.all(np.isposinf(state.ideal_point)) and np.all(np.isneginf(state.worst_point))
    assert state.extreme_points.shape == (4, 4) and np.all(np.isposinf(state.extreme_points))


def _generations(seed, n_obj, n=120, steps=6):
    """A sequence of merged populations drifting towards the origin."""
    rng = np.random.default_rng(seed)
    return [rng.random((n, n_obj)) ** (1 + t) * (3.0 / (1 + t)) + rng.random(n_obj) * 0.1 for t in range(steps)]


def _assert_normalisation_matches(populations):
    """Run pymoo's HyperplaneNormalization and ours side by side over generations (float64)."""
    n_obj = populations[0].shape[1]
    theirs = HyperplaneNormalization(n_obj)
    with jax.enable_x64(True):
        state = nsga3.init_state(n_obj, jnp.float64)
        for F in populations:
            nds = pymoo_fronts(F)[0]
            theirs.update(F, nds=nds)
            front = np.zeros(len(F), bool)
            front[nds] = True
            F_norm, state, nadir = nsga3.normalize(jnp.asarray(F), state, jnp.asarray(front))
            np.testing.assert_allclose(state.ideal_point, theirs.ideal_point, rtol=1e-12)
            np.testing.assert_allclose(state.worst_point, theirs.worst_point, rtol=1e-12)
            np.testing.assert_allclose(state.extreme_points, theirs.extreme_points, rtol=1e-12)
            np.testing.assert_allclose(nadir, theirs.nadir_point, rtol=1e-9)
            denom = theirs.nadir_point - theirs.ideal_point
            denom[denom == 0] = 1e-12
            np.testing.assert_allclose(F_norm, (F - theirs.ideal_point) / denom, rtol=1e-9, atol=1e-12)
    return theirs


@pytest.mark.parametrize("n_obj", [2, 3, 5])
def test_normalisation_matches_pymoo_over_generations(n_obj):
    _assert_normalisation_matches(_generations(n_obj, n_obj))


def test_normalisation_first_front_default():
    F = np.random.default_rng(0).random((50, 3))
    with jax.enable_x64(True):
        state = nsga3.init_state(3, jnp.float64)
        front = jnp.asarray(pymoo_rank(F) == 0)
        explicit = nsga3.normalize(jnp.asarray(F), state, front)
        implicit = nsga3.normalize(jnp.asarray(F), state)
        for a, b in zip(jax.tree.leaves(explicit), jax.tree.leaves(implicit), strict=True):
            np.testing.assert_array_equal(a, b)


def test_normalisation_singular_hyperplane_falls_back_to_worst_of_front():
    rng = np.random.default_rng(1)
    base = rng.random((60, 2))
    F = np.column_stack([base[:, 0], base[:, 1], base[:, 1]])  # axes 2 and 3 share extreme points
    theirs = _assert_normalisation_matches([F])
    front = F[pymoo_fronts(F)[0]]
    np.testing.assert_allclose(theirs.nadir_point, front.max(axis=0))


def test_normalisation_constant_objective_uses_tiny_range():
    rng = np.random.default_rng(2)
    F = np.column_stack([rng.random(40), np.full(40, 0.5), rng.random(40)])
    theirs = _assert_normalisation_matches([F])
    assert theirs.nadir_point[1] == theirs.ideal_point[1]


def test_normalisation_negative_intercept_falls_back_to_worst_of_front():
    F = np.random.default_rng(1).random((30, 3)) ** 3
    theirs = _assert_normalisation_matches([F])
    intercepts = 1 / np.linalg.solve(theirs.extreme_points - theirs.ideal_point, np.ones(3))
    assert np.any(intercepts < 0)
    np.testing.assert_allclose(theirs.nadir_point, F[pymoo_fronts(F)[0]].max(axis=0))


@pytest.mark.parametrize(
    "extremes,ideal,worst,wof,wop",
    [
        ([[2.0, 0.5], [3.0, 1.0]], [0.0, 0.0], [5.0, 5.0], [3.0, 1.5], [4.0, 4.0]),  # negative intercept
        ([[1.0, 1.0], [1.0, 1.0]], [0.0, 0.0], [5.0, 5.0], [3.0, 1.5], [4.0, 4.0]),  # singular
        ([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0], [0.5, 5.0], [3.0, 1.5], [4.0, 4.0]),  # capped by worst
        ([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0], [5.0, 5.0], [3.0, 1.5], [4.0, 4.0]),  # regular
        ([[1e-7, 0.0], [0.0, 1.0]], [0.0, 0.0], [5.0, 5.0], [3.0, 1.5], [4.0, 4.0]),  # tiny intercept
        ([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0],
         [3.0, 3.0, 1e-7], [4.0, 4.0, 4.0]),
        ([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0],
         [3.0, 1e-8, 2.0], [4.0, 6.0, 4.0]),  # singular, then a tiny range
    ],
)
def test_nadir_point_matches_pymoo(extremes, ideal, worst, wof, wop):
    args = [np.asarray(a, np.float64) for a in (extremes, ideal, worst, wof, wop)]
    expected = get_nadir_point(*[a.copy() for a in args])
    with jax.enable_x64(True):
        np.testing.assert_allclose(nsga3.nadir_point(*map(jnp.asarray, args)), expected, rtol=1e-12)


@pytest.mark.parametrize("n_obj,n_partitions", [(2, 12), (3, 12), (5, 6)])
def test_association_matches_pymoo_float64(n_obj, n_partitions):
    rng = np.random.default_rng(n_obj)
    F = rng.random((300, n_obj)) * 2
    ref_dirs = nsga3.das_dennis(n_obj, n_partitions)
    ideal, nadir = F.min(axis=0), F.max(axis=0)
    niche, dist, _ = associate_to_niches(F, ref_dirs, ideal, nadir.copy())
    with jax.enable_x64(True):
        ours_niche, ours_dist = nsga3.associate(jnp.asarray((F - ideal) / (nadir - ideal)), jnp.asarray(ref_dirs))
    np.testing.assert_array_equal(ours_niche, niche)
    np.testing.assert_allclose(ours_dist, dist, rtol=1e-12, atol=1e-14)


def test_association_float32_agrees_except_near_ties():
    rng = np.random.default_rng(11)
    F = rng.random((2000, 3))
    ref_dirs = nsga3.das_dennis(3, 12)
    niche, dist, matrix = associate_to_niches(F, ref_dirs, np.zeros(3), np.ones(3))
    ours_niche, ours_dist = nsga3.associate(jnp.asarray(F, jnp.float32), jnp.asarray(ref_dirs, jnp.float32))
    second = np.sort(matrix, axis=1)[:, 1]
    clear = second - dist > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(np.asarray(ours_niche)[clear], niche[clear])
    np.testing.assert_allclose(ours_dist, dist, rtol=1e-4, atol=1e-6)


def _pymoo_survival(F, ref_dirs, n_survive, survival=None, seed=0):
    survival = survival or ReferenceDirectionSurvival(ref_dirs)
    problem = Problem(n_var=1, n_obj=F.shape[1])
    pop = Population.new("F", F)
    idx = survival.do(problem, pop, n_survive=n_survive, return_indices=True,
                      random_state=np.random.default_rng(seed))
    return np.asarray(idx), survival


def _deterministic_cuts(F, ref_dirs):
    """``(n_survive, earlier fronts)`` for each front that pymoo splits without a random choice.

    If the niches reached by the split front that are still empty after the earlier
    fronts are exactly the places left, each gets its closest member: a unique choice.
    """
    fronts = pymoo_fronts(F)
    norm = HyperplaneNormalization(F.shape[1])
    norm.update(F, nds=fronts[0])
    niche, _, _ = associate_to_niches(F, ref_dirs, norm.ideal_point, norm.nadir_point.copy())
    cuts = []
    for last in range(len(fronts)):
        earlier = np.concatenate(fronts[:last]) if last else np.array([], int)
        empty = np.setdiff1d(np.unique(niche[fronts[last]]), niche[earlier])
        if 0 < len(empty) < len(fronts[last]):
            cuts.append((len(earlier) + len(empty), earlier))
    return cuts


@pytest.mark.parametrize("n_obj,n_partitions,n", [(2, 12, 200), (3, 12, 184), (3, 6, 184), (5, 3, 300)])
def test_survive_matches_pymoo_without_random_ties(n_obj, n_partitions, n):
    F = np.random.default_rng(n).random((n, n_obj))
    ref_dirs = nsga3.das_dennis(n_obj, n_partitions)
    cuts = _deterministic_cuts(F, ref_dirs)
    assert cuts
    for n_survive, earlier in cuts[:3]:
        expected, survival = _pymoo_survival(F, ref_dirs, n_survive)
        with jax.enable_x64(True):
            idx, state = nsga3.survive(jnp.asarray(F), jnp.asarray(ref_dirs), n_survive,
                                       nsga3.init_state(n_obj, jnp.float64), jax.random.key(0))
        idx = np.asarray(idx)
        assert len(idx) == n_survive == len(set(idx))
        assert set(earlier) <= set(idx)
        assert set(idx) == set(expected)
        np.testing.assert_allclose(state.ideal_point, survival.norm.ideal_point)
        np.testing.assert_allclose(state.extreme_points, survival.norm.extreme_points)


@pytest.mark.parametrize("seed", range(4))
def test_survive_keeps_earlier_fronts_float32(seed):
    rng = np.random.default_rng(seed)
    F = rng.random((184, 3)).astype(np.float32)
    ref_dirs = jnp.asarray(nsga3.das_dennis(3, 12), jnp.float32)
    idx, _ = nsga3.survive(jnp.asarray(F), ref_dirs, 92, nsga3.init_state(3), jax.random.key(seed))
    idx = np.asarray(idx)
    rank = pymoo_rank(F)
    last = np.sort(rank)[91]
    assert len(set(idx)) == 92
    assert set(np.flatnonzero(rank < last)) <= set(idx)
    assert np.all(rank[idx] <= last)
    assert np.all(np.diff(idx) > 0)


@pytest.mark.parametrize("tied_distances", [False, True])
def test_niching_fills_niches_like_pymoo(tied_distances):
    """Per-niche totals after niching equal pymoo's, except which of the niches at the final
    level ``L`` (those pymoo's last, partial round chooses from) end at ``L + 1``."""
    rng = np.random.default_rng(int(tied_distances))
    for trial in range(12):
        n, n_niches = 80, 9
        niche = rng.integers(0, n_niches, n)
        dist = rng.integers(0, 3, n).astype(float) if tied_distances else rng.random(n).astype(np.float32).astype(float)
        last_front = rng.random(n) < 0.6
        count = rng.integers(0, 3, n_niches)
        available = np.bincount(niche[last_front], minlength=n_niches)
        n_remaining = int(rng.integers(1, last_front.sum()))
        picked = niching(np.empty(last_front.sum()), n_remaining, count.copy(), niche[last_front],
                         dist[last_front], random_state=np.random.default_rng(trial))
        theirs = count + np.bincount(niche[last_front][picked], minlength=n_niches)
        level = theirs[count + available > theirs].min()
        final_round = (count <= level) & (available > level - count)
        chosen = np.asarray(jax.jit(nsga3.niching)(
            jnp.asarray(last_front), n_remaining, jnp.asarray(count, jnp.int32), jnp.asarray(niche, jnp.int32),
            jnp.asarray(dist, jnp.float32), jax.random.key(trial)))
        assert chosen.sum() == n_remaining and not np.any(chosen & ~last_front)
        ours = count + np.bincount(niche[chosen], minlength=n_niches)
        np.testing.assert_array_equal(np.sort(ours), np.sort(theirs))
        np.testing.assert_array_equal(ours[~final_round], theirs[~final_round])
        assert np.all((ours[final_round] == level) | (ours[final_round] == level + 1))
        for j in np.flatnonzero((count == 0) & (ours > 0)):
            assert dist[chosen & (niche == j)].min() == dist[last_front & (niche == j)].min()


def _assert_niche_preserving(idx, rank, niche, dist, n_niches):
    """The split front was filled niche by niche: a niche got its last member while its count
    was lowest among niches with members left, and an empty niche got its closest member."""
    selected = np.zeros(len(rank), bool)
    selected[idx] = True
    last = rank[idx].max()
    earlier, last_front = rank < last, rank == last
    chosen, left = last_front & selected, last_front & ~selected
    assert chosen.any() and left.any()
    before = np.bincount(niche[earlier], minlength=n_niches)
    after = np.bincount(niche[selected], minlength=n_niches)
    assert after[np.unique(niche[chosen])].max() - 1 <= after[np.unique(niche[left])].min()
    for j in np.unique(niche[chosen]):
        if before[j] == 0:
            members = last_front & (niche == j)
            assert dist[chosen & (niche == j)].min() == dist[members].min()


@pytest.mark.parametrize("n_obj,n_partitions", [(2, 12), (3, 12), (5, 3)])
def test_survive_with_random_ties_is_niche_preserving_like_pymoo(n_obj, n_partitions):
    rng = np.random.default_rng(n_obj)
    F = rng.random((184, n_obj))
    ref_dirs = nsga3.das_dennis(n_obj, n_partitions)
    rank = pymoo_rank(F)
    with jax.enable_x64(True):
        state = nsga3.init_state(n_obj, jnp.float64)
        F_norm, _, _ = nsga3.normalize(jnp.asarray(F), state, jnp.asarray(rank == 0))
        niche, dist = map(np.asarray, nsga3.associate(F_norm, jnp.asarray(ref_dirs)))
        for seed in range(3):
            expected, _ = _pymoo_survival(F, ref_dirs, 92, seed=seed)
            _assert_niche_preserving(expected, rank, niche, dist, len(ref_dirs))
            idx, _ = nsga3.survive(jnp.asarray(F), jnp.asarray(ref_dirs), 92, state, jax.random.key(seed))
            _assert_niche_preserving(np.asarray(idx), rank, niche, dist, len(ref_dirs))


def test_survive_state_matches_pymoo_over_generations():
    ref_dirs = nsga3.das_dennis(3, 12)
    survival = ReferenceDirectionSurvival(ref_dirs)
    with jax.enable_x64(True):
        state = nsga3.init_state(3, jnp.float64)
        key = jax.random.key(1)
        for F in _generations(9, 3, n=184):
            _pymoo_survival(F, ref_dirs, 92, survival)
            key, sub = jax.random.split(key)
            _, state = nsga3.survive(jnp.asarray(F), jnp.asarray(ref_dirs), 92, state, sub)
            np.testing.assert_allclose(state.ideal_point, survival.norm.ideal_point, rtol=1e-12)
            np.testing.assert_allclose(state.worst_point, survival.norm.worst_point, rtol=1e-12)
            np.testing.assert_allclose(state.extreme_points, survival.norm.extreme_points, rtol=1e-12)


def test_survive_takes_invalid_rows_only_when_needed():
    rng = np.random.default_rng(4)
    F = rng.random((40, 2)).astype(np.float32)
    F[:25, 0] = np.nan
    ref_dirs = jnp.asarray(nsga3.das_dennis(2, 12), jnp.float32)
    idx, state = nsga3.survive(jnp.asarray(F), ref_dirs, 10, nsga3.init_state(2), jax.random.key(0))
    assert np.all(np.asarray(idx) >= 25)
    assert np.all(np.isfinite(state.ideal_point)) and np.all(np.isfinite(state.extreme_points))
    idx, _ = nsga3.survive(jnp.asarray(F), ref_dirs, 20, nsga3.init_state(2), jax.random.key(0))
    idx = np.asarray(idx)
    assert len(set(idx)) == 20 and set(range(25, 40)) <= set(idx)


def test_igd_matches_pymoo():
    rng = np.random.default_rng(0)
    pf, F = rng.random((50, 3)), rng.random((30, 3))
    assert nsga3.igd(F, pf) == pytest.approx(IGD(pf)(F), rel=1e-12)


@pytest.mark.parametrize("n_obj,n", [(2, 30), (3, 40), (3, 200), (4, 25)])
def test_hypervolume_matches_pymoo(n_obj, n):
    rng = np.random.default_rng(n)
    F = rng.random((n, n_obj))
    F = F / np.linalg.norm(F, axis=1, keepdims=True)  # mostly non-dominated, some rows beyond the reference
    ref = np.full(n_obj, 0.95)
    assert nsga3.hypervolume(F, ref) == pytest.approx(HV(ref_point=ref)(F), rel=1e-10)


# ---- end to end: NSGA-III on DTLZ1/DTLZ2 against pymoo's NSGA3 -------------------------------


def dtlz(name, X, n_obj):
    """DTLZ1 / DTLZ2 objectives of ``X [N, n_var]`` in [0, 1]."""
    head, tail = X[:, : n_obj - 1], X[:, n_obj - 1:]
    if name == "dtlz1":
        # 100 (k + sum((x - 0.5)^2 - cos(20 pi (x - 0.5)))) with 1 - cos(2t) = 2 sin(t)^2, which
        # avoids float32 cancellation near the optimum g = 0
        g = 100 * jnp.sum((tail - 0.5) ** 2 + 2 * jnp.sin(10 * jnp.pi * (tail - 0.5)) ** 2, axis=1)
        scale, inner, outer = 0.5 * (1 + g), head, 1 - head
    else:
        g = jnp.sum((tail - 0.5) ** 2, axis=1)
        # cos(x pi/2) as sin((1 - x) pi/2): exactly 0 at x = 1 (float32 cos gives -4e-8 there,
        # a negative objective that makes a worse g look better)
        scale, inner, outer = 1 + g, jnp.sin((1 - head) * jnp.pi / 2), jnp.sin(head * jnp.pi / 2)
    objectives = []
    for i in range(n_obj):
        f = scale * jnp.prod(inner[:, : n_obj - 1 - i], axis=1)
        if i > 0:
            f = f * outer[:, n_obj - 1 - i]
        objectives.append(f)
    return jnp.stack(objectives, axis=1)


def sbx(key, p1, p2, eta=30.0, prob_var=0.5, eps=1e-14):
    """pymoo's SBX (prob 1.0, per-variable 0.5, random exchange) on parents ``[P, n_var]`` in [0, 1]."""
    k_cross, k_beta, k_swap = jax.random.split(key, 3)
    cross = (jax.random.uniform(k_cross, p1.shape) < prob_var) & (jnp.abs(p1 - p2) > eps)
    y1, y2 = jnp.minimum(p1, p2), jnp.maximum(p1, p2)
    delta = jnp.where(cross, y2 - y1, 1.0)
    u = jax.random.uniform(k_beta, p1.shape)

    def betaq(beta):
        alpha = 2.0 - beta ** -(eta + 1.0)
        return jnp.where(u <= 1.0 / alpha, (u * alpha) ** (1.0 / (eta + 1.0)),
                         (1.0 / (2.0 - u * alpha)) ** (1.0 / (eta + 1.0)))

    c1 = 0.5 * ((y1 + y2) - betaq(1.0 + 2.0 * y1 / delta) * delta)
    c2 = 0.5 * ((y1 + y2) + betaq(1.0 + 2.0 * (1.0 - y2) / delta) * delta)
    swap = jax.random.uniform(k_swap, p1.shape) < 0.5
    c1, c2 = jnp.where(swap, c2, c1), jnp.where(swap, c1, c2)
    child1 = jnp.clip(jnp.where(cross, c1, p1), 0.0, 1.0)
    child2 = jnp.clip(jnp.where(cross, c2, p2), 0.0, 1.0)
    return jnp.concatenate([child1, child2])


def polynomial_mutation(key, X, eta=20.0, prob=0.9):
    """pymoo's PM on ``X [N, n_var]`` in [0, 1]: individuals with prob 0.9, variables with 1/n_var."""
    k_ind, k_var, k_u = jax.random.split(key, 3)
    n_var = X.shape[1]
    mutate = (jax.random.uniform(k_ind, (X.shape[0], 1)) <= prob) & (jax.random.uniform(k_var, X.shape) < 1.0 / n_var)
    u = jax.random.uniform(k_u, X.shape)
    power = 1.0 / (eta + 1.0)
    low = (2.0 * u + (1.0 - 2.0 * u) * (1.0 - X) ** (eta + 1.0)) ** power - 1.0
    high = 1.0 - (2.0 * (1.0 - u) + 2.0 * (u - 0.5) * X ** (eta + 1.0)) ** power
    Y = jnp.clip(X + jnp.where(u <= 0.5, low, high), 0.0, 1.0)
    return jnp.where(mutate, Y, X)


def random_tournament_parents(key, pop_size):
    """pymoo's NSGA3 mating selection for feasible populations: binary tournaments with a
    random winner over two concatenated permutations; returns parent indices ``[2, pop_size // 2]``."""
    k1, k2, k3 = jax.random.split(key, 3)
    entrants = jnp.concatenate([jax.random.permutation(k1, pop_size), jax.random.permutation(k2, pop_size)])
    entrants = entrants.reshape(pop_size, 2)
    winners = jnp.take_along_axis(entrants, jax.random.bernoulli(k3, 0.5, (pop_size, 1)).astype(jnp.int32), axis=1)
    return winners.reshape(2, pop_size // 2)


def unique_offspring(key, X, n_batches=4):
    """pymoo's NSGA3 mating with duplicate elimination: ``len(X)`` children of ``X [P, n_var]``
    that equal neither a member of ``X`` nor an earlier child, drawn from ``n_batches`` batches
    of tournament + SBX + PM (duplicates fill up only if too few are unique)."""
    pop_size = X.shape[0]

    def batch(key):
        k_sel, k_sbx, k_pm = jax.random.split(key, 3)
        parents = random_tournament_parents(k_sel, pop_size)
        return polynomial_mutation(k_pm, sbx(k_sbx, X[parents[0]], X[parents[1]]))

    children = jnp.concatenate([batch(k) for k in jax.random.split(key, n_batches)])
    equal = lambda A, B: jnp.all(A[:, None, :] == B[None, :, :], axis=2)  # noqa: E731
    copies_earlier = jnp.tril(equal(children, children), k=-1)
    duplicate = jnp.any(equal(children, X), axis=1) | jnp.any(copies_earlier, axis=1)
    return children[jnp.argsort(duplicate, stable=True)[:pop_size]]


def run_qevo_nsga3(name, n_obj, n_var, ref_dirs, pop_size, n_gen):
    """A jitted NSGA-III: ``key -> final population objectives [pop_size, n_obj]``."""
    ref_dirs = jnp.asarray(ref_dirs, jnp.float32)

    def generation(carry, key):
        X, F, state = carry
        k_off, k_surv = jax.random.split(key)
        children = unique_offspring(k_off, X)
        X_all = jnp.concatenate([X, children])
        F_all = jnp.concatenate([F, dtlz(name, children, n_obj)])
        idx, state = nsga3.survive(F_all, ref_dirs, pop_size, state, k_surv)
        return (X_all[idx], F_all[idx], state), None

    @jax.jit
    def run(key):
        k_init, k_surv, k_gens = jax.random.split(key, 3)
        X = jax.random.uniform(k_init, (pop_size, n_var))
        F = dtlz(name, X, n_obj)
        idx, state = nsga3.survive(F, ref_dirs, pop_size, nsga3.init_state(n_obj), k_surv)
        carry = (X[idx], F[idx], state)
        (_, F, _), _ = jax.lax.scan(generation, carry, jax.random.split(k_gens, n_gen - 1))
        return F

    return run


def first_front(F):
    F = np.asarray(F, np.float64)
    return F[pymoo_rank(F) == 0]


@pytest.mark.parametrize("name", ["dtlz1", "dtlz2"])
def test_dtlz_objectives_match_pymoo(name):
    problem = get_problem(name, n_obj=3)
    X = np.random.default_rng(0).random((50, problem.n_var))
    np.testing.assert_allclose(dtlz(name, jnp.asarray(X, jnp.float32), 3), problem.evaluate(X), rtol=2e-5)


def worse_p_value(ours, theirs):
    """Exact one-sided Mann-Whitney p-value that ``ours`` tends to be larger than ``theirs``:
    the share of all splits of the pooled values whose U statistic is at least the observed."""
    pooled = np.concatenate([ours, theirs])

    def u(first):
        rest = np.delete(pooled, first)
        return sum(float(a > b) + 0.5 * float(a == b) for a in pooled[list(first)] for b in rest)

    observed = u(range(len(ours)))
    splits = list(itertools.combinations(range(len(pooled)), len(ours)))
    return sum(u(split) >= observed for split in splits) / len(splits)


def test_worse_p_value():
    assert worse_p_value([5, 6, 7], [1, 2, 3]) == pytest.approx(1 / 20)
    assert worse_p_value([1, 2, 3], [5, 6, 7]) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dtlz1", "dtlz2"])
def test_dtlz_igd_reaches_pymoo(name):
    """qevo's NSGA-III against pymoo's NSGA3, 5 seeds each, IGD of the final first front.

    Both medians are printed. The assertion is a one-sided rank test (qevo not worse at the
    1% level) rather than a bound on the ratio of 5-seed medians: that ratio swings by more
    than 1.2x between two seed sets of pymoo itself (DTLZ1 seeds 0-4 vs 5-9: 0.00076 vs
    0.00094; DTLZ2: 0.00039 vs 0.00050), so a 1.1x bound would test the seeds, not the code.
    Over more seeds the medians agree (DTLZ1, 30 seeds: qevo 0.00132, pymoo 0.00139; DTLZ2,
    20 seeds: 0.00051 and 0.00050). A broken survival (worse on every seed) gives p = 1/252.
    """
    n_obj, pop_size, n_gen, seeds = 3, 92, 400, range(5)
    ref_dirs = nsga3.das_dennis(n_obj, 12)
    problem = get_problem(name, n_obj=n_obj)
    pf = problem.pareto_front(ref_dirs)

    def pymoo_runs():
        start = time.perf_counter()
        igds = []
        for s in seeds:
            result = minimize(problem, NSGA3(ref_dirs, pop_size=pop_size), ("n_gen", n_gen), seed=s)
            igds.append(nsga3.igd(first_front(result.pop.get("F")), pf))
        return igds, time.perf_counter() - start

    # pymoo runs in a thread while qevo's compiled runs release the GIL (both problems: 75 s in turn, 59 s so)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pymoo_done = pool.submit(pymoo_runs)
        start = time.perf_counter()
        run = run_qevo_nsga3(name, n_obj, problem.n_var, ref_dirs, pop_size, n_gen)
        ours = [nsga3.igd(first_front(run(jax.random.key(s))), pf) for s in seeds]
        ours_s = time.perf_counter() - start
        theirs, theirs_s = pymoo_done.result()

    p_value = worse_p_value(ours, theirs)
    print(f"\n{name}: qevo median IGD {np.median(ours):.3g} {np.round(ours, 5)} in {ours_s:.1f}s; "
          f"pymoo median IGD {np.median(theirs):.3g} {np.round(theirs, 5)} in {theirs_s:.1f}s; "
          f"median ratio {np.median(ours) / np.median(theirs):.2f}; p(qevo worse) {p_value:.3f}")
    assert p_value >= 0.01
