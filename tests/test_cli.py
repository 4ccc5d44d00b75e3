"""The command harness: --help, unknown keys, and runs that exhaust device memory."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import REPO, run_command
from qevo import cli, harness
from qevo import config as config_lib
from qevo.errors import CheckpointError, ConfigError, DataError, PopulationMemoryError
from qevo.search import config as search_config

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "lenet5.py")


def _exhaust_memory(cfg, workdir):
    """A real XLA allocation failure: 2^48 bytes, beyond any address space."""
    return jax.jit(lambda x: jnp.broadcast_to(x, (2**28, 2**20)) + 1)(jnp.ones((), jnp.int8)).block_until_ready()


def _population_too_big(cfg, workdir):
    raise PopulationMemoryError("scoring 16 individuals does not fit")


@pytest.mark.parametrize("fn, start", [
    (_exhaust_memory, "qevo.search: error: out of device memory "
                      "(RESOURCE_EXHAUSTED: Out of memory allocating 281474976710656 bytes.); "
                      "lower the population or batch sizes"),
    (_population_too_big, "qevo.search: error: scoring 16 individuals does not fit; "),
])
def test_out_of_memory_ends_the_command_with_its_memory_settings(fn, start, tmp_path, capsys):
    argv = ["--config", CONFIG, "--workdir", str(tmp_path), "--config.population_size=24",
            "--config.search.strategy=vmap"]
    assert cli.main("qevo.search", fn, lambda cfg: cfg, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(start), err
    assert ("memory settings now: --config.population_size=24 --config.search.strategy=vmap "
            "--config.search.chunk_size=None --config.search.qat_batch_size=") in err
    assert "float_from" not in err


def test_out_of_memory_after_float_training_says_how_to_reuse_the_float_model(tmp_path, capsys):
    (tmp_path / "float").mkdir()
    (tmp_path / "float" / "model.msgpack").write_bytes(b"")
    argv = ["--config", CONFIG, "--workdir", str(tmp_path)]
    assert cli.main("qevo.search", _exhaust_memory, lambda cfg: cfg, argv) == 2
    assert capsys.readouterr().err.endswith(f"; with a new --workdir, --config.float_from={tmp_path / 'float'} "
                                            "reuses this run's float model\n")


def test_other_runtime_errors_are_not_called_memory(tmp_path):
    def fails(cfg, workdir):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        cli.main("qevo.search", fails, lambda cfg: cfg, ["--config", CONFIG, "--workdir", str(tmp_path)])



@pytest.mark.parametrize("error", [ValueError("operands could not be broadcast together"), TypeError("bad operand")])
def test_a_bug_keeps_its_traceback(tmp_path, error):
    def buggy(cfg, workdir):
        raise error

    with pytest.raises(type(error), match=str(error)):
        cli.main("qevo.search", buggy, lambda cfg: cfg, ["--config", CONFIG, "--workdir", str(tmp_path)])


@pytest.mark.parametrize("error", [ConfigError("search.x must be > 0"), DataError("no images in /d"),
                                   CheckpointError("truncated")])
def test_a_user_error_is_one_line(tmp_path, capsys, error):
    def refuses(cfg, workdir):
        raise error

    assert cli.main("qevo.search", refuses, lambda cfg: cfg, ["--config", CONFIG, "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"qevo.search: error: {error}\n"

def test_help_lists_every_key_of_the_config_with_the_overrides(capsys):
    with pytest.raises(SystemExit) as done:
        cli.parse_args(["--config", CONFIG, "--config.population_size=32", "--help"], "qevo.search")
    out = capsys.readouterr().out.splitlines()
    assert done.value.code == 0 and out[0].startswith("usage: python -m qevo.search --config")
    assert "  population_size = 32" in out and "  search.qat_steps = 20" in out and "  train.epochs = 12" in out


@pytest.mark.parametrize("override, suggestion", [
    ("search.qat_stepz=3", "search.qat_steps"),   # misspelt
    ("qat_steps=3", "search.qat_steps"),          # right key, wrong section
    ("popsize=8", "population_size"),
])
def test_unknown_key_suggests_the_known_one(override, suggestion, tmp_path, capsys):
    argv = ["--config", CONFIG, "--workdir", str(tmp_path), f"--config.{override}"]
    assert cli.main("qevo.search", None, lambda cfg: cfg, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qevo.search: error: unknown config key '{override.split('=')[0]}' "
                          f"in override --config.{override} (did you mean '{suggestion}'?); "
                          "known keys: data.channels, data.data_dir, ")


# what a method's results hold besides its own figures (qevo.harness.ENVELOPE, with method and seed)
ENVELOPE = {"model": "lenet5", "dataset": "mnist", "seconds": {"total": 0.0}, "device": "cpu", "convolutions": {}}


@harness.method("train", config_lib.defaults)
def _never_runs(cfg, workdir):
    raise AssertionError("a refused input reached the method's body")


@pytest.mark.parametrize("source, message", [
    ("def get_config(:\n", "failed to load: SyntaxError: invalid syntax"),
    ("import qevo_no_such_module\n", "failed to load: ModuleNotFoundError: No module named 'qevo_no_such_module'"),
    ("x = 1\n", "defines no get_config(); define one that returns a ConfigDict"),
    ("def get_config():\n    return 3\n", "get_config() returned int, not an ml_collections.ConfigDict"),
    ("def get_config():\n    return {}['x']\n", "get_config() failed: KeyError: 'x'"),
])
def test_broken_config_file_gives_one_line(source, message, tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text(source)
    assert cli.main("qevo.search", _never_runs, search_config.validate,
                    ["--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qevo.search: error: config file {path}") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_python_gives_one_line(tmp_path, capsys):
    path = tmp_path / "resnet20.yaml"
    path.write_text("model: resnet20\n")

    assert cli.main("qevo.search", _never_runs, search_config.validate,
                    ["--config", str(path), "--workdir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"qevo.search: error: config file {path} is not a Python file; "
                                       "pass --config configs/<name>.py\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("search.qat_learning_rate=-1", "search.qat_learning_rate=-1.0 is out of range; use a number > 0"),
    ("search.qat_learning_rate=1e999", "search.qat_learning_rate=inf is not a finite number"),
    ("final.learning_rate=-1", "final.learning_rate=-1.0 is out of range; use a number > 0"),
    ("search.qat_batch_size=0", "search.qat_batch_size=0 is out of range; use an int >= 1"),
    ("search.qat_momentum=1.0", "search.qat_momentum=1.0 is out of range; use a number in [0, 1)"),
    ("search.qat_weight_decay=-0.1", "search.qat_weight_decay=-0.1 is out of range; use a number >= 0"),
    ("search.eval_images=0", "search.eval_images=0 is out of range; use an int >= 1, or None for all"),
    ("data.val_size=-1", "data.val_size=-1 is out of range; use an int >= 0"),
    ("data.max_train_images=-5", "data.max_train_images=-5 must be >= 1"),
])
def test_numeric_keys_are_range_checked(override, message, tmp_path, capsys):

    argv = ["--config", CONFIG, "--workdir", str(tmp_path / "run"), f"--config.{override}"]
    assert cli.main("qevo.search", _never_runs, search_config.validate, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qevo.search: error: config {message}"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_bad_work_folders_give_one_line(tmp_path, capsys):

    a_file = tmp_path / "file"
    a_file.write_text("x")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"seed": 0, "da')
    proc = pathlib.Path("/proc/qevo_run")  # a folder no one can write in, root included
    for workdir, message in ((a_file, f"--workdir {a_file} cannot be written (it is a file, not a folder); "
                                      "pass a folder path you can write to"),
                             (a_file / "run", f"--workdir {a_file / 'run'} cannot be written ({a_file} is a file); "
                                              "pass a folder path you can write to"),
                             (proc, f"--workdir {proc} cannot be written (no file can be made in /proc: "),
                             (corrupt, f"{corrupt / 'config.json'} is corrupt (")):
        assert cli.main("qevo.search", _never_runs, search_config.validate,
                        ["--config", CONFIG, "--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"qevo.search: error: {message}") and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "x" and (corrupt / "config.json").read_text() == '{"seed": 0, "da'


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders; /proc stands for them above")
def test_a_read_only_work_folder_gives_one_line(tmp_path, capsys):

    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for workdir in (folder, folder / "run"):
            assert cli.main("qevo.search", _never_runs, search_config.validate,
                            ["--config", CONFIG, "--workdir", str(workdir)]) == 2
            assert capsys.readouterr().err == (f"qevo.search: error: --workdir {workdir} cannot be written (no file "
                                               f"can be made in {folder}: Permission denied); pass a folder path you "
                                               "can write to\n")
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("module, config", [("qevo.train", "lenet5.py"), ("qevo.search", "lenet5.py"),
                                            ("qevo.sharing", "lenet5_sharing.py"), ("qevo.coevolve", "lenet5_cc.py")])
def test_a_work_folder_under_a_file_ends_each_command_before_any_work(module, config, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out = run_command(module, config, a_file / "run", timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr == (f"{module}: error: --workdir {a_file / 'run'} cannot be written ({a_file} is a file); "
                          "pass a folder path you can write to\n")
    assert a_file.read_text() == "x"



@pytest.mark.parametrize("module, config", [("qevo.train", "lenet5.py"), ("qevo.search", "lenet5.py"),
                                            ("qevo.sharing", "lenet5_sharing.py"), ("qevo.coevolve", "lenet5_cc.py")])
def test_images_too_small_for_the_model_end_each_command_with_one_line(module, config, data_dir, tmp_path):
    """LeNet-5 on 4x4 MNIST: its second convolution would have a negative size. Every command
    refuses it with status 2 and one line, before any training (nothing but config.json written)."""
    out = run_command(module, config, tmp_path / "run", ["--config.data.image_size=4"], data_dir, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    line = rf"{module}: error: the model [^\n]*4, 4, 1\)[^\n]*\w+Error: [^\n]*; give it inputs of the [^\n]*\n"
    assert re.fullmatch(line, out.stderr), out.stderr[-3000:]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]


def test_a_missing_bits_from_run_ends_the_coevolution_with_one_line_before_training(data_dir, tmp_path):
    out = run_command("qevo.coevolve", "lenet5_cc.py", tmp_path / "run",
                      [f"--config.bits_from={tmp_path / 'search'}", "--config.bits_model=front_01"], data_dir,
                      timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr == (f"qevo.coevolve: error: bits_from='{tmp_path / 'search'}' holds no finished qevo.search "
                          f"run ({tmp_path / 'search' / 'final.csv'} is missing); point it at a search work folder "
                          "or its committed results\n")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.json"]


def test_a_changed_config_is_refused_once_the_run_has_state(tmp_path):
    cfg = config_lib.defaults()
    harness.prepare_workdir(tmp_path, cfg)
    cfg.train.epochs = 3  # the first run stopped before any output: the new config is taken
    harness.prepare_workdir(tmp_path, cfg)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 3
    (tmp_path / "checkpoint.msgpack").write_bytes(b"state")
    cfg.train.epochs = 4
    with pytest.raises(ConfigError, match=r"holds a run with a different config .*; pass a new --workdir"):
        harness.prepare_workdir(tmp_path, cfg)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 3


def test_a_key_added_since_the_run_began_resumes_at_its_default(tmp_path):
    """A folder whose config.json predates a key (here ``threefry_partitionable`` and the
    new section ``extra``) resumes while the run holds those
    defaults, and is refused once one of them is changed."""
    known = config_lib.defaults()
    known.extra = ml_collections.ConfigDict({"option": 1})
    cfg = ml_collections.ConfigDict(known.to_dict())
    old = cfg.to_dict()
    del old["threefry_partitionable"], old["extra"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoint.msgpack").write_bytes(b"state")
    harness.prepare_workdir(tmp_path, cfg, known)
    assert json.loads((tmp_path / "config.json").read_text())["extra"] == {"option": 1}
    (tmp_path / "config.json").write_text(json.dumps(old))
    for key, value in (("threefry_partitionable", True), ("extra.option", 2)):
        changed = ml_collections.ConfigDict(cfg.to_dict())
        changed.update_from_flattened_dict({key: value})
        with pytest.raises(ConfigError, match="holds a run with a different config"):
            harness.prepare_workdir(tmp_path, changed, known)
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        harness.prepare_workdir(tmp_path, cfg)  # without the defaults a missing key is a change

def test_history_resume_policy(tmp_path):
    """The first ``steps`` lines are kept; a line after them (an interrupted step) is dropped
    unread, even truncated; a corrupt or missing line among them is a one-line error."""
    from qevo.checkpoint import CheckpointError, read_history

    path = tmp_path / "history.jsonl"
    path.write_text('{"generation": 1}\n{"generation": 2}\n{"generation": 3, "individ')
    assert read_history(path, 2, "generations") == [{"generation": 1}, {"generation": 2}]
    with pytest.raises(CheckpointError, match=r"history.jsonl line 3 is corrupt \(.*\); delete .* to start over"):
        read_history(path, 3)
    with pytest.raises(CheckpointError, match=r"history.jsonl has 3 generations, the checkpoint 4; delete"):
        read_history(path, 4, "generations")
    assert read_history(tmp_path / "none.jsonl", 0) == []


def test_history_of_several_records_per_step(tmp_path):
    """With ``step_key``, a step is every record naming its index: records past the
    checkpoint's steps are dropped, and a history that stops short of them is an error."""
    from qevo.checkpoint import CheckpointError, read_history

    path = tmp_path / "history.jsonl"
    records = [{"generation": g, "i": i} for g in (0, 1, 2) for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_history(path, 2, step_key="generation") == records[:6]
    assert read_history(path, 0, step_key="generation") == []
    with pytest.raises(CheckpointError, match=r"history.jsonl has no record of generation 3, the checkpoint's last"):
        read_history(path, 4, step_key="generation")


def test_step_log_commits_and_resumes(tmp_path):
    log = []
    steps = harness.StepLog(tmp_path, "cycle", log=log.append)
    state = {"x": np.zeros(3, np.float32)}
    assert steps.resume(state) == (state, [])
    steps.commit({"x": np.arange(3, dtype=np.float32)}, [{"cycle": 1}, {"cycle": 2}], 2)
    (tmp_path / "history.jsonl").write_text('{"cycle": 1}\n{"cycle": 2}\n{"cycle": 3}\n')  # an interrupted step
    resumed, history = steps.resume(state)
    np.testing.assert_array_equal(resumed["x"], [0, 1, 2])
    assert history == [{"cycle": 1}, {"cycle": 2}] and log == [f"resuming {tmp_path} after cycle 2"]
    assert harness.StepLog(None, "cycle").resume(state) == (state, [])


@harness.method("train", config_lib.defaults)
def _lock_holder(cfg, workdir):
    """The pid the work folder's lock names while the method runs, and the files there."""
    return {"pid": json.loads((workdir / harness.LOCK).read_text())["pid"],
            "files": sorted(p.name for p in workdir.iterdir()), **ENVELOPE}


def test_a_held_work_folder_refuses_a_second_run_until_its_holder_is_gone(tmp_path, capsys):
    """A live process that holds the lock (through the library) refuses the command and a run
    from Python; once it is killed its lock is stale, and the next run takes it over."""
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys\nfrom qevo import harness\n"
         "with harness.workdir_lock(pathlib.Path(sys.argv[1])):\n    print('held', flush=True)\n    sys.stdin.read()",
         str(workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline() == "held\n"
        lock = workdir / harness.LOCK
        assert json.loads(lock.read_text()) == {"pid": holder.pid, "host": socket.gethostname()}
        refusal = (f"{workdir} is in use by another run (pid {holder.pid} on {socket.gethostname()}, {lock}); "
                   f"wait for it to end or pass another --workdir (if pid {holder.pid} is no qevo run, delete {lock})")
        out = run_command("qevo.train", "lenet5.py", workdir, timeout=300)
        assert (out.returncode, out.stderr) == (2, f"qevo.train: error: {refusal}\n")
        with pytest.raises(CheckpointError) as err:
            _never_runs(config_lib.defaults(), workdir)
        assert str(err.value) == refusal
        assert [p.name for p in workdir.iterdir()] == [harness.LOCK]  # refused before config.json
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # a killed run leaves its lock
    argv = ["--config", CONFIG, "--workdir", str(workdir)]
    assert cli.main("qevo.train", _lock_holder, config_lib.validate, argv) == 0
    out = capsys.readouterr()
    assert out.err == f"qevo: {workdir} was locked by pid {holder.pid}, which is no longer running; taking it over\n"
    results = json.loads(out.out)
    assert {k: results[k] for k in ("pid", "files", "method")} == {
        "pid": os.getpid(), "files": ["config.json", harness.LOCK], "method": "train"}
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json", "results.json"]  # released at the end


def test_a_lock_is_released_when_the_run_fails_and_held_again_within_the_process(tmp_path):
    @harness.method("train", config_lib.defaults)
    def nested(cfg, workdir):
        return _lock_holder(cfg, workdir)  # the same folder again, from inside the run

    with harness.workdir_lock(tmp_path):
        assert nested(config_lib.defaults(), tmp_path)["pid"] == os.getpid()
        assert (tmp_path / harness.LOCK).exists()
    assert not (tmp_path / harness.LOCK).exists()
    with pytest.raises(AssertionError, match="a refused input reached"):
        _never_runs(config_lib.defaults(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "results.json"]
    (tmp_path / harness.LOCK).write_text("{")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / harness.LOCK} is not a qevo lock \(.*\); if no run is "
                                              rf"using {tmp_path}, delete it"):
        _never_runs(config_lib.defaults(), tmp_path)


def test_each_step_line_says_the_time_left_from_this_calls_measured_steps(capsys):
    """Resumed after 4 of 8 steps: the first step of the call (30 s, it compiles) alone gives
    the first estimate, and is left out of the later ones; the last line has none."""
    times = iter([100.0, 130.0, 132.0, 134.5, 137.0])
    bar = harness.Progress(8, 4, "steps", clock=lambda: next(times))
    for line in "abcd":
        bar.step(f"step {line}")
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["step a  (1 min 30 s left)", "step b  (4 s left)",
                                                    "step c  (2 s left)", "step d"]
    quiet = harness.progress(2, 0, "steps", show=False)
    quiet.step("not shown")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (59.6, "1 min 00 s"), (425, "7 min 05 s"),
                                           (7690, "2 h 08 min"), (3599.7, "1 h 00 min")])
