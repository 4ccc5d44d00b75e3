"""Bit-width search (QuantEA): ``python -m qevo.search --config configs/lenet5.py``.

The protocol of docs/spec.md#search-protocol:

0. the float model is trained (or loaded from ``float_from``) and its activation clip
   ranges calibrated;
1. a population of per-layer (weight, activation) bit-width genomes evolves for
   ``generations`` generations. Each generation is one compiled population evaluation
   (``search.qat_steps`` steps of per-individual QAT from the float weights, on mini-batches
   drawn once per generation, or once for the whole search with ``search.shared_draws``;
   then accuracy on the validation split: the mean of a per-example metric, top-1 unless
   :func:`run` gets ``metric=``); objectives (minimised) are ``search.objectives``
   (default error, BitOps, size). The first population holds the uniform configurations
   of ``search.uniform_seeds`` (default w8a8, w4a4, w2a2) and random genomes. The driver
   is NSGA-III (:mod:`qevo.evolution.nsga3`) with the integer variation of :mod:`qevo.evolution.variation`,
   random search, or an evosax strategy on the relaxed genome with a scalarised fitness
   (:mod:`qevo.evolution.drivers`);
2. the non-dominated models of everything evaluated, and the uniform baselines, are
   trained with the same budget (``final``) and scored on the test split.

Outputs in the work folder: ``config.json``, ``history.jsonl`` (every evaluated
individual: generation, genes, bits, objectives), ``checkpoint.msgpack`` (after every
generation; a rerun resumes from it and gives the same result), ``pareto.csv``,
``final.csv``, ``pareto.png``, ``results.json`` and per trained model ``final/<name>/`` (its
training checkpoint, ``model.msgpack`` with its variables, ``results.json``).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import ml_collections
import numpy as np

from qevo.data.datasets import Dataset
from qevo.errors import CheckpointError
from qevo.harness import (
    MODEL,
    RESULTS,
    Method,
    Stopwatch,
    Stored,
    environment,
    float_folder,
    load_variables,
    method,
    read_rows,
    write_csv,
)
from qevo.quant.interception import QevoModel
from qevo.quant.layers import Bits
from qevo.search.config import defaults, validate, with_objectives
from qevo.search.final import (
    FINAL_COLUMNS,
    PARETO_COLUMNS,
    final_candidates,
    front_indices,
    history_objectives,
    paired_differences,
    pareto_rows,
    train_final,
)
from qevo.search.generations import generations, sensitivity_of, throughput
from qevo.search.problem import prepare
from qevo.search.report import plot, plot_sensitivity


@method("search", defaults, resolve=lambda cfg, objectives=None, **_: with_objectives(cfg, objectives or {}))
def run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, *, model=None, variables: dict | None = None,
        data: Dataset | None = None, objectives: dict | None = None, loss: Callable | None = None,
        metric: Callable | None = None) -> dict:
    """The whole protocol in ``workdir`` (resuming where it stopped); returns the summary.

    From Python, ``model=`` (any ``flax.linen`` network, unchanged), ``variables=`` (its
    trained float variables; None: trained here per ``cfg.train``) and ``data=`` (a
    :class:`qevo.data.datasets.Dataset`, e.g. :meth:`~qevo.data.datasets.Dataset.from_arrays`) replace
    ``cfg.model`` and ``cfg.data`` (:func:`qevo.models.inputs.resolve_inputs`). ``objectives=``
    adds named objectives, minimised beside ``search.objectives``: each
    ``f(w_bits, a_bits, table) -> [P]`` of a population's int widths ``[P, L]`` and the
    :class:`qevo.models.cost.LayerTable` (a latency lookup table, say); they go into the history,
    ``pareto.csv`` and ``final.csv`` under their names. ``loss=`` (``loss(logits, labels) ->
    float32 []``, the batch mean; default cross-entropy) is what the float model, every
    candidate's QAT and the final models train with; ``metric=`` (``metric(logits, labels) ->
    float32 [N]``, per example in [0, 1]; default top-1) is what every accuracy averages, so
    the ``error`` objective is one minus its mean. Both must be jit-traceable
    (:mod:`qevo.models.losses`)."""
    watch = Stopwatch()
    workdir.mkdir(parents=True, exist_ok=True)
    with watch.stage("prepare"):
        problem = prepare(cfg, workdir, model, variables, data, objectives, loss, metric)
        env = environment(problem.evaluator.model, problem.variables, problem.ds.train_images.shape[1:],
                          cfg.train.batch_size, cfg.model.precision)
    sensitivity = None
    if cfg.search.sensitivity:
        with watch.stage("sensitivity"):
            sensitivity = sensitivity_of(cfg, problem, workdir)
    with watch.stage("search"):
        state, history = generations(cfg, problem, workdir, sensitivity)
    extra = list(problem.extra_objectives)
    write_csv(workdir / "pareto.csv", pareto_rows(cfg, problem, history), PARETO_COLUMNS + extra)
    with watch.stage("final"):
        final = (train_final(cfg, problem, final_candidates(cfg, problem.space, history), workdir)
                 if cfg.final.enabled else [])
    float_acc = problem.float_results.get("test_accuracy")
    rows = list(final)
    if float_acc is not None:
        num_layers = problem.table.num_layers
        float_costs = problem.costs(Bits(w=np.full((1, num_layers), 32), a=np.full((1, num_layers), 32)))
        rows.append({"name": "float", "kind": "float", "w_bits": [32] * num_layers, "a_bits": [32] * num_layers,
                     "test_accuracy": float_acc, **{k: float(v[0]) for k, v in float_costs.items()}})
    write_csv(workdir / "final.csv", rows, FINAL_COLUMNS + extra)
    plot(workdir / "pareto.png", history, final, float_acc, problem.table)
    layers = [problem.table.names[i] for i in np.flatnonzero(problem.space.searched)]
    if sensitivity is not None:
        plot_sensitivity(workdir / "sensitivity.png", problem.table, problem.space.searched, sensitivity, final)
    results = {
        "model": problem.model_name,
        "dataset": problem.ds.name,
        "driver": cfg.search.driver,
        "evaluations": len(history),
        "throughput": throughput(state),
        "front_size": len(front_indices(history_objectives(history, cfg.search.objectives))),
        "float_test_accuracy": float_acc,
        "final": [{k: r[k] for k in ("name", "test_accuracy", "test_accuracy_std", "bitops", "size") if k in r}
                  for r in rows],
        "final_seeds": cfg.final.seeds,
        **({"sensitivity": {name: {"w": float(sensitivity[i]), "a": float(sensitivity[len(layers) + i])}
                            for i, name in enumerate(layers)}} if sensitivity is not None else {}),
        "against_baselines": paired_differences(final),
        "seconds": watch.seconds(),
        **env,
    }
    return results


def models(workdir: pathlib.Path, cfg: ml_collections.ConfigDict) -> list[str]:
    """The names of a finished search's trained models: the rows of its ``final.csv``."""
    return list(_final_rows(workdir))


