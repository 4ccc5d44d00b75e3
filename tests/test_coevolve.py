"""Cooperative coevolution: the EDA pieces against hand computation, a compiled cycle with no
derivative in it, config errors, resume to the same result, and the real-MNIST claim.

Fast tests use the session's tiny float LeNet-5 (``conftest``) at 2 bits with a small budget;
the slow one uses the 5-epoch float LeNet-5 of ``conftest``.
"""

import dataclasses
import json
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, Killed, kill_after_checkpoint, on_cpu_devices, run_command, without_seconds
from qevo import config as config_lib
from qevo.checkpoint import load as load_checkpoint
from qevo.coevolve import algorithm as coevolve_algorithm
from qevo.coevolve import config as coevolve_config
from qevo.coevolve import method as coevolve_method
from qevo.data.datasets import Dataset
from qevo.evolution.loop import step_keys
from qevo.evolution.population import population_map
from qevo.harness import CHECKPOINT
from qevo.models import inputs as model_inputs
from qevo.models.zoo import get_model, init_variables
from qevo.quant import intforward
from qevo.quant.intforward import IntKernel
from qevo.train import trainer as training

TINY = {
    "coevolve.w_bits": 2,
    "coevolve.cycles": 3,
    "coevolve.num_groups": 3,
    "coevolve.group_size": 64,
    "coevolve.population_size": 4,
    "coevolve.batch_size": 64,
    "coevolve.eval_images": 500,
    "data.max_train_images": 3000,
}


def _args(values: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in values.items()]


def _config(float_dir, data_dir, **extra):
    overrides = {**TINY, "float_from": str(float_dir), "data.data_dir": str(data_dir), **extra}
    return coevolve_config.validate(config_lib.load(REPO / "configs" / "lenet5_cc.py",
                                             [f"{k}={v}" for k, v in overrides.items()]))


@pytest.fixture(scope="module")
def prepared(tiny_lenet5_float, data_dir, tmp_path_factory):
    return coevolve_method.prepare(_config(tiny_lenet5_float, data_dir), tmp_path_factory.mktemp("cc"))


# --------------------------------------------------------------------------- EDA pieces


def test_initial_marginals_by_hand():
    q0 = jnp.array([-1, 0, 1], jnp.int8)  # 2-bit levels -1..1
    np.testing.assert_allclose(coevolve_algorithm.initial_probs(q0, 1, 1, 0.9),
                               [[0, 0.9, 0.1], [0.05, 0.9, 0.05], [0.1, 0.9, 0]],
                               rtol=1e-6)
    np.testing.assert_allclose(coevolve_algorithm.initial_probs(q0, 1, 2, 0.9)[0], [0, 0, 0.9, 0.05, 0.05], rtol=1e-6)
    q0 = jnp.array([7, -5], jnp.int8)  # 4-bit levels -7..7
    probs = coevolve_algorithm.initial_probs(q0, 7, 2, 0.8)
    np.testing.assert_allclose(probs, [[0.1, 0.1, 0.8, 0, 0], [0.05, 0.05, 0.8, 0.05, 0.05]], rtol=1e-6)
    np.testing.assert_array_equal(coevolve_algorithm.allowed(q0, 7, 2), probs > 0)


def test_marginal_update_by_hand():
    probs = np.array([[0.1, 0.8, 0.1], [0.0, 0.9, 0.1], [0.3, 0.3, 0.4]], np.float32)
    best, active, lr = np.array([2, 1, 0]), np.array([True, True, False]), 0.25
    want = probs.copy()
    for i in range(2):
        want[i] = (1 - lr) * probs[i]
        want[i, best[i]] += lr
    got = coevolve_algorithm.update_marginals(jnp.asarray(probs), jnp.asarray(best), jnp.asarray(active), lr)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(np.sum(got, axis=1), 1.0, rtol=1e-6)