def test_durations_read_as_a_person_says_them(seconds, text):
    assert harness.duration(seconds) == text


def test_a_config_sized_for_an_accelerator_says_so_in_one_line_at_start_on_a_cpu(data_dir, tmp_path):
    """A tiny LeNet-5 budget in a file that declares it is sized for an accelerator: on this
    CPU the command starts with one line (the float training's estimate, the CPU config),
    then runs; each epoch's line but the last says the time left."""
    (tmp_path / "tiny_cpu.py").write_text("")
    big = tmp_path / "tiny.py"
    big.write_text(f'from qevo import config\n\nSIZED_FOR = "accelerator"\nCPU_CONFIG = "tiny_cpu.py"\n\n\n'
                   f'def get_config():\n    c = config.load({str(REPO / "configs" / "lenet5.py")!r})\n'
                   f'    c.train.epochs = 2\n    c.data.max_train_images = 1024\n    return c\n')
    out = run_command("qevo.train", str(big), tmp_path / "run", data_dir=data_dir, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    notes = [line for line in out.stderr.splitlines() if "sized for an accelerator" in line]
    assert len(notes) == 1 and re.fullmatch(
        rf"qevo\.train: {re.escape(str(big))} is sized for an accelerator and this is a CPU: its float training "
        rf"\(2 epochs\) takes about \d+ s here \(from its training step, timed\); use "
        rf"{re.escape(str(tmp_path / 'tiny_cpu.py'))} instead", notes[0]), notes
    assert out.stderr.index(notes[0]) < out.stderr.index("epoch   1/2")
    epochs = r"\nepoch   1/2  loss [^\n]*\(\d+ s\)  \(\d+ s left\)\nepoch   2/2  loss [^\n]*\(\d+ s\)\n"
    assert re.search(epochs, out.stderr), out.stderr[-3000:]


def test_the_sizing_note_needs_a_cpu_and_an_accelerator_config(tmp_path, monkeypatch):
    resnet20 = REPO / "configs" / "resnet20.py"
    cfg = config_lib.load(resnet20, ["float_from=runs/resnet20_float"])
    assert cli.sizing_note("qevo.search", resnet20, cfg) == (
        f"qevo.search: {resnet20} is sized for an accelerator and this is a CPU: its float model comes from "
        f"float_from=runs/resnet20_float; use {REPO / 'configs' / 'resnet20_cpu.py'} instead")
    vega = REPO / "configs" / "resnet20_vega.py"
    assert cli.sizing_note("qevo.search", vega, config_lib.load(vega, ["float_from=f"])).endswith(
        "float_from=f; no CPU-sized config of it exists: lower train.epochs and the method's budget to shorten it")
    assert cli.sizing_note("qevo.search", REPO / "configs" / "resnet20_cpu.py", cfg) is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cli.sizing_note("qevo.search", resnet20, cfg) is None


def test_the_configs_declare_what_they_are_sized_for():
    declared = {path.name: config_lib.sized_for(path) for path in sorted((REPO / "configs").glob("*.py"))}
    accelerator = {name: cpu and cpu.name for name, (size, cpu) in declared.items() if size == "accelerator"}
    assert accelerator == {"mobilenetv2_sharing.py": "mobilenetv2_sharing_cpu.py", "resnet20.py": "resnet20_cpu.py",
                           "resnet20_cc.py": "resnet20_cc_cpu.py", "resnet20_vega.py": None}
    assert all(size is None for name, (size, _) in declared.items() if name not in accelerator)


@pytest.mark.parametrize("source, message", [
    ('SIZED_FOR = "gpu"\n', "SIZED_FOR = 'gpu' is not one of ('accelerator', 'cpu')"),
    ('SIZED_FOR = "accelerator"\nCPU_CONFIG = "none.py"\n', "CPU_CONFIG = 'none.py' names no config file beside it"),
    ("SIZED_FOR = str(1)\n", "SIZED_FOR and CPU_CONFIG must be plain strings"),
])
def test_a_bad_size_declaration_is_one_line(source, message, tmp_path):
    path = tmp_path / "x.py"
    path.write_text(source + "def get_config():\n    return None\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: {message}")):
        config_lib.sized_for(path)


