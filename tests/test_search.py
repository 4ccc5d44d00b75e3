"""``python -m qevo.search``: config checks, outputs, resume, and the LeNet-5 protocol on real MNIST."""

import csv
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import REPO, Killed, kill_after_checkpoint, run_command, run_main
from qevo import checkpoint
from qevo import config as config_lib
from qevo.evolution.loop import base_key, step_keys
from qevo.quant.layers import Bits
from qevo.search import config as search_config
from qevo.search import final as search_final
from qevo.search import generations as search_generations
from qevo.search import method as search_method
from qevo.search import problem as search_problem

TINY = [
    "--config.population_size=8",
    "--config.generations=5",
    "--config.search.qat_steps=3",
    "--config.search.eval_images=500",
    "--config.data.max_train_images=3000",
    "--config.final.enabled=False",
]


def _search(workdir, args, data_dir):
    return run_command("qevo.search", "lenet5.py", workdir, args, data_dir)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.search.qat_stepz=3"], "unknown config key 'search.qat_stepz'"),
        (["--config.search.w_candidates=()"], "search.w_candidates is empty"),
        (["--config.search.a_candidates=(4, 9)"], "impossible bit widths [9]"),
        (["--config.population_size=2"], "smaller than the 3 NSGA-III reference directions"),
        (["--config.population_size=8", "--config.search.n_partitions=4"],
         "smaller than the 15 NSGA-III reference directions"),
        (["--config.search.objectives=('error', 'bitop')"], "unknown names ['bitop']"),
        (["--config.search.driver=nsga2"], "search.driver='nsga2' is not one of"),
        (["--config.search.uniform_seeds=((2, 2), (2, 2))"], "must list distinct (weight_bits, activation_bits)"),
        (["--config.search.uniform_seeds=((2, 2, 2),)"], "must list distinct (weight_bits, activation_bits)"),
        (["--config.search.constraints=size<4e5"], "'size<4e5' is no upper bound; write each as name<=number"),
        (["--config.search.constraints=size<=0"], "'size<=0' is no upper bound"),
        (["--config.search.constraints=latency<=3"], "bounds ['latency'], which are no costs"),
        (["--config.quant.float_layers=fc9"], "'fc9' matches none of the 5 quantizable layers"),
        (["--config.quant.float_layers=conv*,fc*"], "keeps all 5 layers float: nothing is left to search"),
        (["--config.search.rungs=((10, 1000), (5, 2000))"], "search.rungs=((10, 1000), (5, 2000)) must list"),
        (["--config.search.rungs=((10,),)"], "must list (qat_steps, eval_images) pairs of ints >= 1"),
        (["--config.search.promote=0.0"], "search.promote=0.0 must lie in (0, 1]"),
        (["--config.final.seeds=0"], "final.seeds=0 must be an int >= 1"),
        (["--config.population_size=4", "--config.search.n_partitions=1",
          "--config.search.uniform_seeds=((8, 8), (4, 4), (2, 2), (2, 4), (4, 2))"],
         "gives 5 usable pairs, more than the first population's 4"),
    ],
)
def test_config_errors_give_one_clear_line(args, message, tmp_path, data_dir):
    status, stderr = run_main("qevo.search", "lenet5.py", tmp_path / "run", args, data_dir)
    assert status == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr[-3000:]


def test_a_config_error_ends_the_command_with_status_2(tmp_path, data_dir):
    out = _search(tmp_path / "run", ["--config.search.qat_stepz=3"], data_dir)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "unknown config key 'search.qat_stepz'" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


def test_one_config_file_serves_train_and_search():
    """The training command keeps the shared sections of a search config and drops the
    search's own; the search keeps every key it knows, filled from its defaults."""
    cfg = config_lib.load(REPO / "configs" / "lenet5.py")
    assert set(config_lib.validate(cfg)) == set(config_lib.defaults()) < set(cfg)
    assert set(config_lib.flatten(search_config.validate(cfg))) == set(config_lib.flatten(search_config.defaults()))


