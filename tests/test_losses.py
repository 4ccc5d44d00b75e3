"""A user's loss and metric (qevo.models.losses): the defaults against numpy, the checks before a
run, masking of padded examples, the functions reaching the population evaluator, and
docs/examples/custom_loss.py (a multi-label head) on real MNIST."""

import csv
import gzip
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qevo
from helpers import REPO, synthetic_digits
from qevo.config import ConfigError
from qevo.data.datasets import normalize
from qevo.evolution.population import PopulationEvaluator, QATConfig, batch_eval_set, batched_accuracy
from qevo.models import inputs as model_inputs
from qevo.models.losses import cross_entropy, resolve_loss_metric, top1, training_loss
from qevo.models.zoo import get_model, init_variables
from qevo.quant.calibration import calibrate


def _logits_and_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)).astype(np.float32)
    logits[3] = [1, 2, 2, 0, -1]  # a tie: the first of the largest counts, as numpy's argmax
    return logits, np.array([0, 4, 2, 1, 1, 3, 2], np.int32)


def test_the_defaults_are_cross_entropy_and_top1_by_numpy():
    logits, labels = _logits_and_labels()
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(1, keepdims=True))
    assert float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(
        -logp[np.arange(7), labels].mean(), rel=1e-6)
    right = np.argmax(logits, 1) == labels
    np.testing.assert_array_equal(top1(jnp.asarray(logits), jnp.asarray(labels)), right.astype(np.float32))
    # the padded, batched mean is the count of right answers over the real examples, to the bit
    table = jnp.asarray(np.concatenate([np.zeros((1, 5), np.float32), logits]))  # row 0: the padding's
    images = jnp.arange(1, 8, dtype=jnp.uint8)[:, None]
    accuracy = batched_accuracy(lambda x: table[x[:, 0].astype(jnp.int32)], batch_eval_set(images, labels, 3))
    assert accuracy.dtype == jnp.float32 and float(accuracy) == np.float32(right.sum()) / np.float32(7)