@harness.method("train", config_lib.defaults)
def _draw(cfg, workdir):
    return {"draw": jax.random.normal(jax.random.key(0), (4,)).tolist(), **ENVELOPE}


@pytest.mark.parametrize("recorded", [False, True])
def test_a_method_draws_the_stream_its_config_records_whatever_the_process_setting(recorded, tmp_path):
    cfg = config_lib.defaults()
    cfg.threefry_partitionable = recorded
    draws = {}
    for process in (False, True):
        with jax.threefry_partitionable(process):
            draws[process] = (_draw(cfg, tmp_path / str(process))["draw"], jax.random.normal(jax.random.key(0), (4,)))
    np.testing.assert_array_equal(draws[False][0], draws[True][0])
    np.testing.assert_array_equal(draws[False][0], draws[recorded][1])
    assert not np.array_equal(draws[False][1], draws[True][1])  # the two settings do draw differently


def test_atomic_path_replaces_the_whole_file_or_nothing(tmp_path):
    from qevo.files import atomic_path

    target = tmp_path / "out" / "results.json"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["results.json"]


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "train.epochs takes int values, not str 'abc'; write it like --config.train.epochs=12"),
    ("seed=1.5", "seed takes int values, not float 1.5; write it like --config.seed=0"),
    ("data.image_size=big", "data.image_size takes int values, not str 'big'"),
])
def test_a_value_of_the_wrong_type_says_what_to_write(override, message):
    with pytest.raises(ConfigError) as err:
        config_lib.load(CONFIG, [override])
    assert str(err.value) == f"override --config.{override}: {message}"