def test_select_accepts_a_sample_only_by_the_paired_margin():
    """Against the paired test written out in numpy: the sample of lowest mean loss wins when
    ``mean(d) + z * std(d) / sqrt(B) < 0`` for its per-image differences ``d`` to the context."""
    rng = np.random.default_rng(0)
    context = rng.uniform(0.5, 2.0, 64)
    noise = rng.normal(0.0, 0.5, 64)
    noisy = context + noise - noise.mean() - 0.05  # lower mean, well within its noise
    steady = context - 0.01  # every image slightly better
    losses = np.stack([context, noisy, steady + 0.02, steady]).astype(np.float32)
    best = int(np.argmin(losses.mean(1)))
    for z in (0.0, 0.5, 2.0):
        d = losses[best] - losses[0]
        want = best if d.mean() + z * d.std() / np.sqrt(64) < 0 else 0
        assert int(coevolve_algorithm.select(jnp.asarray(losses), z)) == want, z
    # the noisy sample wins on its mean, the steady one on its margin
    assert best == 1 and int(coevolve_algorithm.select(jnp.asarray(losses), 0.0)) == 1
    assert int(coevolve_algorithm.select(jnp.asarray(losses[[0, 2, 3]]), 2.0)) == 2
    assert int(coevolve_algorithm.select(jnp.asarray(losses), 2.0)) == 0  # a noisy best at z = 2 keeps the context
    broken = losses.copy()
    broken[0, 5] = np.inf  # a context of non-finite loss loses to any finite sample
    assert int(coevolve_algorithm.select(jnp.asarray(broken), 2.0)) == 1
    broken[1, 3] = np.nan  # a sample of non-finite loss never wins
    assert int(coevolve_algorithm.select(jnp.asarray(broken), 2.0)) == 3


