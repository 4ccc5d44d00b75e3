"""What benchmarks.common records in every report (the command line, the git commit) and
where a report goes by default."""

import importlib.util
import json
import subprocess
import sys
import types

import jax
import pytest

from benchmarks import common
from helpers import REPO


def _git(root, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def _this_checkout() -> dict:
    return {"commit": _git(REPO, "rev-parse", "HEAD"),
            "dirty": _git(REPO, "status", "--porcelain", "--untracked-files=no") != ""}


@pytest.fixture
def started_as(monkeypatch):
    """Make this process look started as ``python -m <module> <args>`` (module None: as a script)."""
    def start(module: str | None, argv: list[str]) -> None:
        main = types.ModuleType("__main__")
        main.__spec__ = importlib.util.find_spec(module) if module else None
        monkeypatch.setitem(sys.modules, "__main__", main)
        monkeypatch.setattr(sys, "argv", argv)
    return start


def test_git_state_is_this_checkouts_head_and_its_dirtiness():
    state = common.git_state()
    assert state == _this_checkout()
    assert len(state["commit"]) == 40


def test_git_state_sees_an_edit_to_a_tracked_file_but_not_a_new_file(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "tracked.txt").write_text("one\n")
    _git(tmp_path, "add", "tracked.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "new_result.json").write_text("{}\n")  # a report being written is no change to the code
    assert common.git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "tracked.txt").write_text("two\n")
    assert common.git_state(tmp_path) == {"commit": head, "dirty": True}


def test_git_state_outside_a_checkout_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert common.git_state(tmp_path) is None


def test_command_of_a_benchmark_run_with_dash_m(started_as):
    started_as("benchmarks.kmeans", [str(REPO / "benchmarks" / "kmeans.py"), "--quick", "--out", "my results.json"])
    assert common.command() == "python -m benchmarks.kmeans --quick --out 'my results.json'"


def test_command_of_a_script(started_as):
    started_as(None, ["tools/measure.py", "--n", "3"])
    assert common.command() == "python tools/measure.py --n 3"


def test_a_written_report_records_the_command_and_the_commit(tmp_path, started_as):
    started_as("benchmarks.nsga3", [str(REPO / "benchmarks" / "nsga3.py"), "--quick"])
    common.write({"benchmark": "b", "figure": 1.5}, tmp_path / "b_cpu" / "b.json", echo=False)
    written = json.loads((tmp_path / "b_cpu" / "b.json").read_text())
    assert written == {"benchmark": "b", "figure": 1.5, "command": "python -m benchmarks.nsga3 --quick",
                       "git": _this_checkout()}


def test_a_report_keeps_the_record_its_environment_took(tmp_path, started_as):
    started_as("benchmarks.run", [str(REPO / "benchmarks" / "run.py"), "--quick"])
    report = {**common.environment(), "figure": 2}
    started_as("benchmarks.kmeans", [str(REPO / "benchmarks" / "kmeans.py")])
    common.write(report, tmp_path / "r.json", echo=False)
    written = json.loads((tmp_path / "r.json").read_text())
    assert (written["command"], written["git"]) == ("python -m benchmarks.run --quick", _this_checkout())


@pytest.mark.parametrize("platform, kind, tag", [("cpu", "cpu", "cpu"),
                                                 ("gpu", "NVIDIA H100 80GB HBM3", "nvidia_h100_80gb_hbm3"),
                                                 ("tpu", "TPU v5 lite", "tpu_v5_lite")])
def test_default_report_path_follows_the_naming_scheme(monkeypatch, platform, kind, tag):
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(platform=platform, device_kind=kind)])
    results = REPO / "benchmarks" / "results"
    assert common.result_path("nsga3", quick=True) == results / f"nsga3_{tag}_quick" / "nsga3.json"
    assert common.result_path("scaling") == results / f"scaling_{tag}" / "scaling.json"
