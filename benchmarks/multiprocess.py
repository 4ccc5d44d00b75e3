"""Every method as two cooperating processes against one process, end to end on MNIST.

    python -m benchmarks.multiprocess --float-from RUN [--workdir runs/multiprocess]
        [--out benchmarks/results/multiprocess_<device>/multiprocess.json]

``RUN`` is a finished LeNet-5 float run (``python -m qevo.train --config configs/lenet5.py``).
Tiny runs of ``qevo.sharing`` (NSGA-III, 6 individuals x 3 generations, the held-out pick),
``qevo.coevolve`` (2-bit, 3 cycles, its QAT baseline) and ``qevo.search`` (6 individuals x 2
generations, one front model and the baselines trained side by side) each run as two
processes with one CPU device each, joined over the loopback address
(:func:`qevo.distributed.start_local`), and as one process. Per command: whether
``results.json`` (wall seconds aside) and ``history.jsonl`` are the same, and both wall times.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from benchmarks import common
from qevo.harness import without_seconds

COMMANDS = {
    "compress": ["qevo.sharing", "configs/lenet5_sharing.py", "--config.population_size=6", "--config.generations=3",
                 "--config.sharing.driver=nsga3", "--config.sharing.k_max=8", "--config.sharing.refine=False",
                 "--config.data.val_size=1000", "--config.sharing.eval_images=400",
                 "--config.sharing.report_formats=('float32','float8')"],
    "coevolve": ["qevo.coevolve", "configs/lenet5_cc.py", "--config.coevolve.w_bits=2", "--config.coevolve.cycles=3",
                 "--config.coevolve.num_groups=3", "--config.coevolve.group_size=64",
                 "--config.coevolve.population_size=4", "--config.coevolve.batch_size=64",
                 "--config.coevolve.eval_images=500", "--config.data.max_train_images=3000"],
    "search": ["qevo.search", "configs/lenet5.py", "--config.population_size=6", "--config.generations=2",
               "--config.search.qat_steps=2", "--config.search.eval_images=300", "--config.data.max_train_images=2000",
               "--config.final.max_models=1"],
}


def _outputs(workdir: pathlib.Path) -> tuple:
    history = [without_seconds(json.loads(line)) for line in (workdir / "history.jsonl").read_text().splitlines()]
    return without_seconds(json.loads((workdir / "results.json").read_text())), history


def run(name: str, float_run: str, workdir: pathlib.Path) -> dict:
    """``name`` as two processes and as one; the comparison and the wall seconds."""
    from qevo import distributed

    module, config, *args = COMMANDS[name]
    seconds = {}
    for processes in (2, 1):
        folder = workdir / f"{name}_{processes}"
        argv = ["-m", module, "--config", config, f"--config.float_from={float_run}", *args, "--workdir", str(folder)]
        start = time.perf_counter()
        procs = distributed.start_local(argv, processes)
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"{name} as {processes} process(es) failed:\n{err[-3000:]}")
        seconds[processes] = round(time.perf_counter() - start, 1)
    (results2, history2), (results1, history1) = (_outputs(workdir / f"{name}_{n}") for n in (2, 1))
    return {"command": f"python -m {module} --config {config} {' '.join(args)}",
            "same_results": results2 == results1, "same_history": history2 == history1,
            "seconds_two_processes": seconds[2], "seconds_one_process": seconds[1]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multiprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--float-from", required=True, dest="float_run", help="a finished LeNet-5 float run folder")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("runs/multiprocess"))
    parser.add_argument("--out", type=pathlib.Path,
                        help="JSON path (default benchmarks/results/multiprocess_<device>/multiprocess.json)")
    args = parser.parse_args(argv)
    environment = common.environment()
    commands = {name: run(name, args.float_run, args.workdir) for name in COMMANDS}
    return common.write({"benchmark": "two processes against one", "commands": commands, **environment},
                        args.out or common.result_path("multiprocess"))


if __name__ == "__main__":
    main()