def test_figure_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "front.png"
    with harness.figure(path) as ax:
        ax.plot([1, 2], [3, 4])
    png = path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    with pytest.raises(RuntimeError), harness.figure(path) as ax:
        ax.plot([1, 2], [4, 3])
        raise RuntimeError("stopped while drawing")
    assert path.read_bytes() == png and [p.name for p in tmp_path.iterdir()] == ["front.png"]


def test_fill_defaults_adds_only_the_keys_a_saved_config_lacks():
    """A run's saved config read by a newer qevo (``qevo.export.exporter``): missing keys, nested too,
    take the command's defaults; saved values stay."""
    saved = {"seed": 1, "model": {"name": "lenet5"}}
    defaults = {"seed": 0, "threefry_partitionable": False, "model": {"name": "resnet20", "conv": "auto"}}
    assert harness.fill_defaults(saved, defaults) == {"seed": 1, "threefry_partitionable": False,
                                                      "model": {"name": "lenet5", "conv": "auto"}}


def test_a_search_begun_before_rungs_sensitivity_and_final_seeds_resumes_as_it_ran():
    """The search's keys added since a run began fill in at defaults that keep its behaviour:
    one rung, no sensitivity, one final training, a draw per generation."""
    from qevo.search import config as search_config_

    defaults = json.loads(json.dumps(config_lib.to_dict(search_config_.defaults())))
    saved = {k: v for k, v in defaults.items() if k not in ("search", "final")}
    saved["search"] = {k: v for k, v in defaults["search"].items() if k not in ("rungs", "sensitivity", "promote")}
    saved["final"] = {k: v for k, v in defaults["final"].items() if k != "seeds"}
    filled = harness.fill_defaults(saved, defaults)
    assert filled["search"]["rungs"] == [] and filled["search"]["sensitivity"] is False
    assert filled["final"]["seeds"] == 1 and filled["search"]["shared_draws"] is False


