"""The population benchmark on two source trees of qevo, interleaved: new against old.

``python -m benchmarks.trees --baseline PATH [--rounds 3] [-- population args...]``

``PATH`` is a checkout of the older qevo (``git worktree add --detach PATH <commit>``).
Each round runs ``python -m benchmarks.population`` once on the baseline tree and once on
this one, alternately (so that load drift on a shared machine hits both alike), each in a
fresh interpreter that imports that tree's ``qevo`` (``python -S`` with the tree first on
``PYTHONPATH``, so an editable install does not redirect it). Both use this tree's
benchmark script and the same installed packages and oneDNN bridge. For every row (model,
scoring or QAT, population size) it reports the median ``auto`` throughput of each tree
over the rounds and their ratio ``new / old``.

Prints JSON and writes ``benchmarks/results/trees_<device>/trees.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np

from benchmarks import common

HERE = pathlib.Path(__file__).resolve().parent.parent


def commit(tree: pathlib.Path) -> str | None:
    """The tree's checked-out commit, or None outside git."""
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def run_once(tree: pathlib.Path, args: list[str]) -> dict:
    """One ``benchmarks.population`` report with ``tree``'s qevo imported."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "report.json"
        scripts = pathlib.Path(tmp) / "scripts"
        scripts.mkdir()
        (scripts / "benchmarks").symlink_to(HERE / "benchmarks")
        path = os.pathsep.join([str(tree), str(scripts), sysconfig.get_paths()["purelib"]])
        env = {**os.environ, "PYTHONPATH": path}
        code = "import sys, runpy; sys.argv[0] = 'benchmarks.population'; runpy.run_module('benchmarks.population', " \
               "run_name='__main__')"
        done = subprocess.run([sys.executable, "-S", "-c", code, *args, "--out", str(out)], env=env, cwd=tmp,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"benchmarks.population failed on {tree}:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def key(row: dict) -> tuple:
    return row["model"], row["mode"], row["population"]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m benchmarks.trees", description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="a checkout of the older qevo")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(own)
    trees = {"old": pathlib.Path(args.baseline).resolve(), "new": HERE}
    for tree in trees.values():
        if not (tree / "qevo" / "__init__.py").is_file():
            raise SystemExit(f"--baseline {tree} holds no qevo/__init__.py; give a checkout of qevo")
    throughput: dict = {}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            for row in run_once(tree, rest)["rows"]:
                if "throughput" in row:
                    throughput.setdefault(key(row), {}).setdefault(name, []).append(row["throughput"]["auto"])
    rows = []
    for (model, mode, population), by_tree in sorted(throughput.items()):
        old, new = (float(np.median(by_tree[n])) for n in ("old", "new"))
        rows.append({"model": model, "mode": mode, "population": population, "old": old, "new": new,
                     "new_vs_old": new / old, "old_values": by_tree["old"], "new_values": by_tree["new"]})
    report = {"benchmark": "trees", "unit": "images x individuals per second (auto strategy), medians",
              **common.environment(),
              "inputs": {"population_args": rest, "rounds": args.rounds,
                         "trees": {n: {"path": str(t), "commit": commit(t)} for n, t in trees.items()}},
              "rows": rows}
    return common.write(report, pathlib.Path(args.out) if args.out else common.result_path("trees"))


if __name__ == "__main__":
    main()
