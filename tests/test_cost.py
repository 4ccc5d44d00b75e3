"""Cost model against hand computations and the QuantEA reference's published figures."""

import jax
import numpy as np
import pytest

from qevo.models import cost
from qevo.models.zoo import get_model, init_variables


def _table(name, shape):
    model = get_model(name, 10)
    return cost.layer_table(model, init_variables(model, jax.random.key(0), shape), shape)


@pytest.fixture(scope="module")
def lenet():
    return _table("lenet5", (28, 28, 1))


@pytest.fixture(scope="module")
def resnet20():
    return _table("resnet20", (32, 32, 3))


def test_lenet_counts_by_hand(lenet):
    # conv1 28x28 out, 6 filters of 5x5x1; conv2 10x10 out, 16 of 5x5x6; dense 400-120-84-10.
    np.testing.assert_array_equal(lenet.macs, [28 * 28 * 6 * 25, 10 * 10 * 16 * 150, 400 * 120, 120 * 84, 84 * 10])
    np.testing.assert_array_equal(lenet.weights, [150, 2400, 48000, 10080, 840])
    assert lenet.other_params == 6 + 16 + 120 + 84 + 10  # biases


def test_lenet_bitops_by_hand(lenet):
    w = np.array([32, 4, 2, 8, 32])
    a = np.array([32, 4, 8, 2, 32])
    want = 117600 * 32 * 32 + 240000 * 4 * 4 + 48000 * 2 * 8 + 10080 * 8 * 2 + 840 * 32 * 32
    assert float(cost.bitops(lenet, w, a)) == pytest.approx(want, rel=1e-6)
    size = 150 * 32 + 2400 * 4 + 48000 * 2 + 10080 * 8 + 840 * 32 + 236 * 32
    assert float(cost.size_bits(lenet, w)) == pytest.approx(size, rel=1e-6)


def test_vectorised_over_population(lenet):
    rng = np.random.default_rng(0)
    w = rng.choice([2, 4, 8, 32], size=(7, 5))
    a = rng.choice([2, 4, 8, 32], size=(7, 5))
    got = np.asarray(cost.bitops(lenet, w, a))
    assert got.shape == (7,)
    for i in range(7):
        assert got[i] == pytest.approx(float(cost.bitops(lenet, w[i], a[i])), rel=1e-6)


@pytest.mark.parametrize("bits, flops_m, params_k", [(32, 40.81, 272.5), (8, 20.63, 70.1), (4, 10.54, 36.4)])
def test_resnet20_matches_quantea_reference(resnet20, bits, flops_m, params_k):
    w = np.full(20, bits)
    w[0] = w[-1] = 32  # first conv and classifier stay float, as in the reference
    assert float(cost.reference_flops(resnet20, w, w)) / 1e6 == pytest.approx(flops_m, rel=0.01)
    assert float(cost.reference_params(resnet20, w)) / 1e3 == pytest.approx(params_k, rel=0.01)