def test_freeze_fixes_confident_weights_at_their_most_likely_level():
    probs = jnp.array([[0.0, 0.99, 0.01], [0.96, 0.04, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    context = jnp.array([0, 1, -1, 2], jnp.int8)
    q0 = jnp.array([0, 1, 0, 2], jnp.int8)
    fixed, frozen = coevolve_algorithm.freeze(probs, context, q0, 1, 0.95)
    np.testing.assert_array_equal(frozen, [True, True, False, True])
    np.testing.assert_array_equal(fixed, [0, 0, -1, 3])  # q0 + argmax - r; the unconfident keeps its context


def test_regroup_takes_the_least_confident_in_random_order_of_ties():
    conf = np.array([0.9, 0.5, 0.7, 0.5, 0.99, 0.6, 0.5, 0.8])
    probs = jnp.asarray(np.stack([conf, 1 - conf], axis=1), jnp.float32)
    orders = set()
    for seed in range(8):
        groups = np.asarray(coevolve_algorithm.regroup(jax.random.key(seed), probs, 2, 3))
        assert groups.shape == (2, 3)
        assert set(groups[0]) == {1, 3, 6} and list(groups[1]) == [5, 2, 7]
        orders.add(tuple(groups[0]))
    assert len(orders) > 1  # ties broken at random


@pytest.mark.parametrize("strategy, chunk", [("vmap", None), ("map", None), ("map", 3)])
def test_population_map_strategies_agree(strategy, chunk):
    xs = jnp.arange(20.0).reshape(5, 4)
    fn = lambda row, shared: (jnp.sum(row**2) + shared[0], jnp.max(row[shared[1]]))  # noqa: E731
    got = jax.jit(lambda x: population_map(fn, x, (1.0, jnp.arange(2)), tuple(jax.devices()), strategy,
                                                    chunk))(xs)
    np.testing.assert_array_equal(got[0], np.sum(np.asarray(xs) ** 2, axis=1) + 1.0)
    np.testing.assert_array_equal(got[1], np.asarray(xs)[:, 1])


def test_population_map_shards_over_devices():
    """Four host devices, a population of 5 (padded to 8): the same as one device."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from qevo.evolution.population import population_map
        assert len(jax.devices()) == 4
        xs = jnp.arange(20.0).reshape(5, 4)
        fn = lambda row, shared: jnp.sum(row * shared[0]) + row[shared[1]].sum()
        for strategy in ("vmap", "map"):
            got = jax.jit(lambda x: population_map(fn, x, (jnp.arange(4.0), jnp.array([0, 2])), tuple(jax.devices()),
                                                   strategy, None))(xs)
            want = np.asarray(xs) @ np.arange(4.0) + np.asarray(xs)[:, [0, 2]].sum(1)
            np.testing.assert_array_equal(got, want)
        print("ok")
    """)
    out = on_cpu_devices(code, 4, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --------------------------------------------------------------------------- no derivatives


def test_compiled_cycle_computes_no_derivative(prepared):
    runner = prepared.runner
    state = runner.init_state(prepared.problem, jax.random.PRNGKey(0))
    jaxpr = jax.make_jaxpr(runner._cycle)(state, prepared.problem, step_keys(jax.random.key(1), 0))
    assert coevolve_algorithm.derivative_equations(jaxpr) == []
    text = str(jaxpr)
    assert "scan" in text and "dot_general" in text  # the inspected jaxpr holds the real loop


def test_derivative_check_flags_gradients(prepared):
    """The checker finds jax.grad (QAT's epoch, and a gradient slipped into the population
    loss), jax.vjp and jax.jvp."""
    runner, problem = prepared.runner, prepared.problem
    trainer = training.Trainer(prepared.cfg, prepared.ds, prepared.model, quantized=True)
    bits = model_inputs.uniform_bits(5, 2, 8)
    epoch = jax.make_jaxpr(trainer._epoch)(trainer.init_state(prepared.variables), bits, jax.random.key(0),
                                           problem.images, problem.labels)
    found = coevolve_algorithm.derivative_equations(epoch)
    assert found and any("transpose(" in f for f in found)

    idx = jnp.arange(8)
    values = jnp.zeros((2, 8), jnp.int8)

    def with_gradient(scales):
        def loss(s):
            return jnp.sum(runner.population_loss(problem.replace(scales=s), problem.q0, idx, values,
                                                  problem.images[:32], problem.labels[:32])[0])
        return jax.grad(loss)(scales)

    assert coevolve_algorithm.derivative_equations(jax.make_jaxpr(with_gradient)(problem.scales))
    f = lambda w: jnp.tanh(w @ w)  # noqa: E731
    w = jnp.ones((3, 3))
    assert coevolve_algorithm.derivative_equations(jax.make_jaxpr(lambda w: jax.vjp(f, w)[1](w))(w))
    assert coevolve_algorithm.derivative_equations(jax.make_jaxpr(lambda w: jax.jvp(f, (w,), (w,))[1])(w))
    assert coevolve_algorithm.derivative_equations(jax.make_jaxpr(f)(w)) == []


# --------------------------------------------------------------------------- the cycle


def test_population_loss_is_each_images_loss_alone_and_takes_the_users_loss_and_metric(prepared):
    """Per-image losses ``[P, B]`` and accuracies ``[P]`` of two assignments of 5 weights: by
    default numpy's softmax cross-entropy and top-1 of each network's logits; with a user's
    loss (the mean first logit) and metric (first logit above the second) those instead."""
    runner, problem = prepared.runner, prepared.problem
    idx = jnp.arange(5)
    values = jnp.stack([problem.q0[idx], -problem.q0[idx]])  # 2-bit levels -1..1: both allowed
    images, labels = problem.images[:32], np.asarray(problem.labels[:32])
    custom = dataclasses.replace(runner, loss=lambda z, y: jnp.mean(z[:, 0]), metric=lambda z, y: z[:, 0] > z[:, 1])
    default_out = jax.device_get(runner.population_loss(problem, problem.q0, idx, values, images, labels))
    custom_out = jax.device_get(custom.population_loss(problem, problem.q0, idx, values, images, labels))
    for i in range(2):
        z = np.asarray(runner.logits(problem, problem.q0.at[idx].set(values[i]), images, "float"), np.float64)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        np.testing.assert_allclose(default_out[0][i], -logp[np.arange(32), labels], rtol=2e-5, atol=1e-6)
        assert default_out[1][i] == pytest.approx(np.mean(np.argmax(z, 1) == labels), abs=1e-7)
        np.testing.assert_allclose(custom_out[0][i], z[:, 0], rtol=2e-5, atol=1e-6)
        assert custom_out[1][i] == pytest.approx(np.mean(z[:, 0] > z[:, 1]), abs=1e-7)


def test_cycle_keeps_the_best_and_valid_marginals(prepared):
    runner, problem = prepared.runner, prepared.problem
    state = runner.init_state(problem, jax.random.PRNGKey(3))
    new, stats = runner.cycle(state, problem, step_keys(jax.random.key(4), 0))
    assert np.all(stats.best_loss <= stats.loss) and np.array_equal(stats.improved, stats.best_loss < stats.loss)
    probs = np.asarray(new.probs)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(probs[~np.asarray(coevolve_algorithm.allowed(problem.q0, 1, 1))] == 0)
    changed = np.flatnonzero(np.asarray(new.context) != np.asarray(problem.q0))
    moved = np.flatnonzero(np.any(probs != np.asarray(state.probs), axis=1))
    assert changed.size and set(changed) <= set(moved)
    assert moved.size == 3 * 64  # every weight of every group, and no other
    # the new context's levels are each one step at most from round to nearest, inside -1..1
    assert np.all(np.abs(np.asarray(new.context, int) - np.asarray(problem.q0, int)) <= 1)
    assert np.all(np.abs(np.asarray(new.context)) <= 1)
    assert int(new.cycle) == 1


def test_interrupted_evolution_resumes_to_the_same_state(tiny_lenet5_float, data_dir, prepared, tmp_path):
    whole_state, whole = coevolve_method.evolve(prepared, tmp_path / "whole")
    first = coevolve_method.Prepared(**{**prepared.__dict__,
                                 "cfg": _config(tiny_lenet5_float, data_dir, **{"coevolve.cycles": 1})})
    coevolve_method.evolve(first, tmp_path / "split")
    assert load_checkpoint(tmp_path / "split" / CHECKPOINT)[1] == {"cycle": 1}
    state, history = coevolve_method.evolve(prepared, tmp_path / "split")
    for a, b in zip(jax.tree_util.tree_leaves(whole_state), jax.tree_util.tree_leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(history) == strip(whole) and [r["cycle"] for r in history] == [1, 2, 3]
    assert history[-1]["evaluations"] == 3 * 3 * 4 and history[-1]["images"] == 3 * 3 * 64


# --------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_command_writes_every_output(tiny_lenet5_float, data_dir, tmp_path):
    args = [f"--config.float_from={tiny_lenet5_float}", *_args(TINY)]
    run = tmp_path / "run"
    out = run_command("qevo.coevolve", "lenet5_cc.py", run, args, data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cycle   3/3  loss" in out.stderr and "evals/s" in out.stderr and "confident" in out.stderr
    for name in ("config.json", "checkpoint.msgpack", "history.jsonl", "integer_model.msgpack", "results.json",
                 "qat/checkpoint.msgpack"):
        assert (run / name).is_file(), name
    result = json.loads((run / "results.json").read_text())
    assert result["w_bits"] == [32, 2, 2, 2, 32] and result["a_bits"] == [32, 8, 8, 8, 32]
    for method in ("float", "round_to_nearest", "coevolution", "qat"):
        assert 0.0 < result[method]["test_accuracy"] <= 1.0, method
    assert result["coevolution"]["evaluations"] == 36 and result["coevolution"]["images"] == 576
    seconds = result["seconds"]  # this call's stages (qevo.harness.Stopwatch)
    assert sorted(seconds) == ["coevolution", "prepare", "qat", "total"] and min(seconds.values()) > 0
    assert seconds["total"] >= seconds["prepare"] + seconds["coevolution"] + seconds["qat"]
    assert result["qat"]["images"] <= 576
    saved, meta = load_checkpoint(run / "integer_model.msgpack")
    assert meta["test_accuracy"] == result["coevolution"]["test_accuracy"]
    levels = saved["kernels"]["QDense_0"]["q"]
    assert levels.dtype == np.int8 and levels.shape == (400, 120) and np.abs(levels).max() <= 1
    assert saved["kernels"]["QDense_0"]["scale"].shape == (120,)
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [r["cycle"] for r in history] == [1, 2, 3] and history[-1]["evaluations"] == 36



@pytest.mark.slow
def test_killed_command_resumes_its_qat_baseline_to_the_same_results(tiny_lenet5_float, data_dir, tmp_path,
                                                                      monkeypatch, capsys):
    cfg = _config(tiny_lenet5_float, data_dir, **{"data.max_train_images": 500})  # QAT: 2 epochs of 288 images
    whole = coevolve_method.run(cfg, tmp_path / "whole")
    assert whole["qat"]["epochs"] == 2
    kill_after_checkpoint(monkeypatch, saves=1, folder="qat")
    with pytest.raises(Killed):
        coevolve_method.run(cfg, tmp_path / "split")
    monkeypatch.undo()
    capsys.readouterr()
    resumed = coevolve_method.run(cfg, tmp_path / "split")
    err = capsys.readouterr().err
    assert f"resuming {tmp_path / 'split'} after cycle 3" in err
    assert f"resuming {tmp_path / 'split' / 'qat'} after epoch 1" in err
    assert without_seconds([resumed]) == without_seconds([whole])

@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"coevolve.w_bits": 9}, "coevolve.w_bits=9 is an impossible bit width"),
        ({"coevolve.w_bits": 1}, "coevolve.w_bits=1 is an impossible bit width"),
        ({"coevolve.a_bits": 32}, "coevolve.a_bits=32 is an impossible bit width"),
        ({"coevolve.radius": 0}, "coevolve.radius=0 is invalid"),
        ({"coevolve.w_bits": 2, "coevolve.radius": 3}, "coevolve.radius=3 is invalid; use an int in 1..2"),
        ({"coevolve.initial_mass": 0.999}, "must satisfy 1/(2*radius+1) < initial_mass < threshold"),
        ({"coevolve.threshold": 1.5}, "must satisfy"),
        ({"coevolve.learning_rate": 0.0}, "coevolve.learning_rate=0.0 is out of range; use a number > 0"),
        ({"coevolve.learning_rate": 1.5}, "coevolve.learning_rate=1.5 must lie in (0, 1]"),
        ({"coevolve.population_size": 1}, "coevolve.population_size=1 must be an int >= 2"),
        ({"coevolve.cycles": 0}, "coevolve.cycles=0 must be an int >= 1"),
        ({"coevolve.strategy": "pmap"}, "coevolve.strategy='pmap' is not one of"),
        ({"quant.mode": "dorefa"}, "integer weights need a symmetric quantizer, one of ('absmax', 'mse')"),
    ],
)
def test_bad_config_is_refused_with_the_fix(overrides, message):
    cfg = config_lib.load(REPO / "configs" / "lenet5_cc.py", [f"{k}={v}" for k, v in overrides.items()])
    with pytest.raises(config_lib.ConfigError) as err:
        coevolve_config.validate(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.coevolve.w_bits=9"], "qevo.coevolve: error: config coevolve.w_bits=9 is an impossible bit width"),
        # a command each: test_bad_config_is_refused_with_the_fix and test_bad_bits_from_is_refused_in_one_line
        # check the other two's messages in the fast tier
        pytest.param(["--config.coevolve.radiuz=1"], "unknown config key 'coevolve.radiuz'", marks=pytest.mark.slow),
        (["--config.bits_from=/nonexistent/search", "--config.bits_model=front_01"],
         "qevo.coevolve: error: bits_from='/nonexistent/search' holds no finished qevo.search run"),
        pytest.param(["--config.bits_from=benchmarks/results/resnet20_cpu_search3", "--config.bits_model=front_02"],
                     "qevo.coevolve: error: front_02 of benchmarks/results/resnet20_cpu_search3 has widths for 20 "
                     "layers, this model (LeNet5) has 5", marks=pytest.mark.slow),
    ],
)
def test_bad_input_gives_one_clear_line(args, message, tiny_lenet5_float, data_dir, tmp_path):
    out = run_command("qevo.coevolve", "lenet5_cc.py", tmp_path / "run",
                      [f"--config.float_from={tiny_lenet5_float}", *args], data_dir)
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