def load(workdir: pathlib.Path, cfg: ml_collections.ConfigDict, name: str, model: QevoModel, template: dict,
         results: dict) -> Stored:
    """The final model ``name`` (a row of ``final.csv``): its trained variables and widths, as
    its first training (``final/<name>/``, of the run's own seed) left them."""
    row = _final_rows(workdir)[name]
    bits = Bits(w=np.array(row["w_bits"].split(), np.int32), a=np.array(row["a_bits"].split(), np.int32))
    accuracy = float(row["test_accuracy"])
    if row["kind"] == "float":
        return Stored(load_variables(float_folder(workdir, cfg) / MODEL, template), None, {}, accuracy)
    folder = workdir / "final" / name
    if not (folder / MODEL).is_file():
        raise CheckpointError(f"{folder} holds no {MODEL} (a search finished before qevo saved final models); "
                              f"rerun `python -m qevo.search` with the same --workdir to write it")
    if (folder / RESULTS).is_file():  # this model's own accuracy: final.csv's is the mean over final.seeds
        accuracy = float(json.loads((folder / RESULTS).read_text())["test_accuracy"])
    return Stored(load_variables(folder / MODEL, template), bits, {}, accuracy)


def _final_rows(workdir: pathlib.Path) -> dict[str, dict]:
    path = workdir / "final.csv"
    if not path.is_file():
        raise CheckpointError(f"{workdir} holds no final.csv: the search has not finished its final training "
                              "(rerun it, with --config.final.enabled=True)")
    return read_rows(path)


METHOD = Method("search", defaults, validate, run, models, load, section="search", several=True)
