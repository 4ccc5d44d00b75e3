"""One model at widths of your choice, trained as a finished bit-width search trains its final models.

``python -m benchmarks.train_final --workdir runs/resnet20_cpu_search_shared --name front_1071
--w-bits "32 4 4 4 4 4 4 4 4 4 4 1 4 4 4 4 4 4 4 32" --a-bits "32 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 4 32"
--out runs/shared_front_1071``

For a model the search did not train at the end (a run with ``final.enabled=False``, or a
front point it left out): the search's own final training (:func:`qevo.search.final.train_final`)
with the run's ``final`` budget, seed and float model. ``--w-bits`` and ``--a-bits`` give one
width per layer, first and last included. The model's ``history.csv``, ``model.msgpack`` and
``results.json`` go to ``<out>/final/<name>/`` (rerun to resume per epoch); the report, with
its results row, is printed and written to ``<out>/train_final.json``.
"""

from __future__ import annotations

import argparse
import pathlib

import ml_collections

from benchmarks import common, search_run
from qevo.search import config as search_config
from qevo.search import final as search_final
from qevo.search import problem as search_problem


def _widths(text: str) -> list[int]:
    return [int(b) for b in text.split()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_final", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path, help="a finished qevo.search run")
    parser.add_argument("--name", required=True, help="the model's name (its folder under <out>/final/)")
    parser.add_argument("--w-bits", required=True, type=_widths, help="weight bits per layer, space-separated")
    parser.add_argument("--a-bits", required=True, type=_widths, help="activation bits per layer, space-separated")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="folder of the training and the report")
    args = parser.parse_args(argv)
    if len(args.w_bits) != len(args.a_bits):
        parser.error(f"--w-bits has {len(args.w_bits)} widths and --a-bits {len(args.a_bits)}; give one per layer")
    cfg = search_config.validate(ml_collections.ConfigDict(search_run.run_config(args.workdir)))
    problem = search_problem.prepare(cfg, args.workdir)
    model = {"name": args.name, "kind": "front", "w_bits": args.w_bits, "a_bits": args.a_bits}
    report = {"benchmark": "final training of one model at given widths with a search run's final budget",
              **common.environment(), "inputs": {"workdir": str(args.workdir), **model, "final": cfg.final.to_dict()},
              "results": search_final.train_final(cfg, problem, [model], args.out)}
    return common.write(report, args.out / "train_final.json")


if __name__ == "__main__":
    main()