def test_groups_larger_than_the_network_are_refused(tiny_lenet5_float, data_dir, tmp_path):
    cfg = _config(tiny_lenet5_float, data_dir, **{"coevolve.num_groups": 1000, "coevolve.group_size": 256})
    with pytest.raises(config_lib.ConfigError,
                       match=r"num_groups \* coevolve.group_size = 256000 exceeds the 60480 integer weights"):
        coevolve_method.prepare(cfg, tmp_path)


@pytest.mark.parametrize("name", ["lenet5_cc.py", "resnet20_cc.py", "resnet20_cc_cpu.py"])
def test_configs_load_and_validate(name):
    cfg = coevolve_config.validate(config_lib.load(REPO / "configs" / name))
    assert cfg.coevolve.w_bits == 4 and cfg.coevolve.a_bits == 8


def test_saved_kernels_reload_as_int_kernels(prepared, tmp_path):
    genome = prepared.problem.q0
    coevolve_method.save_integer_model(tmp_path / "m.msgpack", prepared, genome, {"note": 1})
    template = {"kernels": prepared.runner.kernels(genome, prepared.problem.scales), "variables": prepared.variables}
    tree, meta = load_checkpoint(tmp_path / "m.msgpack", template)
    assert meta == {"note": 1} and isinstance(tree["kernels"]["QConv_1"], IntKernel)
    np.testing.assert_array_equal(prepared.runner.flatten(tree["kernels"]), genome)
    val = prepared.problem.val
    acc = prepared.runner.accuracy(prepared.problem.replace(variables=tree["variables"]), genome, val)
    assert float(acc) == float(prepared.runner.accuracy(prepared.problem, genome, val))


