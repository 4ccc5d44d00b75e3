"""Runs of several processes (``qevo.distributed``): two local CPU processes over the loopback
address with JAX's gloo collectives, one device each, against the same work in one process."""

import csv
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import REPO, synthetic_digits
from qevo import distributed
from qevo.data.datasets import normalize
from qevo.errors import ConfigError
from qevo.evolution.population import PopulationEvaluator
from qevo.models.zoo import get_model, init_variables
from qevo.quant.calibration import calibrate

TESTS = pathlib.Path(__file__).parent

POPULATION_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from qevo import distributed
assert distributed.initialize()
import jax, numpy as np
jax.config.update("jax_threefry_partitionable", False)  # as conftest sets it for the test process
from helpers import REPO, synthetic_digits
from qevo.quant.calibration import calibrate
from qevo.data.datasets import normalize
from qevo.models.zoo import get_model, init_variables
from qevo.evolution.population import PopulationEvaluator
ds = synthetic_digits()
model = get_model("lenet5", 10)
v = init_variables(model, jax.random.key(0), (28, 28, 1))
v = calibrate(model, v, normalize(ds.train_images[:256], ds.mean, ds.std))
rng = np.random.default_rng(0)
w = rng.choice([2, 3, 4, 8, 32], size=(5, 5)); a = rng.choice([2, 4, 8, 32], size=(5, 5))
ev = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=100)
scores = ev(v, w, a, ds.val_images, ds.val_labels)
from test_distributed import shared_and_coevolved
print(json.dumps({{"process": jax.process_index(), "devices": jax.device_count(), "writer": distributed.is_writer(),
                  "scores": np.asarray(scores).tolist(),
                  **(shared_and_coevolved(model, v, ds) if {methods!r} else {{}})}}))