# ---------------------------------------------------------------------------- the method table


def test_config_json_records_the_method_and_a_folder_of_another_method_is_refused(tmp_path):
    workdir = tmp_path / "run"
    results = _lock_holder(config_lib.defaults(), workdir)
    assert json.loads((workdir / "config.json").read_text())["method"] == "train"
    assert {k: results[k] for k in ("method", "seed")} == {"method": "train", "seed": config_lib.defaults().seed}
    assert json.loads((workdir / "results.json").read_text()) == results

    @harness.method("search", config_lib.defaults)
    def other(cfg, workdir):
        raise AssertionError("a folder of another method reached the method's body")

    with pytest.raises(ConfigError, match=f"^{re.escape(str(workdir))} holds a qevo.train run, not a qevo.search "
                                          "one; pass a new --workdir$"):
        other(config_lib.defaults(), workdir)


def test_a_method_whose_results_lack_the_envelope_is_a_bug(tmp_path):
    @harness.method("train", config_lib.defaults)
    def bare(cfg, workdir):
        return {"model": "lenet5"}

    with pytest.raises(AssertionError, match=r"qevo.train's results lack \['dataset', 'seconds', 'device', "):
        bare(config_lib.defaults(), tmp_path)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("recorded, section, method", [
    (None, "sharing", "sharing"), (None, "coevolve", "coevolve"), (None, "search", "search"), (None, None, "train"),
    ("compress", "sharing", "sharing"), ("search", "search", "search")])