@pytest.mark.slow
def test_lenet5_coevolution_on_real_mnist(lenet5_float, data_dir, tmp_path):
    """The must-show claims on a reduced budget (4 of the config's 12 cycles, no QAT): at
    2 bits the coevolution closes at least half of the gap between round to nearest and
    float (measured: 72.57% -> 92.36%, float 99.01%, 75% of the gap); at 4 bits (2 cycles)
    it ends within 0.3 points of float."""
    base = [f"--config.float_from={lenet5_float}", "--config.coevolve.qat=False"]
    out = run_command("qevo.coevolve", "lenet5_cc.py", tmp_path / "w2",
                      [*base, "--config.coevolve.w_bits=2", "--config.coevolve.cycles=4"], data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "w2" / "results.json").read_text())
    fp, rtn, cc = (r[k]["test_accuracy"] for k in ("float", "round_to_nearest", "coevolution"))
    assert rtn < fp - 0.1 and cc - rtn >= 0.5 * (fp - rtn), r
    assert abs(rtn - r["round_to_nearest"]["fake_quant_test_accuracy"]) <= 2e-4, r  # integer forward = fake quant
    out = run_command("qevo.coevolve", "lenet5_cc.py", tmp_path / "w4",
                      [*base, "--config.coevolve.w_bits=4", "--config.coevolve.cycles=2"], data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "w4" / "results.json").read_text())
    assert r["coevolution"]["test_accuracy"] >= r["float"]["test_accuracy"] - 0.003, r
    assert abs(r["round_to_nearest"]["test_accuracy"] - r["round_to_nearest"]["fake_quant_test_accuracy"]) <= 2e-4, r