"""


def shared_and_coevolved(model, variables, ds) -> dict:
    """Weight sharing and coevolution over every device: the accuracies of three weight-shared
    networks (a population of 3) and one coevolution cycle (4 candidates per group), as numbers."""
    import jax.numpy as jnp

    from qevo import config as config_lib
    from qevo.coevolve import config as coevolve_config
    from qevo.coevolve import method as coevolve_method
    from qevo.evolution.loop import step_keys
    from qevo.evolution.population import batch_eval_set
    from qevo.sharing import clusters

    paths = clusters.kernel_paths(variables["params"])
    table = clusters.build_table(clusters.get_kernels(variables["params"], paths), 4)
    shared = clusters.SharedEvaluator(model, ds.mean, ds.std, paths)
    rows = jnp.array([[-1] * 5, [3] * 5, [0, 1, 2, 3, 0]], jnp.int32)
    batches = batch_eval_set(jnp.asarray(ds.val_images), jnp.asarray(ds.val_labels), 100)
    shared_scores = shared.jit(shared.accuracy_of_k)(variables, table, table.centroids, rows, batches)
    cfg = coevolve_config.validate(config_lib.load(REPO / "configs" / "lenet5_cc.py", [
        "coevolve.w_bits=2", "coevolve.num_groups=2", "coevolve.group_size=64", "coevolve.population_size=4",
        "coevolve.batch_size=64", "coevolve.bn_images=0"]))
    _, runner, problem = coevolve_method.prepare_arrays(cfg, model, variables, ds.mean, ds.std, ds.train_images[:1000],
                                                 ds.train_labels[:1000], ds.val_images, ds.val_labels)
    state, stats = runner.cycle(runner.init_state(problem, jax.random.key(0)), problem,
                                step_keys(jax.random.key(1), 0))
    return {"shared": np.asarray(shared_scores).tolist(), "coevolution_loss": np.asarray(stats.loss).tolist(),
            "coevolution_context": int(np.sum(np.asarray(state.context, np.int64) * np.arange(state.context.size)))}


def _start(argv: list[str], count: int = 2, env=None) -> list[subprocess.Popen]:
    """Start ``python <argv>`` as ``count`` cooperating processes (one CPU device each, ``env``
    added to the environment) in the repository."""
    return distributed.start_local(argv, count, env=env, cwd=REPO)


def _processes(argv: list[str], count: int = 2, timeout: int = 900, env=None) -> list[subprocess.CompletedProcess]:
    """:func:`_start`, then wait: the results, each checked to have succeeded."""
    procs = _start(argv, count, env)
    out = []
    for i, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        assert p.returncode == 0, f"process {i}: {stderr[-3000:]}"
    return out


@pytest.mark.parametrize("methods", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_population_over_two_processes_equals_one_process(methods):
    """Five individuals (padded to six) over the two processes' devices: every process reads
    every score, equal to the scores of one process on one device; with ``methods`` (the full
    suite), so do the weight-shared networks and a coevolution cycle (:func:`shared_and_coevolved`)."""
    runs = [json.loads(r.stdout.strip().splitlines()[-1])
            for r in _processes(["-c", POPULATION_SCRIPT.format(tests=str(TESTS), methods=methods)])]
    assert [(r["process"], r["devices"], r["writer"]) for r in runs] == [(0, 2, True), (1, 2, False)]
    ds = synthetic_digits()
    model = get_model("lenet5", 10)
    v = calibrate(model, init_variables(model, jax.random.key(0), (28, 28, 1)),
                  normalize(ds.train_images[:256], ds.mean, ds.std))
    rng = np.random.default_rng(0)
    w, a = rng.choice([2, 3, 4, 8, 32], size=(5, 5)), rng.choice([2, 4, 8, 32], size=(5, 5))
    one = PopulationEvaluator(model, ds.mean, ds.std, eval_batch_size=100, devices=jax.devices()[:1])
    expected = np.asarray(one(v, w, a, ds.val_images, ds.val_labels)).tolist()
    assert runs[0]["scores"] == runs[1]["scores"] == expected
    assert len(set(expected)) > 2  # the individuals really differ
    if not methods:
        return
    alone = shared_and_coevolved(model, v, ds)
    assert {k: runs[0][k] for k in alone} == {k: runs[1][k] for k in alone} == alone
    assert len(set(alone["shared"])) == 3 and len(set(alone["coevolution_loss"])) == 2


@pytest.mark.parametrize("environ, message", [
    ({distributed.COORDINATOR_ENV: "127.0.0.1:1", distributed.NUM_PROCESSES_ENV: "two",
      distributed.PROCESS_ID_ENV: "0"}, "$QEVO_NUM_PROCESSES='two' must be an integer"),
    ({distributed.COORDINATOR_ENV: "127.0.0.1:1", distributed.NUM_PROCESSES_ENV: "2",
      distributed.PROCESS_ID_ENV: "2"}, "the id must be in 0..QEVO_NUM_PROCESSES-1"),
])
def test_bad_process_settings_are_refused_before_joining(environ, message):
    with pytest.raises(ConfigError) as err:
        distributed.initialize(environ)
    assert message in str(err.value)


def test_nothing_requested_joins_nothing():
    assert not distributed.requested({}) and not distributed.initialize({})
    assert distributed.requested({distributed.AUTO_ENV: "1"})
    assert distributed.is_writer()  # one process


@pytest.mark.slow
def test_search_over_two_processes_writes_what_one_process_writes(tiny_lenet5_float, data_dir, tmp_path):
    """A tiny LeNet-5 search as two processes (process 0 writes the folder) and as one: the
    same history and ``pareto.csv``; the final models, trained side by side over the two
    processes' devices, score as those of one device (within 0.5 points: XLA may compile a
    model's training differently inside the sharded program)."""
    args = ["--config", str(REPO / "configs" / "lenet5.py"), f"--config.float_from={tiny_lenet5_float}",
            "--config.population_size=6", "--config.generations=2", "--config.search.qat_steps=2",
            "--config.search.eval_images=300", "--config.data.max_train_images=2000", "--config.final.max_models=1"]
    _processes(["-m", "qevo.search", *args, "--workdir", str(tmp_path / "two")], env={"QEVO_DATA_DIR": str(data_dir)})
    one = subprocess.run([sys.executable, "-m", "qevo.search", *args, "--workdir", str(tmp_path / "one")],
                         env={**os.environ, "QEVO_DATA_DIR": str(data_dir)}, capture_output=True, text=True,
                         cwd=REPO, timeout=900, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    for name in ("pareto.csv", "history.jsonl"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    two, one = (list(csv.DictReader((tmp_path / run / "final.csv").open())) for run in ("two", "one"))
    assert [r["name"] for r in two] == [r["name"] for r in one] and len(one) >= 4
    for a, b in zip(two, one, strict=True):
        assert abs(float(a["test_accuracy"]) - float(b["test_accuracy"])) <= 0.005, (a, b)
        same = lambda row: {k: v for k, v in row.items() if "accuracy" not in k}  # noqa: E731
        assert same(a) == same(b)
    assert not list((tmp_path / "two").glob(".*.tmp"))  # process 1 left no temporary file


@pytest.mark.slow
def test_a_killed_process_stops_the_other_with_one_line(tiny_lenet5_float, data_dir, tmp_path):
    """Process 1 of a two-process search is killed after the first generation is
    checkpointed: process 0 ends within 60 s with exit status 2 and one line, and its folder
    holds a checkpoint to resume from."""
    workdir = tmp_path / "run"
    args = ["-m", "qevo.search", "--config", str(REPO / "configs" / "lenet5.py"), "--workdir", str(workdir),
            f"--config.float_from={tiny_lenet5_float}", "--config.population_size=6", "--config.generations=200",
            "--config.search.qat_steps=2", "--config.search.eval_images=300", "--config.data.max_train_images=2000",
            "--config.final.enabled=False"]
    first, second = _start(args, env={"QEVO_DATA_DIR": str(data_dir), distributed.HEARTBEAT_ENV: "10"})
    try:
        deadline = time.monotonic() + 600
        while not (workdir / "checkpoint.msgpack").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert first.poll() is None, first.stderr.read()[-3000:]
        second.kill()
        killed = time.monotonic()
        _, stderr = first.communicate(timeout=120)
        assert time.monotonic() - killed < 60
    finally:
        for p in (first, second):
            p.kill()
    assert first.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("qevo.search: error: another process of this run stopped (")
    assert last.endswith(f"rerun every process to resume from {workdir}")
    assert "Traceback" not in stderr and (workdir / "checkpoint.msgpack").is_file()


def test_importing_the_commands_computes_nothing():
    """A process must join a multi-process run before JAX starts a backend, and ``python -m
    qevo.search`` imports its module before the entry point joins: importing a command module
    must start none (evosax starts one at import, so qevo imports it when a driver is made)."""
    script = ("import jax._src.xla_bridge as xb, sys\n"
              "backends, xb.backends = xb.backends, lambda *a, **k: sys.exit('a backend was started at import')\n"
              "import qevo.search, qevo.sharing, qevo.coevolve, qevo.train, qevo.cli, qevo.evolution.drivers\n"
              "xb.backends = backends\n"
              "print(sorted(c.__name__ for c in qevo.evolution.drivers.EVOSAX_STRATEGIES.values())[0])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "CMA_ES"  # the evosax classes, once asked for