def test_the_method_of_a_run_comes_from_config_json_or_for_an_old_run_from_its_section(tmp_path, recorded, section,
                                                                                      method):
    from qevo.methods import METHODS, of_run

    saved = {"seed": 3, **({section: {}} if section else {}), **({"method": recorded} if recorded else {})}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    found, cfg = of_run(tmp_path)
    assert found is METHODS[method]
    assert cfg.seed == 3 and "method" not in cfg
    assert set(config_lib.flatten(cfg)) == set(config_lib.flatten(found.defaults()))  # every key, at its default


def test_a_run_of_a_method_this_qevo_lacks_is_refused_in_one_line(tmp_path):
    from qevo.methods import of_run

    (tmp_path / "config.json").write_text(json.dumps({"method": "prune"}))
    with pytest.raises(CheckpointError, match="names the method 'prune', which this qevo does not have "
                                              r"\(it has train, search, sharing, coevolve\)"):
        of_run(tmp_path)


def test_a_renamed_config_file_loads_the_new_one_with_a_notice(capsys):
    cfg = config_lib.load(REPO / "configs" / "mobilenetv2_cpu.py")
    new = REPO / "configs" / "mobilenetv2_sharing_cpu.py"
    assert cfg == config_lib.load(new)
    assert capsys.readouterr().err == (f"qevo: config file {REPO / 'configs' / 'mobilenetv2_cpu.py'} is now {new}; "
                                       f"reading {new} (the old name goes in the next release)\n")


def test_the_former_command_name_runs_the_weight_sharing_with_a_notice(tmp_path):
    out = run_command("qevo.compress", "lenet5_sharing.py", tmp_path / "run", ["--config.sharing.k_max=1"],
                      timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        "qevo: python -m qevo.compress is now python -m qevo.sharing (the old name goes in the next release)",
        "qevo.sharing: error: config sharing.k_max=1 is invalid; use an int in 2..128 (k ranges over 1..k_max)"]
