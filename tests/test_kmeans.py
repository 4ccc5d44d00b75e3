"""Tests of qevo.sharing.kmeans (batched weight clustering) and qevo.sharing.codebook (formats, CR).

Compiled configurations are shared between tests (each costs seconds of XLA compile on a
small CPU): one [20, 48000] 1-D batch in 3 chunks, [1, 840] 1-D rows, [1, 840] 2-D rows.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from sklearn.cluster import KMeans

from qevo.sharing.codebook import (
    CODEBOOK_BITS,
    key_bits,
    layer_compression_rate,
    model_compression_rates,
    quantize_codebook,
)
from qevo.sharing.kmeans import kmeans, pack_layers, quantize_weights, tanh_transform

# LeNet-5's weight tensors: conv1 5*5*1*6, conv2 5*5*6*16, fc1 400*120, fc2 120*84, fc3 84*10.
LENET5_SIZES = {"conv1": 150, "conv2": 2400, "fc1": 48000, "fc2": 10080, "fc3": 840}
KS = (2, 5, 16, 50)


def trained_like(n: int, seed: int) -> np.ndarray:
    """Weights shaped like a trained layer's: a normal/Laplace core and 0.5 % outliers."""
    rng = np.random.default_rng(seed)
    w = 0.5 * rng.standard_normal(n) * 0.05 + 0.5 * rng.laplace(size=n) * 0.03
    idx = rng.choice(n, max(1, n // 200), replace=False)
    w[idx] += rng.choice([-1.0, 1.0], idx.size) * rng.uniform(0.15, 0.4, idx.size)
    return w.astype(np.float32)


LAYERS = {name: trained_like(n, seed) for seed, (name, n) in enumerate(LENET5_SIZES.items())}
ROWS = [(name, k) for name, n in LENET5_SIZES.items() for k in KS if k < n]


@pytest.fixture(scope="module")
def lenet_batch():
    """All (layer, k) rows of ROWS clustered in one batched call (k_max = 50).

    batch_size=8 splits the 20 rows into 3 chunks of 7 (one padding row), rows sorted by k
    across chunks, so every test on this batch also covers the chunking."""
    values, mask = pack_layers([LAYERS[name] for name, _ in ROWS])
    k = np.array([k for _, k in ROWS], np.int32)
    return values, mask, kmeans(values, mask, k, 50, batch_size=8)


def one_row(name, k):
    """Cluster one layer alone, unpadded: [1, n] (k a JAX array, so one compile per shape)."""
    values, mask = pack_layers([LAYERS[name]])
    return values, mask, kmeans(values, mask, jnp.array([k], jnp.int32), 50)


# Traced spread and focus: the 2-D path.
run_2d = jax.jit(lambda values, mask, k, spread, focus: kmeans(values, mask, k, 50, spread=spread, focus=focus))


# ---------------------------------------------------------------- compression rate


# CR_l = n_w*32 / (n_w*b_key + k*(b_red + b_key)), b_key = max(ceil(log2 k), 1).
# Each entry: (n_w, k, b_red, numerator, denominator) with the denominator worked out by hand.
CR_CASES = [
    # n_w = 150: numerator 150*32 = 4800
    (150, 1, 32, 4800, 150 * 1 + 1 * 33),  # b_key 1: 150 + 33 = 183 -> 26.2295
    (150, 1, 16, 4800, 167),  # 150 + 17
    (150, 1, 8, 4800, 159),  # 150 + 9
    (150, 2, 32, 4800, 216),  # b_key 1: 150 + 2*33 = 216 -> 22.2222
    (150, 2, 16, 4800, 184),  # 150 + 2*17
    (150, 2, 8, 4800, 168),  # 150 + 2*9
    (150, 16, 32, 4800, 1176),  # b_key 4: 600 + 16*36 = 600 + 576 -> 4.0816
    (150, 16, 16, 4800, 920),  # 600 + 16*20 = 600 + 320
    (150, 16, 8, 4800, 792),  # 600 + 16*12 = 600 + 192
    (150, 17, 32, 4800, 1379),  # b_key 5: 750 + 17*37 = 750 + 629 -> 3.4808
    (150, 17, 16, 4800, 1107),  # 750 + 17*21 = 750 + 357
    (150, 17, 8, 4800, 971),  # 750 + 17*13 = 750 + 221
    (150, 50, 32, 4800, 2800),  # b_key 6: 900 + 50*38 = 900 + 1900 -> 1.7143
    (150, 50, 16, 4800, 2000),  # 900 + 50*22 = 900 + 1100 -> 2.4
    (150, 50, 8, 4800, 1600),  # 900 + 50*14 = 900 + 700 -> 3.0
    # n_w = 48000: numerator 48000*32 = 1536000
    (48000, 1, 32, 1536000, 48033),  # 48000 + 33 -> 31.9772
    (48000, 1, 16, 1536000, 48017),  # 48000 + 17
    (48000, 1, 8, 1536000, 48009),  # 48000 + 9
    (48000, 2, 32, 1536000, 48066),  # 48000 + 2*33
    (48000, 2, 16, 1536000, 48034),  # 48000 + 2*17
    (48000, 2, 8, 1536000, 48018),  # 48000 + 2*9
    (48000, 16, 32, 1536000, 192576),  # 192000 + 16*36 -> 7.9761
    (48000, 16, 16, 1536000, 192320),  # 192000 + 16*20
    (48000, 16, 8, 1536000, 192192),  # 192000 + 16*12
    (48000, 17, 32, 1536000, 240629),  # 240000 + 17*37 -> 6.3833
    (48000, 17, 16, 1536000, 240357),  # 240000 + 17*21
    (48000, 17, 8, 1536000, 240221),  # 240000 + 17*13
    (48000, 50, 32, 1536000, 289900),  # 288000 + 50*38 -> 5.2984
    (48000, 50, 16, 1536000, 289100),  # 288000 + 50*22
    (48000, 50, 8, 1536000, 288700),  # 288000 + 50*14
]


@pytest.mark.parametrize("n_w,k,bits,num,den", CR_CASES)
def test_layer_compression_rate_by_hand(n_w, k, bits, num, den):
    assert layer_compression_rate(n_w, k, bits) == pytest.approx(num / den, rel=1e-12)
    jax_cr = layer_compression_rate(jnp.int32(n_w), jnp.int32(k), bits)
    assert isinstance(jax_cr, jax.Array)
    assert float(jax_cr) == pytest.approx(num / den, rel=1e-6)


def test_layer_compression_rate_vectorised_and_key_bits():
    k = np.array([1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 50, 64, 65])
    np.testing.assert_array_equal(key_bits(k), [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 7])
    np.testing.assert_array_equal(key_bits(jnp.asarray(k)), key_bits(k))
    n_w, ks, b = (np.array([c[i] for c in CR_CASES]) for i in range(3))
    expected = [c[3] / c[4] for c in CR_CASES]
    np.testing.assert_allclose(layer_compression_rate(n_w, ks, b), expected, rtol=1e-12)
    np.testing.assert_allclose(layer_compression_rate(jnp.asarray(n_w), jnp.asarray(ks), jnp.asarray(b)), expected,
                               rtol=1e-6)


def test_model_compression_rates_by_hand():
    n_w = np.array([150, 2400])
    k = np.array([[2, 16], [1, 50]])  # a population of two
    # member 0: conv 150*1 + 2*33 = 216 bits -> 4800/216; layer 2400*4 + 16*36 = 10176 -> 76800/10176
    # member 1: 150 + 33 = 183 -> 4800/183; 2400*6 + 50*38 = 16300 -> 76800/16300
    mean_cr, weighted_cr = model_compression_rates(n_w, k, 32)
    np.testing.assert_allclose(mean_cr, [(4800 / 216 + 76800 / 10176) / 2, (4800 / 183 + 76800 / 16300) / 2],
                               rtol=1e-12)
    np.testing.assert_allclose(weighted_cr, [81600 / (216 + 10176), 81600 / (183 + 16300)], rtol=1e-12)
    # float16 codebook, member 0: 150 + 2*17 = 184; 9600 + 16*20 = 9920
    mean16, weighted16 = model_compression_rates(n_w, k[0], 16)
    assert mean16 == pytest.approx((4800 / 184 + 76800 / 9920) / 2, rel=1e-12)
    assert weighted16 == pytest.approx(81600 / (184 + 9920), rel=1e-12)
    mean_j, weighted_j = jax.jit(model_compression_rates, static_argnums=2)(jnp.asarray(n_w), jnp.asarray(k), 32)
    np.testing.assert_allclose(mean_j, mean_cr, rtol=1e-6)
    np.testing.assert_allclose(weighted_j, weighted_cr, rtol=1e-6)


@pytest.mark.parametrize(
    "n_w,k,match",
    [(150, 0, "k >= 1"), (150, 151, "exceed"), (0, 1, "n_w >= 1"), (150, 2.5, "whole numbers")],
)
def test_compression_rate_rejects_bad_input(n_w, k, match):
    with pytest.raises(ValueError, match=match):
        layer_compression_rate(n_w, k, 32)
    with pytest.raises(ValueError, match=match):
        model_compression_rates(np.array([n_w, 10]), np.array([k, 1]), 32)


def test_model_compression_rates_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"\[\.\.\., L\]"):
        model_compression_rates(np.array([150, 2400]), np.array([2, 2, 2]), 32)


# ---------------------------------------------------------------- codebook formats


def test_codebook_float16_and_float32():
    c = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32) * 0.07
    np.testing.assert_array_equal(quantize_codebook(c, "float16"), c.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(quantize_codebook(c, "float32"), c)


def test_codebook_int8_by_hand():
    c = np.array([[0.5, -0.3, 0.1, 0.0]], np.float32)
    # scale = 0.5/127; c/scale = [127, -76.2, 25.4, 0] -> rounds to [127, -76, 25, 0]
    scale = np.float32(0.5) / np.float32(127)
    expected = np.array([[127, -76, 25, 0]], np.float32) * scale
    np.testing.assert_allclose(quantize_codebook(c, "int8"), expected, rtol=1e-6)
    rows = np.random.default_rng(1).standard_normal((4, 50)).astype(np.float32) * 0.05
    s = np.abs(rows).max(axis=1, keepdims=True) / np.float32(127)
    np.testing.assert_allclose(quantize_codebook(rows, "int8"), np.clip(np.round(rows / s), -127, 127) * s, rtol=1e-6)
    assert np.unique(np.round(np.asarray(quantize_codebook(rows, "int8")) / s)).size <= 255


def test_codebook_float8_matches_ml_dtypes():
    rng = np.random.default_rng(2)
    c = rng.standard_normal((4, 50)).astype(np.float32) * np.array([[0.001], [0.05], [0.3], [3.0]], np.float32)
    scale = np.abs(c).max(axis=1, keepdims=True) / np.float32(448)
    oracle = (c / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    got = np.asarray(quantize_codebook(c, "float8"))
    np.testing.assert_allclose(got, oracle, rtol=1e-6)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 above the subnormal range, largest entry exact.
    big = np.abs(c / scale) >= 2.0**-6
    assert np.all(np.abs(got - c)[big] <= 2.0**-4 * np.abs(c)[big] * (1 + 1e-6))
    np.testing.assert_allclose(np.abs(got).max(axis=1), np.abs(c).max(axis=1), rtol=1e-6)


def test_codebook_zero_rows_and_bad_format():
    for fmt in CODEBOOK_BITS:
        np.testing.assert_array_equal(quantize_codebook(np.zeros((2, 5), np.float32), fmt), 0.0)
    with pytest.raises(ValueError, match="float16"):
        quantize_codebook(np.ones(3, np.float32), "bfloat16")


# ---------------------------------------------------------------- tanh transform


def test_tanh_transform_by_hand():
    x = np.array([[0.1, -0.2, 0.3, 5.0], [0.1, -0.2, 0.3, 5.0]], np.float32)
    mask = np.array([[True, True, True, False]] * 2)
    out = np.asarray(tanh_transform(x, mask, np.array([2.0, 0.0]), np.array([3.0, 3.0])))
    # row 0: mean = 0.2/3 = 1/15, max - min = 0.5, so y = 2*0.5*tanh(3*(x - 1/15)):
    # x = 0.1 -> tanh(0.1) = 0.0996680; x = -0.2 -> tanh(-0.8) = -0.6640368; x = 0.3 -> tanh(0.7) = 0.6043678
    np.testing.assert_allclose(out[0, :3, 1], [0.0996680, -0.6640368, 0.6043678], atol=1e-6)
    assert out[0, 3, 1] == 0.0  # masked weight: second coordinate 0, first unchanged
    np.testing.assert_array_equal(out[..., 0], x)
    np.testing.assert_array_equal(out[1, :, 1], 0.0)  # spread 0: plain 1-D


# ---------------------------------------------------------------- k-means


def test_pack_layers_pads_and_masks():
    values, mask = pack_layers([np.ones((2, 3)), np.arange(4.0)])
    assert values.shape == mask.shape == (2, 6)
    np.testing.assert_array_equal(mask.sum(axis=1), [6, 4])
    np.testing.assert_array_equal(values[1], [0, 1, 2, 3, 0, 0])
    with pytest.raises(ValueError, match="layer 1"):
        pack_layers([np.ones(3), np.array([1.0, np.nan])])
    with pytest.raises(ValueError, match="no layers"):
        pack_layers([])


@pytest.mark.parametrize("layer", [
    "conv1", "fc3",
    # sklearn's ten restarts on the larger layers take most of the time: in the full suite only
    pytest.param("conv2", marks=pytest.mark.slow), pytest.param("fc1", marks=pytest.mark.slow),
    pytest.param("fc2", marks=pytest.mark.slow),
])
def test_kmeans_sse_within_one_percent_of_sklearn(lenet_batch, layer):
    _, _, result = lenet_batch
    ratios = {}
    for row, (name, k) in enumerate(ROWS):
        if name != layer:
            continue
        w = LAYERS[name]
        ref = KMeans(n_clusters=k, n_init=10, random_state=0).fit(w[:, None].astype(np.float64)).inertia_
        ratios[name, k] = float(result.sse[row]) / ref
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 1.01, f"SSE/sklearn ratios {ratios}"


def test_kmeans_result_is_consistent(lenet_batch):
    """Centroids are the means of their clusters' raw weights, sse their squared error, the
    assignment covers exactly the valid weights, unused centroids are 0, 1-D centroids sorted."""
    values, _mask, result = lenet_batch
    for row, (name, k) in enumerate(ROWS):
        w = LAYERS[name].astype(np.float64)
        a = np.asarray(result.assign[row])
        c = np.asarray(result.centroids[row], np.float64)
        assert np.all(a[: w.size] >= 0) and np.all(a[: w.size] < k) and np.all(a[w.size :] == -1)
        assert np.unique(a[: w.size]).size == k  # no empty cluster
        means = np.array([w[a[: w.size] == j].mean() for j in range(k)])
        np.testing.assert_allclose(c[:k], means, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(c[k:], 0.0)
        assert np.all(np.diff(c[:k]) > 0)
        assert float(result.sse[row]) == pytest.approx(((w - c[a[: w.size]]) ** 2).sum(), rel=1e-4)
        assert 1 <= int(result.n_iter_run[row]) <= 50
    shared = np.asarray(quantize_weights(values, result))
    for row, (name, k) in enumerate(ROWS):
        n = LENET5_SIZES[name]
        np.testing.assert_array_equal(shared[row, :n],
                                      np.asarray(result.centroids[row])[np.asarray(result.assign[row, :n])])
        np.testing.assert_array_equal(shared[row, n:], np.asarray(values)[row, n:])
        assert np.unique(shared[row, :n]).size == k


def test_batched_equals_unbatched(lenet_batch):
    """fc3 alone ([1, 840]) and fc3 padded to 48000 in a batch with the other layers agree up
    to float rounding (the row mean is summed over a different length)."""
    _, _, batched = lenet_batch
    n = LENET5_SIZES["fc3"]
    for row, (name, k) in enumerate(ROWS):
        if name != "fc3":
            continue
        _, _, alone = one_row(name, k)
        np.testing.assert_array_equal(alone.assign[0], batched.assign[row, :n])
        np.testing.assert_allclose(alone.centroids[0], batched.centroids[row], rtol=1e-6, atol=1e-8)
        assert float(alone.sse[0]) == pytest.approx(float(batched.sse[row]), rel=1e-5)


def test_repeated_values_and_empty_cluster():
    """Six weights with two distinct values, k = 3 (padded to fc3's shape to reuse its
    compile): SSE 0, and the cluster that empties keeps its previous centroid."""
    values = np.zeros((1, LENET5_SIZES["fc3"]), np.float32)
    values[0, :6] = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    mask = np.zeros_like(values, bool)
    mask[0, :6] = True
    result = kmeans(values, mask, jnp.array([3], jnp.int32), 50)
    assert float(result.sse[0]) == 0.0
    np.testing.assert_array_equal(result.assign[0, :6], [0, 2, 0, 0, 2, 0])
    np.testing.assert_array_equal(result.centroids[0, :4], [0.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(result.assign[0, 6:], -1)


def test_exact_optimum_for_small_layers(lenet_batch):
    """conv1 (150 weights <= n_bins): the DP start is the exact 1-D optimum, checked against
    a brute-force float64 DP over contiguous runs of the sorted weights."""
    _, _, result = lenet_batch
    w = np.sort(LAYERS["conv1"].astype(np.float64))
    n = w.size
    s1, s2 = np.concatenate([[0], np.cumsum(w)]), np.concatenate([[0], np.cumsum(w * w)])
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    cost = np.where(i < j, s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / np.maximum(j - i, 1), np.inf)  # run i..j-1
    best, optimum = cost[0].copy(), {}
    for k in range(2, max(KS) + 1):
        best = np.min(best[:, None] + cost, axis=0)
        optimum[k] = best[n]
    for row, (name, k) in enumerate(ROWS):
        if name == "conv1":
            assert float(result.sse[row]) == pytest.approx(optimum[k], rel=1e-4)


def test_two_d_path_with_zero_transform_equals_one_d():
    """Traced spread/focus take the 2-D path; with spread * focus = 0 it clusters exactly as 1-D."""
    for k, spread, focus in ((5, 0.0, 4.0), (16, 2.0, 0.0), (50, 0.0, 0.0)):
        values, mask, plain = one_row("fc3", k)
        two_d = run_2d(values, mask, jnp.array([k]), jnp.array([spread]), jnp.array([focus]))
        np.testing.assert_array_equal(two_d.assign, plain.assign)
        np.testing.assert_allclose(two_d.centroids, plain.centroids, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(two_d.n_iter_run, plain.n_iter_run)


def test_two_d_path_against_sklearn_in_transformed_space():
    """spread 2, focus 20 (the seed's grid): SSE in the transformed space within 1 % of
    scikit-learn on the transformed points; centroids are raw-weight means."""
    w = LAYERS["fc3"].astype(np.float64)
    for k in (5, 16, 50):
        values, mask = pack_layers([LAYERS["fc3"]])
        result = run_2d(values, mask, jnp.array([k]), jnp.array([2.0]), jnp.array([20.0]))
        points = np.asarray(tanh_transform(values, mask, 2.0, 20.0))[0].astype(np.float64)
        a = np.asarray(result.assign[0])
        ours = sum(((points[a == j] - points[a == j].mean(axis=0)) ** 2).sum() for j in range(k))
        ref = KMeans(n_clusters=k, n_init=10, random_state=0).fit(points).inertia_
        assert ours <= 1.01 * ref
        means = np.array([w[a == j].mean() for j in range(k)])
        np.testing.assert_allclose(np.asarray(result.centroids[0, :k]), means, rtol=1e-5, atol=1e-7)


def test_kmeans_rejects_bad_k():
    values, mask = pack_layers([np.arange(10.0), np.arange(4.0)])
    with pytest.raises(ValueError, match="row 1 asks for k=5"):
        kmeans(values, mask, np.array([3, 5]), 8)
    with pytest.raises(ValueError, match="k=0"):
        kmeans(values, mask, np.array([0, 2]), 8)
    with pytest.raises(ValueError, match="k_max"):
        kmeans(values, mask, np.array([9, 2]), 8)
    with pytest.raises(ValueError, match="n_bins"):
        kmeans(values, mask, np.array([2, 2]), 8, n_bins=8)


def test_padded_layer_clustering_equals_the_unpadded_one():
    """clusters.cluster_layer_2d pads a layer to a power of two and rounds the centroid slots up
    (to share compilations across layers): same clusters as k-means of the bare layer."""
    from qevo.sharing import clusters

    w = LAYERS["fc3"]
    spreads, focuses = np.array([2.0, 2.0, 0.0]), np.array([0.0, 6.0, 3.0])
    for k, slots in ((3, None), (5, 64), (16, None)):
        cents, assign = clusters.cluster_layer_2d(w, k, spreads, focuses, k_slots=slots)
        assert assign.shape == (3, w.size) and cents.shape == (3, slots or 1 << (k - 1).bit_length())
        values, mask = pack_layers([w])
        ref = kmeans(jnp.repeat(values, 3, axis=0), jnp.repeat(mask, 3, axis=0), jnp.full(3, k), k,
                     spread=jnp.asarray(spreads), focus=jnp.asarray(focuses))
        np.testing.assert_array_equal(assign, ref.assign)
        np.testing.assert_allclose(cents[:, :k], ref.centroids, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(cents[:, k:], 0.0)
