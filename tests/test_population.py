"""Population evaluator: strategies, sharding over devices, QAT, bad input; on synthetic images
(``helpers.synthetic_digits``), as the engine needs no real data."""

import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import on_cpu_devices, synthetic_digits
from qevo.data.datasets import normalize
from qevo.evolution.population import (
    VMAP_QAT_MAX_MACS,
    PopulationEvaluator,
    PopulationMemoryError,
    QATConfig,
    batch_eval_set,
    batched_accuracy,
    resolve_strategy,
)
from qevo.models.cost import layer_table
from qevo.models.zoo import get_model, init_variables
from qevo.quant.calibration import calibrate
from qevo.quant.layers import Bits

N_EVAL = 300


@pytest.fixture(scope="module")
def setup():
    ds = synthetic_digits()
    model = get_model("lenet5", 10)
    variables = init_variables(model, jax.random.key(0), (28, 28, 1))
    variables = calibrate(model, variables, normalize(ds.train_images[:256], ds.mean, ds.std))
    rng = np.random.default_rng(0)
    w = rng.choice([1, 2, 3, 4, 8, 32], size=(6, 5)).astype(np.int32)
    a = rng.choice([2, 3, 4, 8, 32], size=(6, 5)).astype(np.int32)
    x, y = jnp.asarray(ds.val_images[:N_EVAL]), jnp.asarray(ds.val_labels[:N_EVAL])
    return ds, model, variables, w, a, x, y


def _loop(model, variables, w, a, x, y, ds):
    """Per-individual reference: one plain forward pass per configuration."""
    batches = batch_eval_set(x, y, 128)
    out = []
    for i in range(w.shape[0]):
        bits = Bits(jnp.asarray(w[i]), jnp.asarray(a[i]))
        out.append(batched_accuracy(lambda im, bits=bits: model.apply(variables, normalize(im, ds.mean, ds.std), bits),
                                    batches))
    return np.asarray(out)


@pytest.mark.parametrize("strategy, chunk", [("vmap", None), ("map", 4), ("auto", None)])
def test_strategies_equal_loop(setup, strategy, chunk):
    ds, model, variables, w, a, x, y = setup
    ev = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=128, strategy=strategy, chunk_size=chunk)
    got = np.asarray(ev(variables, w, a, x, y))
    np.testing.assert_allclose(got, _loop(model, variables, w, a, x, y, ds), atol=1.5 / N_EVAL)
    assert got.shape == (6,) and len(set(got.tolist())) > 2  # the configurations really differ


def test_qat_improves_low_bit_accuracy_and_strategies_agree(setup):
    ds, model, variables, _w, _a, x, y = setup
    w2 = np.full((2, 5), 4, np.int32)
    a2 = np.full((2, 5), 4, np.int32)
    train_x, train_y = jnp.asarray(ds.train_images[:5000]), jnp.asarray(ds.train_labels[:5000])
    key = jax.random.key(1)

    def run(strategy, steps, size=2):
        qat = QATConfig(steps=steps, batch_size=64, learning_rate=1e-3, optimizer="adam")
        ev = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=128, strategy=strategy, qat=qat)
        return np.asarray(ev(variables, w2[:size], a2[:size], x, y, key=key, train_images=train_x,
                             train_labels=train_y))

    # Batched and sequential convolutions round differently; two steps keep that invisible.
    np.testing.assert_allclose(run("vmap", 2), run("map", 2), atol=1.5 / N_EVAL)
    before = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=128)(variables, w2, a2, x, y)
    after = run("auto", 30)
    # the same individual alone: its fine-tuning does not depend on its population
    np.testing.assert_array_equal(run("auto", 30, size=1), after[:1])
    assert after[0] > float(before[0]) + 0.3  # 30 Adam steps lift an untrained net well above chance