def test_padded_examples_with_multi_label_labels_are_masked():
    """Labels ``[N, K]`` pad to ``[B, batch, K]`` with zeros; the padding scores 1 against its
    zero labels and must not count."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, 3)).astype(np.float32)
    labels = (rng.random((7, 3)) < 0.5).astype(np.float32)
    table = jnp.asarray(np.concatenate([np.full((1, 3), -1.0, np.float32), logits]))
    images = jnp.arange(1, 8, dtype=jnp.uint8)[:, None]
    batches = batch_eval_set(images, jnp.asarray(labels), 3)
    assert batches[1].shape == (3, 3, 3) and not np.asarray(batches[1][2, 1:]).any()
    np.testing.assert_array_equal(np.asarray(batches[2]).ravel(), np.arange(9) < 7)

    def labels_right(z, y):
        return jnp.mean((z > 0) == (y > 0.5), axis=-1)

    got = float(batched_accuracy(lambda x: table[x[:, 0].astype(jnp.int32)], batches, labels_right))
    per_example = ((logits > 0) == (labels > 0.5)).mean(1)
    assert got == pytest.approx(per_example.mean(), abs=1e-7)
    assert got != pytest.approx((per_example.sum() + 2) / 9, abs=1e-4)  # what counting the padding gives


def test_a_loss_or_metric_that_does_not_fit_is_refused_in_one_line():
    logits = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    bce = lambda z, y: optax.sigmoid_binary_cross_entropy(z, y).mean()  # noqa: E731
    right = lambda z, y: (z > 0) == (y > 0.5)  # noqa: E731
    assert resolve_loss_metric(None, None, logits, jax.ShapeDtypeStruct((2,), jnp.int32)) == (cross_entropy, top1)
    with pytest.raises(ConfigError, match=r"metric= gives \(2, 3\) bool .* \(here N = 2\)"):
        resolve_loss_metric(bce, right, logits, labels)
    assert resolve_loss_metric(bce, lambda z, y: right(z, y).all(-1), logits, labels)[0] is bce
    with pytest.raises(ConfigError, match=r"^loss= gives \(2, 3\) float32 on logits \(2, 3\) float32 and labels "
                                          r"\(2, 3\) float32; it must be loss\(logits, labels\) -> float32 \[\]"):
        resolve_loss_metric(lambda z, y: optax.sigmoid_binary_cross_entropy(z, y), None, logits, labels)
    with pytest.raises(ConfigError, match=r"^metric= fails on logits .*\(TracerArrayConversionError: .*\); it must "
                                          r"be a jit-traceable metric\(logits, labels\) -> float32 \[N\]$"):
        resolve_loss_metric(bce, lambda z, y: np.asarray(z).mean(1), logits, labels)
    with pytest.raises(ConfigError, match=r"metric= gives \(\) float32 .* \(here N = 2\)"):
        resolve_loss_metric(bce, lambda z, y: jnp.mean(z), logits, labels)
    with pytest.raises(ConfigError, match="loss= must be a function loss"):
        resolve_loss_metric("bce", top1)
    with pytest.raises(ConfigError, match=r"train.label_smoothing=0.1 smooths the default cross-entropy only"):
        training_loss(bce, 0.1)
    smoothed = training_loss(cross_entropy, 0.1)
    z, y = jnp.asarray(np.eye(3, dtype=np.float32)), jnp.arange(3)
    assert float(smoothed(z, y)) == pytest.approx(float(cross_entropy(z, y, 0.1)), rel=1e-7)
    assert float(smoothed(z, y)) != pytest.approx(float(cross_entropy(z, y)), rel=1e-3)


def _multi_label_data(n=40):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (n, 6, 6, 1)).astype(np.uint8)
    y = (rng.random((n, 3)) < 0.5).astype(np.float32)
    return qevo.Dataset.from_arrays(train=(x, y), test=(x[:8], y[:8]), val_size=8, labels="any")


def test_labels_that_are_not_classes_need_a_model_loss_and_metric_of_the_users():
    import flax.linen as nn

    class Head(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    data = _multi_label_data()
    cfg = qevo.search_defaults()
    for model, loss in ((None, None), (Head(), None)):
        with pytest.raises(ConfigError, match=r"data with labels='any' needs model=, loss= and metric= of yours"):
            model_inputs.resolve_inputs(cfg, model, None, data, loss, None)
    bce = lambda z, y: optax.sigmoid_binary_cross_entropy(z, y).mean()  # noqa: E731
    right = lambda z, y: jnp.mean((z > 0) == (y > 0.5), axis=-1)  # noqa: E731
    inputs = model_inputs.resolve_inputs(cfg, Head(), None, data, bce, right)
    assert (inputs.loss, inputs.metric) == (bce, right) and inputs.ds.num_classes is None
    with pytest.raises(ConfigError, match=r"loss= fails on logits \(2, 3\) float32 and labels \(2, 3\) float32"):
        model_inputs.resolve_inputs(cfg, Head(), None, data, cross_entropy, right)


@pytest.fixture(scope="module")
def lenet():
    ds = synthetic_digits(train=512, val=200, test=10)
    model = get_model("lenet5", 10)
    variables = init_variables(model, jax.random.key(0), (28, 28, 1))
    variables = calibrate(model, variables, normalize(ds.train_images[:256], ds.mean, ds.std))
    widths = np.array([[32, 4, 4, 4, 32], [32, 2, 8, 2, 32], [32, 8, 8, 8, 32]], np.int32)
    return ds, model, variables, widths


def test_the_users_metric_and_loss_reach_the_population_evaluator(lenet):
    ds, model, variables, w = lenet
    x, y = jnp.asarray(ds.val_images), jnp.asarray(ds.val_labels)
    ones = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=64, metric=lambda z, y: jnp.ones(z.shape[0]))
    np.testing.assert_array_equal(1.0 - np.asarray(ones(variables, w, w, x, y)), 0.0)  # the search's error: 0

    qat = QATConfig(steps=5, batch_size=32, learning_rate=0.05)
    data = {"key": jax.random.key(1), "train_images": jnp.asarray(ds.train_images),
            "train_labels": jnp.asarray(ds.train_labels)}
    plain = np.asarray(PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=64)(variables, w, w, x, y))
    zero = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=64, qat=qat,
                               loss=lambda z, y: 0.0 * jnp.sum(z))
    tuned = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=64, qat=qat)
    # a loss of zero has zero gradients: QAT leaves every individual as calibrated; cross-entropy does not
    np.testing.assert_array_equal(np.asarray(zero(variables, w, w, x, y, **data)), plain)
    assert not np.array_equal(np.asarray(tuned(variables, w, w, x, y, **data)), plain)


def test_the_population_evaluator_scores_multi_label_labels_as_numpy_does(lenet):
    """A head of 3 logits against labels ``[N, 3]`` (odd digit, digit above 4, digit 0):
    calibration-only scores equal numpy's metric on each individual's own forward pass, and
    QAT on those labels runs with the user's loss."""
    ds, _, _, w = lenet
    model = get_model("lenet5", 3)
    variables = init_variables(model, jax.random.key(0), (28, 28, 1))
    variables = calibrate(model, variables, normalize(ds.train_images[:256], ds.mean, ds.std))

    def targets(d):
        return jnp.asarray(np.stack([d % 2 == 1, d > 4, d == 0], 1).astype(np.float32))

    def right(z, y):
        return jnp.mean((z > 0) == (y > 0.5), axis=-1)

    x, y = jnp.asarray(ds.val_images[:150]), targets(ds.val_labels[:150])
    ev = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=64, metric=right)
    got = np.asarray(ev(variables, w, w, x, y))
    for i in range(len(w)):
        bits = qevo.Bits(jnp.asarray(w[i]), jnp.asarray(w[i]))
        z = np.asarray(model.apply(variables, normalize(x, ds.mean, ds.std), bits))
        assert got[i] == pytest.approx(((z > 0) == (np.asarray(y) > 0.5)).mean(), abs=1e-6)
    qat = QATConfig(steps=3, batch_size=32, learning_rate=0.05)
    tuned = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=64, qat=qat, metric=right,
                                loss=lambda z, y: optax.sigmoid_binary_cross_entropy(z, y).mean())
    after = np.asarray(tuned(variables, w, w, x, y, key=jax.random.key(1), train_images=jnp.asarray(ds.train_images),
                             train_labels=targets(ds.train_labels)))
    assert after.shape == (3,) and np.all((after >= 0) & (after <= 1)) and not np.array_equal(after, got)