def test_take_sections_replaces_only_the_named_sections(tmp_path):
    source = tmp_path / "model.py"
    source.write_text("from qevo.config import defaults\n\n\ndef get_config():\n    c = defaults()\n"
                      "    c.seed, c.data.name, c.train.epochs, c.model.name = 5, 'cifar10', 7, 'resnet20'\n"
                      "    return c\n")
    cfg = config_lib.take_sections(search_config.defaults(), source, ("data", "train"))
    assert (cfg.data.name, cfg.train.epochs) == ("cifar10", 7)
    assert (cfg.seed, cfg.model.name) == (0, "lenet5") and cfg.search == search_config.defaults().search


def test_costs_of_a_population_equal_hand_computation():
    from qevo.models.cost import LayerTable

    table = LayerTable(names=("a", "b"), macs=np.array([100, 10]), weights=np.array([20, 5]), other_params=7)
    bits = Bits(w=np.array([[8, 4], [2, 32]]), a=np.array([[8, 2], [4, 32]]))
    c = search_problem.costs(table, bits)
    np.testing.assert_allclose(c["bitops"], [100 * 64 + 10 * 8, 100 * 8 + 10 * 32 * 32])
    np.testing.assert_allclose(c["size"], [20 * 8 + 5 * 4 + 7 * 32, 20 * 2 + 5 * 32 + 7 * 32])


def test_front_indices_keeps_distinct_finite_nondominated_rows():
    F = np.array([[0.1, 5.0], [0.2, 3.0], [0.1, 5.0], [0.3, 4.0], [np.nan, 1.0], [0.5, 1.0]])
    np.testing.assert_array_equal(search_final.front_indices(F), [0, 1, 5])