def _resnet8():
    """A ResNet-8 for 16x16 images, initialized, every activation clip at 3."""
    model = get_model("resnet8", 10, input_shape=(16, 16, 3))
    return model, {**init_variables(model, jax.random.key(0), (16, 16, 3)),
                   "quant": {"a_clip": jnp.full(model.num_layers, 3.0)}}


@pytest.mark.parametrize("augment", [True, False])
def test_batch_statistics_are_those_of_the_float_models_training_images(augment):
    """A float model trained with ``train.augment`` learned under the normalisation of padded,
    cropped and flipped images, so its re-estimated statistics must be theirs. Oracle: the
    first BatchNorm follows the float first convolution, so its statistics are the moments of
    XLA's convolution over 8,192 independently drawn crops and flips (numpy; 4-pixel zero
    padding, offsets 0..8, flip with probability 1/2). Bright images make the black borders
    of the crops move the moments far beyond the sampling error."""
    model, variables = _resnet8()
    rng = np.random.default_rng(0)
    images = rng.integers(150, 250, (256, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 256).astype(np.int32)
    cfg = coevolve_config.validate(config_lib.load(REPO / "configs" / "resnet20_cc_cpu.py", [
        f"train.augment={augment}", "coevolve.num_groups=1", "coevolve.group_size=8", "coevolve.bn_images=1024"]))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    _, runner, problem = coevolve_method.prepare_arrays(cfg, model, variables, mean, std, images, labels, images[:32],
                                                 labels[:32])
    stats = runner.statistics(problem, problem.q0, jax.random.PRNGKey(3))["BatchNorm_0"]

    n = 8192
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    pick, dy, dx, flip = rng.integers(0, 256, n), rng.integers(0, 9, n), rng.integers(0, 9, n), rng.random(n) < 0.5
    crops = np.stack([padded[i, y:y + 16, x:x + 16] for i, y, x in zip(pick, dy, dx, strict=True)])
    crops = np.where(flip[:, None, None, None], crops[:, :, ::-1], crops)
    x = (crops.astype(np.float32) / 255 - 0.5) / 0.25
    y = jax.lax.conv_general_dilated(x, variables["params"]["QConv_0"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    oracle_mean, oracle_var = np.mean(y, (0, 1, 2)), np.var(y, (0, 1, 2))
    close = np.allclose(stats["mean"], oracle_mean, atol=0.05 * oracle_var.max() ** 0.5) and np.allclose(
        stats["var"], oracle_var, rtol=0.1)
    assert close == augment, (np.asarray(stats["var"]), oracle_var)


def _search_run(tmp_path, models: dict) -> str:
    """A search work folder whose ``final.csv`` lists each model's widths (and a float row)."""
    rows = ["name,kind,w_bits,a_bits,test_accuracy"] + [
        f"{name},front,{' '.join(map(str, w))},{' '.join(map(str, a))},0.5" for name, (w, a) in models.items()]
    (tmp_path / "final.csv").write_text("\n".join([*rows, "float,float,32 32,32 32,0.9"]) + "\n")
    return str(tmp_path)


def test_bits_from_a_search_model_gives_each_layer_its_own_level_range(tmp_path):
    """A front model's mixed widths: each layer's integer levels start at its own round to
    nearest and may move only inside its own width's range (2 bits: -1..1, 4 bits: -7..7)."""
    model, variables = _resnet8()
    w = [32, 2, 4, 8, 2, 4, 2, 32]
    a = [32, 4, 8, 4, 4, 8, 4, 32]
    run = _search_run(tmp_path, {"front_01": (w, a)})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    cfg = coevolve_config.validate(config_lib.load(REPO / "configs" / "resnet20_cc_cpu.py", [
        f"bits_from={run}", "bits_model=front_01", "coevolve.num_groups=1", "coevolve.group_size=8",
        "coevolve.bn_images=64", "coevolve.radius=2"]))
    bits, runner, problem = coevolve_method.prepare_arrays(
        cfg, model, variables, (0.5,) * 3, (0.25,) * 3, images, labels,
                                                    images[:16], labels[:16])
    assert bits.w.tolist() == w and bits.a.tolist() == a
    probs = np.asarray(coevolve_algorithm.initial_probs(problem.q0, runner.max_level, 2, 0.9))
    levels = np.asarray(problem.q0)[:, None] + np.arange(-2, 3)
    start = 0
    paths = intforward.quantized_layers(model)
    for path, shape in runner.layers.items():
        size, n = int(np.prod(shape)), 2 ** (w[paths[path]] - 1) - 1
        part = slice(start, start + size)
        assert np.abs(np.asarray(problem.q0)[part]).max() <= n
        np.testing.assert_array_equal(probs[part] > 0, np.abs(levels[part]) <= n)
        start += size
    assert start == runner.num_weights


@pytest.mark.parametrize("extra, models, message", [
    (["bits_from={run}"], {"front_01": ([32, 4, 4, 4, 32], [32, 4, 4, 4, 32])}, "bits_from needs bits_model"),
    (["bits_from={run}", "bits_model=front_07"], {"front_01": ([32, 4, 4, 4, 32], [32, 4, 4, 4, 32])},
     r"bits_model='front_07' is not a final model of {run}; choose one of \['front_01'\]$"),
    (["bits_from={run}", "bits_model=front_01"], {"front_01": ([32, 4, 4, 32], [32, 4, 4, 32])},
     r"front_01 of {run} has widths for 4 layers, this model \(LeNet5\) has 5; take bits from a search of the "
     r"same model$"),
    (["bits_from={run}", "bits_model=front_01"], {"front_01": ([32, 1, 4, 4, 32], [32, 4, 4, 4, 32])},
     r"front_01 of {run} has weight widths \[1\]; integer training takes 2..8 bits"),
    (["bits_from={run}/none", "bits_model=front_01"], {},
     r"bits_from='{run}/none' holds no finished qevo.search run \({run}/none/final.csv is missing\); point it at "
     r"a search work folder or its committed results$"),
])
def test_bad_bits_from_is_refused_in_one_line(tmp_path, extra, models, message):
    run = _search_run(tmp_path, models)
    overrides = [e.format(run=run) for e in extra]
    cfg = coevolve_config.validate(config_lib.load(REPO / "configs" / "lenet5_cc.py", overrides))
    with pytest.raises(config_lib.ConfigError) as err:
        coevolve_method.integer_bits(cfg, get_model("lenet5", 10))
    assert re.match(message.format(run=re.escape(run)), str(err.value)) and "\n" not in str(err.value), err.value


def test_bad_bits_from_is_refused_before_the_float_model_trains(tmp_path, monkeypatch):
    run = _search_run(tmp_path, {"front_01": ([32, 4, 4, 4, 32], [32, 4, 4, 4, 32])})
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 28, 28, 1)).astype(np.uint8), rng.integers(0, 10, 40)
    monkeypatch.setattr(model_inputs, "load_data", lambda cfg: Dataset.from_arrays((x, y), (x, y), val_size=8))
    monkeypatch.setattr(coevolve_method, "float_model", lambda *args: pytest.fail("the float model was trained"))
    for model, message in (("front_07", "bits_model='front_07' is not a final model of "),
                           ("front_01", f"front_01 of {run} has widths for 5 layers, this model (CifarResNet) "
                                        "has 20; ")):
        cfg = coevolve_config.validate(config_lib.load(REPO / "configs" / "resnet20_cc_cpu.py", [
            f"bits_from={run}", f"bits_model={model}", "data.val_size=8"]))
        with pytest.raises(config_lib.ConfigError) as err:
            coevolve_method.prepare(cfg, tmp_path / "cc")
        assert str(err.value).startswith(message), err.value


def test_bits_from_reads_a_committed_search_model():
    """The committed ResNet-20 search's front_02 (4-bit weights but one 2-bit layer) as the
    coevolution's widths, straight from its results folder."""
    cfg = coevolve_config.validate(config_lib.load(REPO / "configs" / "resnet20_cc_cpu.py", [
        "bits_from=" + str(REPO / "benchmarks" / "results" / "resnet20_cpu_search3"), "bits_model=front_02"]))
    bits = coevolve_method.integer_bits(cfg, get_model("resnet20", 10))
    assert bits.w.tolist() == [32] + [4] * 10 + [2] + [4] * 7 + [32]
    assert bits.a.tolist() == [32] + [4] * 8 + [2] + [4] * 8 + [2, 32]
    assert coevolve_method.describe(bits).startswith("w[32, 4, 4")
