"""Variation operators of the bit-width genome: ranges, decoding, operator statistics, dedupe."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qevo.evolution import variation

N_CHOICES = jnp.array([3, 4, 1, 2, 3, 4, 1, 2], jnp.int32)  # G = 8, S = 4


def _rows(a) -> list[tuple]:
    return [tuple(r) for r in np.asarray(a).tolist()]


def _in_range(genes, n_choices) -> bool:
    genes, n_choices = np.asarray(genes), np.asarray(n_choices)
    return genes.dtype == np.int32 and bool(np.all((genes >= 0) & (genes < n_choices)))


def test_random_genes_in_range_and_cover_every_choice():
    genes = variation.random_genes(jax.random.key(0), 500, N_CHOICES)
    assert genes.shape == (500, 8)
    assert _in_range(genes, N_CHOICES)
    for g, n in enumerate(np.asarray(N_CHOICES)):
        assert set(np.asarray(genes[:, g]).tolist()) == set(range(n))


def test_uniform_genes_skips_pairs_outside_the_candidates():
    rows = variation.uniform_genes([8, 6, 4, 2], [8, 4], 3)
    expected = np.array([[0, 0, 0, 0, 0, 0],   # (8, 8)
                         [2, 2, 2, 1, 1, 1]])  # (4, 4); (2, 2) skipped: 2 not an activation candidate
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, expected)
    assert variation.uniform_genes([8], [4], 2).shape == (0, 4)


def test_decode_hand_example():
    w_candidates = jnp.array([8, 6, 4, 2])
    a_candidates = jnp.array([8, 4])
    searched = jnp.array([False, True, False, True, True, False])  # L = 6, S = 3
    genes = jnp.array([[0, 3, 2, 1, 0, 1],
                       [1, 1, 1, 0, 0, 0]])
    w_bits, a_bits = variation.decode(genes, w_candidates, a_candidates, searched)
    np.testing.assert_array_equal(w_bits, [[32, 8, 32, 2, 4, 32],
                                           [32, 6, 32, 6, 6, 32]])
    np.testing.assert_array_equal(a_bits, [[32, 4, 32, 8, 4, 32],
                                           [32, 8, 32, 8, 8, 32]])
    assert w_bits.dtype == a_bits.dtype == jnp.int32


def test_crossover_takes_each_gene_from_a_parent():
    key_a, key_x = jax.random.split(jax.random.key(1))
    parents_a = variation.random_genes(key_a, 400, N_CHOICES)
    parents_b = parents_a + 10  # differs from parents_a in every gene
    child = np.asarray(variation.crossover(key_x, parents_a, parents_b, 0.9))
    from_a, from_b = child == np.asarray(parents_a), child == np.asarray(parents_b)
    assert np.all(from_a ^ from_b)
    crossed = from_b.any(axis=1)
    # 400 pairs, crossed with p = 0.9 (a crossed pair copies a only with prob 2^-8): sd 0.015
    assert abs(crossed.mean() - 0.9) < 0.06
    # genes of crossed pairs come from b with p = 1/2: sd 0.0066
    assert abs(from_b[crossed].mean() - 0.5) < 0.03
    np.testing.assert_array_equal(variation.crossover(key_x, parents_a, parents_b, 0.0), parents_a)


def test_mutation_rate_and_never_the_same_value():
    n_choices = jnp.full((10,), 3, jnp.int32)
    key_g, key_m = jax.random.split(jax.random.key(2))
    genes = variation.random_genes(key_g, 2000, n_choices)
    for rate, expected in ((None, 1.0), (0.3, 3.0)):
        mutated = variation.mutate(key_m, genes, n_choices, rate)
        assert _in_range(mutated, n_choices)
        changes = np.sum(np.asarray(mutated) != np.asarray(genes), axis=1)
        # Binomial(10, rate) per row over 2000 rows: sd of the mean <= 0.033; a reset to the
        # same value would show as 2/3 of the expected count
        assert abs(changes.mean() - expected) < 0.15


def test_mutation_at_rate_one_changes_every_gene_with_a_choice():
    genes = variation.random_genes(jax.random.key(3), 300, N_CHOICES)
    mutated = np.asarray(variation.mutate(jax.random.key(4), genes, N_CHOICES, 1.0))
    assert _in_range(mutated, N_CHOICES)
    has_choice = np.asarray(N_CHOICES) > 1
    assert np.all(mutated[:, has_choice] != np.asarray(genes)[:, has_choice])
    np.testing.assert_array_equal(mutated[:, ~has_choice], 0)


SMALL = jnp.array([3, 3, 3], jnp.int32)  # 27 genomes
ALL_SMALL = np.array(list(itertools.product(range(3), repeat=3)), np.int32)


@pytest.mark.parametrize("seed", range(10))
def test_dedupe_removes_duplicates_on_a_small_space(seed):
    rng = np.random.default_rng(seed)
    existing = ALL_SMALL[rng.permutation(27)[:8]]
    # 10 offspring, 5 of them fresh genomes, 5 copies of existing rows or of each other
    fresh = ALL_SMALL[rng.permutation(27)]
    fresh = np.array([r for r in fresh if tuple(r) not in set(_rows(existing))][:3])
    offspring = np.concatenate([fresh, existing[:3], fresh[:2], fresh[:1], existing[4:5]])
    result = variation.dedupe(jax.random.key(seed), jnp.array(offspring), jnp.array(existing), SMALL)
    rows = _rows(result)
    assert _in_range(result, SMALL)
    assert len(set(rows)) == len(rows)
    assert not set(rows) & set(_rows(existing))
    np.testing.assert_array_equal(np.asarray(result)[:3], fresh)  # the non-duplicates stay


def test_dedupe_leaves_distinct_rows_untouched():
    genes = variation.random_genes(jax.random.key(5), 64, N_CHOICES)
    unique = np.unique(np.asarray(genes), axis=0)
    existing, offspring = unique[:20], unique[20:40]
    result = variation.dedupe(jax.random.key(6), jnp.array(offspring), jnp.array(existing), N_CHOICES)
    np.testing.assert_array_equal(result, offspring)


def test_make_offspring_shape_range_and_no_copies_of_parents():
    n_choices = jnp.full((12,), 4, jnp.int32)
    parents = variation.random_genes(jax.random.key(7), 20, n_choices)
    children = variation.make_offspring(jax.random.key(8), parents, 30, n_choices, 0.9, None)
    assert children.shape == (30, 12)
    assert _in_range(children, n_choices)
    rows = _rows(children)
    assert len(set(rows)) == 30
    assert not set(rows) & set(_rows(parents))


def test_make_offspring_mates_uniformly_and_dedupe_changes_one_gene():
    n_choices = jnp.full((24,), 4, jnp.int32)
    parents = variation.random_genes(jax.random.key(9), 4, n_choices)
    # no crossover, no mutation: every child starts as a copy of a random parent, and
    # dedupe moves each to a free genome one gene away
    children = variation.make_offspring(jax.random.key(10), parents, 100, n_choices, 0.0, 0.0)
    distance = np.sum(np.asarray(children)[:, None, :] != np.asarray(parents)[None], axis=2)
    np.testing.assert_array_equal(distance.min(axis=1), 1)
    assert len(set(_rows(children))) == 100
    # parents are picked uniformly: 25 children each, sd 4.3
    counts = np.bincount(distance.argmin(axis=1), minlength=4)
    assert np.all(np.abs(counts - 25) < 13), counts


def test_everything_under_jit_and_keys():
    searched = jnp.array([False, True, True, True, True, False])

    @jax.jit
    def step(key, parents):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        genes = variation.random_genes(k1, 6, N_CHOICES)
        crossed = variation.crossover(k2, parents, genes, 0.9)
        mutated = variation.mutate(k3, crossed, N_CHOICES)
        children = variation.make_offspring(k4, parents, 6, N_CHOICES, 0.9, 0.2)
        return genes, crossed, mutated, children, variation.decode(children, jnp.array([8, 4, 2]),
                                                                  jnp.array([8, 6, 4, 2]), searched)

    parents = variation.random_genes(jax.random.key(10), 6, N_CHOICES)
    first = jax.tree.leaves(step(jax.random.key(11), parents))
    again = jax.tree.leaves(step(jax.random.key(11), parents))
    other = jax.tree.leaves(step(jax.random.key(12), parents))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first[:4], other[:4], strict=True))
    for genes in first[:4]:
        assert _in_range(genes, N_CHOICES)


@pytest.mark.parametrize("op", ["random", "crossover", "mutate", "dedupe", "offspring"])
def test_same_key_same_result_different_key_different(op):
    parents = variation.random_genes(jax.random.key(13), 16, N_CHOICES)
    calls = {
        "random": lambda k: variation.random_genes(k, 16, N_CHOICES),
        "crossover": lambda k: variation.crossover(k, parents, parents[::-1], 1.0),
        "mutate": lambda k: variation.mutate(k, parents, N_CHOICES, 0.5),
        "dedupe": lambda k: variation.dedupe(k, parents, parents, N_CHOICES),
        "offspring": lambda k: variation.make_offspring(k, parents, 16, N_CHOICES, 0.9, None),
    }
    run = calls[op]
    np.testing.assert_array_equal(run(jax.random.key(14)), run(jax.random.key(14)))
    assert not np.array_equal(run(jax.random.key(14)), run(jax.random.key(15)))