def _attributes(digits: np.ndarray) -> np.ndarray:
    """The example's labels, restated as the oracle: even, above 4, has a loop (0, 6, 8, 9)."""
    return np.stack([digits % 2 == 0, digits > 4, np.isin(digits, (0, 6, 8, 9))], axis=1)


@pytest.mark.slow
def test_the_custom_loss_example_beats_the_best_constant_guess_on_real_mnist(data_dir, tmp_path):
    """docs/examples/custom_loss.py at its tiny budget: the float model trained with binary
    cross-entropy gets more of the three labels right on the test split than the best constant
    guess per label (numpy, on the same 1,000 test images), and so do the search's front and
    its trained models; every error the search recorded lies in [0, 1]."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(REPO / "docs" / "examples" / "custom_loss.py"), "--data",
                           str(data_dir), "--tiny", "--workdir", str(run)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    with gzip.open(data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        digits = np.frombuffer(f.read(), np.uint8, offset=8)[:1000]
    positive = _attributes(digits).mean(0)
    guess = np.maximum(positive, 1 - positive).mean()
    float_metric = float(re.search(r"^float +([0-9.]+) of the labels right", done.stdout, re.M).group(1))
    trained = json.loads((run / "float" / "results.json").read_text())
    assert float_metric == pytest.approx(trained["test_accuracy"], abs=1e-4)
    assert float_metric > guess + 0.1, (float_metric, guess)
    history = [json.loads(line) for line in (run / "search" / "history.jsonl").read_text().splitlines()]
    assert history and all(0.0 <= r["objectives"]["error"] <= 1.0 for r in history)
    with (run / "search" / "pareto.csv").open() as f:
        front = [1 - float(r["val_accuracy"]) for r in csv.DictReader(f)]
    assert front and min(front) < 1 - guess
    with (run / "search" / "final.csv").open() as f:
        final = {r["name"]: float(r["test_accuracy"]) for r in csv.DictReader(f)}
    assert {"w8a8", "w4a4", "w2a2", "float"} <= set(final) and final["w8a8"] > guess + 0.1