def test_four_host_devices_equal_one():
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        import jax, jax.numpy as jnp, numpy as np
        from helpers import synthetic_digits
        from qevo.data.datasets import normalize
        from qevo.quant.calibration import calibrate
        from qevo.evolution.population import PopulationEvaluator
        from qevo.models.zoo import get_model, init_variables
        assert len(jax.devices()) == 4, jax.devices()
        ds = synthetic_digits()
        model = get_model("lenet5", 10)
        v = calibrate(model, init_variables(model, jax.random.key(0), (28, 28, 1)),
                      normalize(ds.train_images[:256], ds.mean, ds.std))
        rng = np.random.default_rng(0)
        w = rng.choice([2, 3, 4, 8, 32], size=(6, 5)); a = rng.choice([2, 4, 8, 32], size=(6, 5))
        x, y = jnp.asarray(ds.val_images[:{N_EVAL}]), jnp.asarray(ds.val_labels[:{N_EVAL}])
        four = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=100)
        one = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=100, devices=jax.devices()[:1])
        assert four.num_devices == 4 and one.num_devices == 1
        np.testing.assert_array_equal(np.asarray(four(v, w, a, x, y)), np.asarray(one(v, w, a, x, y)))
        print("OK")
        """
    )
    out = on_cpu_devices(script, 4)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize(
    "w, a, match",
    [
        (np.full((3, 5), 0), np.full((3, 5), 8), "impossible bit widths"),
        (np.full((3, 5), 33), np.full((3, 5), 8), "impossible bit widths"),
        (np.full((3, 4), 8), np.full((3, 4), 8), r"expected \[5\]"),
        (np.full(5, 8), np.full(5, 8), "must be a population"),
    ],
)
def test_bad_bits(setup, w, a, match):
    ds, model, variables, _, _, x, y = setup
    with pytest.raises(ValueError, match=match):
        PopulationEvaluator(model, ds.mean, ds.std)(variables, w, a, x, y)


@pytest.mark.parametrize("strategy, chunk, message", [("pmap", None, "unknown population strategy 'pmap'"),
                                                      ("map", 0, "chunk_size must be >= 1")])
def test_bad_strategy_fails_at_construction(setup, strategy, chunk, message):
    ds, model, *_ = setup
    with pytest.raises(ValueError, match=message):
        PopulationEvaluator(model, ds.mean, ds.std, strategy=strategy, chunk_size=chunk)


def _overcommits_always() -> bool:
    path = pathlib.Path("/proc/sys/vm/overcommit_memory")
    return path.exists() and path.read_text().strip() == "1"


@pytest.mark.skipif(_overcommits_always(), reason="the OS grants any allocation here and kills the process instead")
def test_population_too_big_for_memory_says_how_to_fit(setup):
    """2^18 LeNet-5s vmapped over 10,000 images at once: the first convolution's output alone
    is 2^18 x 10,000 x 28 x 28 x 6 float32, 5 x 10^13 bytes, far beyond any host's memory."""
    ds, model, variables, *_ = setup
    x, y = jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels)
    w = np.full((2**18, 5), 8, np.int32)
    ev = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=x.shape[0], strategy="vmap")
    with pytest.raises(PopulationMemoryError) as err:
        ev(variables, w, w, x, y)
    message = str(err.value)
    assert message.startswith(f"evaluating {2**18} individuals "
                              f"(vmap over all {2**18} per device, 10000 images per forward pass)")
    assert "does not fit the memory of 1 cpu device(s): RESOURCE_EXHAUSTED" in message
    assert "strategy='map' with a small chunk_size" in message


def test_auto_strategy_by_backend_and_qat_step_size():
    assert resolve_strategy("auto", None, "cpu") == ("map", 1)
    assert resolve_strategy("auto", None, "gpu") == ("vmap", None)
    assert resolve_strategy("auto", None, "gpu", VMAP_QAT_MAX_MACS) == ("vmap", None)
    assert resolve_strategy("auto", None, "gpu", VMAP_QAT_MAX_MACS + 1) == ("map", 1)
    assert resolve_strategy("vmap", 4, "gpu", 10**12) == ("vmap", 4)


def test_auto_strategy_follows_each_calls_image_size():
    """On an accelerator, "auto" with QAT goes by the MACs of a step on the images of that
    call (ResNet-20: 40.8 M per 32x32 image, four times that at 64x64): 20-image steps vmap
    at 32x32 and go one individual at a time at 64x64, whichever call comes first."""
    model = get_model("resnet20", 10)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    macs = int(layer_table(model, variables, (32, 32, 3)).macs.sum())
    assert macs > 40e6 and macs * 20 <= VMAP_QAT_MAX_MACS < 4 * macs * 20
    gpu = type("Device", (), {"platform": "gpu"})()
    ev = PopulationEvaluator(model, (0.5,) * 3, (0.25,) * 3, qat=QATConfig(steps=1, batch_size=20), devices=(gpu,))
    assert ev.local_strategy(variables, (64, 64, 3)) == ("map", 1)
    assert ev.local_strategy(variables, (32, 32, 3)) == ("vmap", None)
    assert ev.local_strategy(variables, (64, 64, 3)) == ("map", 1)