def _rows(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_float_layers_select_by_index_name_path_and_glob():
    """LeNet-5's layers: names conv1, conv2, fc1, fc2, fc3 at paths QConv_0, QConv_1, QDense_0..2."""
    from qevo.models.zoo import get_model

    model = get_model("lenet5", 10)
    cfg = search_config.defaults()
    for spec, floats in (("0,-1", [0, 4]), ("", []), ("conv2", [1]), ("QDense_*", [2, 3, 4]), ("-2, conv1", [0, 3]),
                         ("fc?,0", [0, 2, 3, 4])):
        cfg.quant.float_layers = spec
        searched = np.ones(5, bool)
        searched[floats] = False
        np.testing.assert_array_equal(search_problem.make_space(cfg, model).searched, searched, err_msg=spec)
    with pytest.raises(config_lib.ConfigError, match="'5' matches none of the 5 quantizable layers"):
        cfg.quant.float_layers = "0,5"
        search_problem.make_space(cfg, model)


def test_a_config_of_the_former_float_first_last_key_still_loads_with_a_notice(tmp_path, capsys):
    old = search_config.defaults().to_dict()
    del old["quant"]["float_layers"]
    old["quant"]["float_first_last"] = False
    cfg = search_config.validate(config_lib.ml_collections.ConfigDict(old))
    assert cfg.quant.float_layers == ""
    assert "config key quant.float_first_last is now quant.float_layers" in capsys.readouterr().err
    # a run folder begun under the old key resumes under the new one
    (tmp_path / "config.json").write_text(json.dumps({**old, "quant": {**old["quant"], "float_first_last": True}}))
    (tmp_path / "checkpoint.msgpack").write_bytes(b"state")
    cfg.quant.float_layers = "0,-1"
    from qevo.harness import prepare_workdir

    prepare_workdir(tmp_path, cfg, search_config.defaults())
    assert json.loads((tmp_path / "config.json").read_text())["quant"]["float_layers"] == "0,-1"


def test_constrained_selection_ranks_every_model_within_bounds_first():
    """Deb's rule through the penalty: feasible before infeasible, and the smaller excess first."""
    import jax.numpy as jnp

    from qevo.evolution import nsga3

    F = np.array([[0.02, 30.0], [0.1, 11.0], [0.0, 10.0], [0.05, 12.0]])
    violation = np.array([0.0, 0.5, 0.1, 0.0])
    F_select = search_generations.penalized(F, violation, np.array([0.0, 10.0]), np.array([1.0, 50.0]))
    rank = np.asarray(nsga3.non_dominated_rank(jnp.asarray(F_select)))
    assert rank[0] == rank[3] == 0 and rank[2] == 1 and rank[1] == 2, rank


@pytest.mark.slow
def test_a_size_bound_keeps_the_front_within_it_and_float_layers_stay_float(tiny_lenet5_float, tmp_path, data_dir):
    """conv1, fc2 and fc3 float, conv2 and fc1 searched; at most 5.6e5 bits of weights."""
    args = [f"--config.float_from={tiny_lenet5_float}", *TINY, "--config.generations=3",
            "--config.quant.float_layers=conv1,fc2,-1", "--config.search.constraints=size<=5.6e5"]
    out = _search(tmp_path / "run", args, data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    for r in history:
        assert [r["w_bits"][i] for i in (0, 3, 4)] == [32] * 3 and [r["a_bits"][i] for i in (0, 3, 4)] == [32] * 3
        assert r["violation"] == pytest.approx(max(0.0, r["objectives"]["size"] / 5.6e5 - 1.0))
    assert any(r["violation"] > 0 for r in history) and any(r["violation"] == 0 for r in history)
    front = _rows(tmp_path / "run" / "pareto.csv")
    assert front and all(float(r["size"]) <= 5.6e5 for r in front)
    feasible = [r for r in history if r["violation"] == 0]
    assert len(front) <= len(feasible)


@pytest.mark.slow
def test_interrupted_search_resumes_to_the_same_front(tiny_lenet5_float, tmp_path, data_dir):
    args = [f"--config.float_from={tiny_lenet5_float}", *TINY]
    full = _search(tmp_path / "full", args, data_dir)
    assert full.returncode == 0, full.stderr[-3000:]
    history = (tmp_path / "full" / "history.jsonl").read_text().splitlines()
    assert len(history) == 8 * 6 and json.loads(history[-1])["generation"] == 5
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    pace = results["throughput"]
    assert pace["evaluations"] == 48 and 0 < pace["scoring_share"] < 1
    assert pace["evaluations_per_hour"] == pytest.approx(3600 * 48 / pace["generation_seconds"], rel=5e-3)
    seconds = results["seconds"]
    assert sorted(seconds) == ["final", "prepare", "search", "total"]
    assert seconds["total"] >= seconds["prepare"] + seconds["search"] + seconds["final"] > 0
    for name in ("config.json", "history.jsonl", "pareto.csv", "final.csv", "pareto.png", "results.json",
                 "checkpoint.msgpack"):
        assert (tmp_path / "full" / name).is_file(), name

    # Kill a second run (SIGKILL, mid-generation) once generation 3 is checkpointed, then resume.
    workdir = tmp_path / "resumed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qevo.search", "--config", str(REPO / "configs" / "lenet5.py"),
         "--workdir", str(workdir), *args],
        env={**os.environ, "QEVO_DATA_DIR": str(data_dir)}, cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt, deadline, done = workdir / "checkpoint.msgpack", time.monotonic() + 900, -1
    while done < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        if ckpt.exists():
            done = checkpoint.load(ckpt)[1]["generation"]
    proc.kill()
    proc.wait()
    assert 3 <= done < 5, f"the run was not caught between generations 3 and 5 (generation {done})"
    resumed = _search(tmp_path / "resumed", args, data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {workdir} after generation {done}" in resumed.stderr
    assert _rows(tmp_path / "resumed" / "pareto.csv") == _rows(tmp_path / "full" / "pareto.csv")
    assert (tmp_path / "resumed" / "history.jsonl").read_text().splitlines() == history


def test_killed_search_resumes_to_the_same_front(tiny_lenet5_float, tmp_path, data_dir, monkeypatch, capsys):
    """The fast tier's resume check (the slow test above kills the command mid-generation): a
    search of 3 generations of 4 killed right after generation 1 is checkpointed resumes to
    the front and the history of an unbroken run."""
    cfg = search_config.validate(config_lib.load(REPO / "configs" / "lenet5.py", [
        f"float_from={tiny_lenet5_float}", f"data.data_dir={data_dir}", "population_size=4", "generations=2",
        "search.qat_steps=2", "search.eval_images=300", "data.max_train_images=3000", "final.enabled=False"]))
    whole = search_method.run(cfg, tmp_path / "whole")
    kill_after_checkpoint(monkeypatch, saves=1)  # the first checkpoint: generation 1
    with pytest.raises(Killed):
        search_method.run(cfg, tmp_path / "split")
    assert checkpoint.load(tmp_path / "split" / "checkpoint.msgpack")[1] == {"generation": 1}
    monkeypatch.undo()
    capsys.readouterr()
    resumed = search_method.run(cfg, tmp_path / "split")
    assert f"resuming {tmp_path / 'split'} after generation 1" in capsys.readouterr().err
    history = (tmp_path / "whole" / "history.jsonl").read_text().splitlines()
    assert len(history) == 3 * 4 and whole["evaluations"] == resumed["evaluations"] == 12
    assert (tmp_path / "split" / "history.jsonl").read_text().splitlines() == history
    assert _rows(tmp_path / "split" / "pareto.csv") == _rows(tmp_path / "whole" / "pareto.csv")


@pytest.mark.parametrize("driver", ["simple_ga", pytest.param("random", marks=pytest.mark.slow)])
def test_other_drivers_run_and_write_a_front(driver, tiny_lenet5_float, tmp_path, data_dir):
    args = [f"--config.float_from={tiny_lenet5_float}", *TINY, "--config.generations=2",
            f"--config.search.driver={driver}"]
    status, stderr = run_main("qevo.search", "lenet5.py", tmp_path / "run", args, data_dir)  # in this process
    assert status == 0, stderr[-3000:]
    rows = _rows(tmp_path / "run" / "pareto.csv")
    assert rows and all(len(r["w_bits"].split()) == 5 for r in rows)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["evaluations"] == 24


def test_first_population_holds_the_uniform_seeds_then_random_genomes(tiny_lenet5_float, tmp_path, data_dir):
    args = [f"--config.float_from={tiny_lenet5_float}", *TINY, "--config.generations=0",
            "--config.search.uniform_seeds=((2, 4), (8, 8), (4, 16))"]
    status, stderr = run_main("qevo.search", "lenet5.py", tmp_path / "run", args, data_dir)  # in this process
    assert status == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    inner = [(r["w_bits"][1:-1], r["a_bits"][1:-1]) for r in rows]
    # (4, 16) is skipped: 16 is not an activation candidate of configs/lenet5.py.
    assert inner[:2] == [([2, 2, 2], [4, 4, 4]), ([8, 8, 8], [8, 8, 8])], inner
    assert len(rows) == 8 and len({str(g) for g in inner}) == 8, inner


@pytest.mark.slow
def test_lenet5_search_trains_front_and_baselines(lenet5_float, tmp_path, data_dir):
    """The protocol of configs/lenet5.py on real MNIST with a smaller budget (16 x 2
    generations of 10 QAT steps scored on 1,000 validation images, 1 front model, the final
    QAT epoch on 30,000 of the 55,000 training images).

    After one QAT epoch, w8a8 and w4a4 are within 0.3 and 0.5 points of float, and the most
    accurate trained front model, a model of the search front, is within 0.5 points of float.
    """
    args = [f"--config.float_from={lenet5_float}", "--config.generations=1", "--config.search.eval_images=1000",
            "--config.search.qat_steps=10", "--config.final.max_models=1", "--config.data.max_train_images=30000"]
    out = _search(tmp_path / "run", args, data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["name"]: r for r in _rows(tmp_path / "run" / "final.csv")}
    acc = {k: float(r["test_accuracy"]) for k, r in rows.items()}
    assert abs(acc["w8a8"] - acc["float"]) <= 0.003, acc
    assert acc["w4a4"] >= acc["float"] - 0.005, acc
    front = [r for r in rows.values() if r["kind"] == "front"]
    pareto = {(r["w_bits"], r["a_bits"]) for r in _rows(tmp_path / "run" / "pareto.csv")}
    assert len(front) == 1 and all((r["w_bits"], r["a_bits"]) in pareto for r in front), (front, pareto)
    assert max(float(r["test_accuracy"]) for r in front) >= acc["float"] - 0.005, acc


def test_final_candidates_answer_each_baseline_then_spread_the_front():
    cfg = search_config.validate(config_lib.load(REPO / "configs" / "lenet5.py", ["final.max_models=3"]))
    space = search_problem.SearchSpace(np.array([2, 4, 8]), np.array([2, 4, 8]),
                                       np.array([False, True, True, True, False]))

    def record(bits, error, bitops, size):
        w = [32, *bits, 32]
        return {"generation": 0, "w_bits": w, "a_bits": w, "val_accuracy": 1 - error,
                "objectives": {"error": error, "bitops": bitops, "size": size}}

    history = [
        record((8, 8, 8), 0.010, 9.0, 9.0),  # baseline w8a8
        record((4, 4, 4), 0.020, 5.0, 5.0),  # baseline w4a4
        record((2, 2, 2), 0.100, 1.0, 1.0),  # baseline w2a2
        record((4, 2, 4), 0.015, 4.5, 4.0),  # beats w4a4 at a lower cost: its answer
        record((4, 4, 2), 0.030, 4.0, 4.0),  # on the front, less accurate
        record((8, 4, 4), 0.012, 7.0, 6.0),  # the answer to w8a8
        record((2, 4, 2), 0.050, 3.0, 3.0),  # on the front, spread fill
        record((2, 2, 4), 0.200, 8.0, 0.5),  # only on the full front (smallest size)
    ]
    models = search_final.final_candidates(cfg, space, history)
    front = [m for m in models if m["kind"] == "front"]
    # w2a2 has no cheaper mixed model; w4a4's answer is (4, 2, 4), w8a8's is (8, 4, 4); one slot left
    # for the spread over the rest of the error-BitOps front: its cheapest and dearest, (2, 4, 2) first.
    assert [m["w_bits"][1:4] for m in front] == [[2, 4, 2], [4, 2, 4], [8, 4, 4]]
    assert [m["name"] for m in models if m["kind"] == "baseline"] == ["w8a8", "w4a4", "w2a2"]
    assert models[-1]["w_bits"] == [32, 2, 2, 2, 32] and models[-1]["a_bits"] == [32, 2, 2, 2, 32]

    cfg.final.max_models = 6  # room for the whole error-BitOps front, then the full front
    front = [m["w_bits"][1:4] for m in search_final.final_candidates(cfg, space, history) if m["kind"] == "front"]
    assert front == [[2, 4, 2], [4, 4, 2], [4, 2, 4], [8, 4, 4], [2, 2, 4]]

    # A uniform model that dominates every mixed one does not hide them: the mixed fronts answer.
    dominated = [record((8, 8, 8), 0.001, 0.1, 0.1), record((4, 2, 4), 0.015, 4.5, 4.0),
                 record((2, 4, 2), 0.050, 3.0, 3.0), record((4, 4, 8), 0.020, 5.0, 5.0)]
    cfg.final.max_models = 2
    front = [m["w_bits"][1:4] for m in search_final.final_candidates(cfg, space, dominated) if m["kind"] == "front"]
    assert front == [[2, 4, 2], [4, 2, 4]]


@pytest.mark.slow
def test_a_generation_of_only_infeasible_candidates_stops_the_search(tiny_lenet5_float, tmp_path, data_dir):
    """A diverging QAT learning rate makes every candidate's accuracy non-finite: one line, exit 2."""
    args = [f"--config.float_from={tiny_lenet5_float}", *TINY, "--config.search.qat_learning_rate=1e30"]
    status, stderr = run_main("qevo.search", "lenet5.py", tmp_path / "run", args, data_dir)
    assert status == 2, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].endswith(
        "candidates are infeasible (non-finite accuracy or cost: their fine-tuning diverged); lower "
        "search.qat_learning_rate (now 1e+30) and rerun in a new --workdir")
    assert not (tmp_path / "run" / "history.jsonl").exists()  # nothing kept of the infeasible generation
    assert "search lenet5" not in stderr  # no progress bar off a terminal


@pytest.mark.parametrize("shared", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_shared_draws_score_a_genome_alike_in_every_generation(shared, tiny_lenet5_float, tmp_path, data_dir,
                                                                monkeypatch):
    """With ``search.shared_draws`` the first population's genomes, scored again with the
    key of generation 2, get exactly their first scores; with a draw per generation the QAT
    mini-batches differ and so do the scores."""
    monkeypatch.setenv("QEVO_DATA_DIR", str(data_dir))
    cfg = search_config.validate(config_lib.load(REPO / "configs" / "lenet5.py", [
        f"float_from={tiny_lenet5_float}", "population_size=8", "search.qat_steps=3", "search.eval_images=500",
        "data.max_train_images=3000", f"search.shared_draws={shared}"]))
    problem = search_problem.prepare(cfg, tmp_path)
    cfg.generations = 2
    state, history = search_generations.generations(cfg, problem, tmp_path)
    assert state.evaluations == len(history) == 3 * 8 and 0 < float(state.carry) < state.seconds
    first = [r for r in history if r["generation"] == 0]
    accuracy = np.array([r["val_accuracy"] for r in first])
    key = search_generations.evaluation_key(cfg, step_keys(base_key(cfg.seed), 2)[1])
    _, again, _ = problem.objectives(np.array([r["genes"] for r in first]), key)
    if shared:
        np.testing.assert_array_equal(again, accuracy)
    else:
        assert np.abs(again - accuracy).max() > 0


def test_promotion_takes_the_lowest_ranks_then_the_lowest_errors():
    F = np.array([[0.30, 1.0], [0.10, 3.0], [0.20, 2.0], [0.15, 3.0], [np.nan, 0.5], [0.12, 4.0], [0.35, 1.0]])
    # ranks: 0.30@1, 0.10@3 and 0.20@2 are non-dominated (0.15@3 is dominated by 0.10@3, 0.12@4 too, 0.35@1 by
    # 0.30@1); the NaN row comes last
    assert search_problem.promoted(F, 3).tolist() == [1, 2, 0]
    assert search_problem.promoted(F, 6).tolist() == [1, 2, 0, 5, 3, 6]
    assert search_problem.promoted(F, 7).tolist()[-1] == 4


def test_rungs_score_every_candidate_then_the_promoted_share_again(tiny_lenet5_float, tmp_path, data_dir,
                                                                    monkeypatch):
    """Every candidate is scored at the first rung; the ``search.promote`` share that ranks
    best there is scored again at the second, and keeps that score; every candidate of a rung
    draws the same mini-batches, so each score equals the rung's own score of it alone."""
    monkeypatch.setenv("QEVO_DATA_DIR", str(data_dir))
    cfg = search_config.validate(config_lib.load(REPO / "configs" / "lenet5.py", [
        f"float_from={tiny_lenet5_float}", "population_size=8", "search.rungs=((1, 200), (3, 500))",
        "search.promote=0.25", "data.max_train_images=3000"]))
    problem = search_problem.prepare(cfg, tmp_path)
    assert [r.evaluator.qat.steps for r in problem.rungs] == [1, 3]
    assert [r.images.shape[0] for r in problem.rungs] == [200, 500]
    genes = np.asarray(jax.random.randint(jax.random.key(3), (8, problem.space.num_genes), 0, 3), np.int32)
    key = step_keys(base_key(cfg.seed), 1)[1]
    F, acc, rung = problem.objectives(genes, key)
    bits = problem.space.decode(genes)
    first = problem.accuracy(0, bits, key)
    F0 = F.copy()
    F0[:, 0] = 1.0 - first
    top = search_problem.promoted(F0, 2)
    assert sorted(np.flatnonzero(rung == 1).tolist()) == sorted(top.tolist())
    np.testing.assert_array_equal(acc[rung == 0], first[rung == 0])
    again = problem.accuracy(1, Bits(w=bits.w[top], a=bits.a[top]), key)
    np.testing.assert_array_equal(acc[top], again)
    np.testing.assert_array_equal(F[:, 0], 1.0 - acc)


def test_the_sensitivity_ladder_lowers_the_least_sensitive_genes_first():
    from qevo.search import sensitivity

    s = np.array([0.04, 0.001, 0.02, -0.01])  # gene order by sensitivity: 3, 1, 2, 0
    lo, mid, hi = np.zeros(4, np.int32), np.ones(4, np.int32), np.full(4, 2, np.int32)
    genomes = sensitivity.ladder(s, lo, mid, hi, 3)
    assert genomes.tolist() == [[2, 2, 2, 0], [2, 1, 2, 1], [2, 0, 0, 0]]  # k = 1, 2, 3; middle at k = 2
    rates = sensitivity.mutation_rates(s, 0.25)
    assert rates.mean() == pytest.approx(0.25) and rates[3] == rates.max() and rates[0] == rates.min()
    u = 1 / (1 + np.array([0.04, 0.001, 0.02, 0.0]) / 0.02)  # median of the positive sensitivities: 0.02
    np.testing.assert_allclose(rates, 0.25 * 4 * u / u.sum())


def test_paired_differences_against_each_baseline_equal_hand_computation():
    rows = [
        {"name": "front_00", "kind": "front", "bitops": 1.0, "test_accuracy": 0.90, "test_accuracies": [0.91, 0.89]},
        {"name": "front_01", "kind": "front", "bitops": 2.0, "test_accuracy": 0.95, "test_accuracies": [0.96, 0.94]},
        {"name": "w2a2", "kind": "baseline", "bitops": 1.5, "test_accuracy": 0.85, "test_accuracies": [0.84, 0.86]},
        {"name": "w1a1", "kind": "baseline", "bitops": 0.5, "test_accuracy": 0.5, "test_accuracies": [0.5, 0.5]},
    ]
    (only,) = search_final.paired_differences(rows)  # no front model is as cheap as w1a1
    d = np.array([0.91 - 0.84, 0.89 - 0.86])
    assert only["baseline"] == "w2a2" and only["model"] == "front_00" and only["seeds"] == 2
    assert only["difference"] == pytest.approx(d.mean())
    assert only["standard_error"] == pytest.approx(d.std(ddof=1) / np.sqrt(2))
    assert only["bitops_ratio"] == pytest.approx(1.0 / 1.5)


@pytest.mark.slow
def test_a_multi_fidelity_search_with_sensitivity_trains_every_final_model_per_seed(tiny_lenet5_float, tmp_path,
                                                                                  data_dir):
    args = [f"--config.float_from={tiny_lenet5_float}", *TINY, "--config.generations=1",
            "--config.search.rungs=((1, 200), (3, 500))", "--config.search.sensitivity=True",
            "--config.final.enabled=True", "--config.final.seeds=2", "--config.final.max_models=2"]
    out = _search(tmp_path / "run", args, data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    for generation in (0, 1):
        assert sum(r["rung"] for r in history if r["generation"] == generation) == 2  # ceil(0.25 x 8)
    genes = json.loads((run / "sensitivity.json").read_text())["genes"]
    results = json.loads((run / "results.json").read_text())
    assert len(genes) == 6 and list(results["sensitivity"]) == ["conv2", "fc1", "fc2"]
    assert results["sensitivity"]["fc1"] == {"w": genes[1], "a": genes[4]}
    assert (run / "sensitivity.png").is_file() and results["final_seeds"] == 2
    rows = _rows(run / "final.csv")
    tested = {}
    for r in rows:
        if r["kind"] == "float":
            continue
        seeds = [json.loads((run / "final" / sub / r["name"] / "results.json").read_text())["test_accuracy"]
                 for sub in ("", "seed1")]
        tested[r["name"]] = np.asarray(seeds)
        assert float(r["test_accuracy"]) == pytest.approx(np.mean(seeds))
        assert float(r["test_accuracy_std"]) == pytest.approx(np.std(seeds, ddof=1))
    for c in results["against_baselines"]:
        d = tested[c["model"]] - tested[c["baseline"]]
        assert c["difference"] == pytest.approx(d.mean())
        assert c["standard_error"] == pytest.approx(d.std(ddof=1) / 2**0.5)
