"""After the search: the front of everything evaluated (:func:`front_indices`), the models
trained fully (:func:`final_candidates`: the front, spread by BitOps, then the uniform
baselines), their training side by side with one budget (:func:`train_final`) and the rows of
``pareto.csv`` (:func:`pareto_rows`).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qevo import checkpoint
from qevo.evolution import nsga3, variation
from qevo.harness import (
    CHECKPOINT,
    MODEL,
    RESULTS,
    write_json,
)
from qevo.quant.layers import Bits
from qevo.search.config import BASELINES
from qevo.search.problem import Problem, SearchSpace
from qevo.train import trainer as training


def history_objectives(history: list[dict], names) -> np.ndarray:
    """float64 ``[R, M]`` objectives of every record: NaN where missing, and in every column
    of a model over ``search.constraints`` (so no front holds it)."""
    return np.array([[np.nan if r["objectives"][n] is None or r.get("violation", 0.0) > 0 else r["objectives"][n]
                      for n in names] for r in history], np.float64).reshape(len(history), len(names))


def front_indices(F: np.ndarray) -> np.ndarray:
    """Indices of the distinct, finite, non-dominated rows of ``F [R, M]``, ascending."""
    if len(F) == 0:
        return np.zeros(0, int)
    rank = np.asarray(nsga3.non_dominated_rank(jnp.asarray(F, jnp.float32)))
    finite = np.all(np.isfinite(F), axis=1)
    idx = np.flatnonzero((rank == 0) & finite)
    _, first = np.unique(F[idx], axis=0, return_index=True)
    return np.sort(idx[first])


def pick_spread(order_key: np.ndarray, k: int) -> np.ndarray:
    """Positions of ``k`` entries evenly spread over ``order_key`` sorted ascending (all if fewer)."""
    order = np.argsort(order_key, kind="stable")
    if len(order) <= k:
        return order
    return order[np.unique(np.round(np.linspace(0, len(order) - 1, k)).astype(int))]


def final_candidates(cfg, space: SearchSpace, history: list[dict]) -> list[dict]:
    """The models to train fully: front models, then the uniform baselines.

    At most ``final.max_models`` front models, taken in this order from the fronts of the
    mixed-precision models the search evaluated (a model with a baseline's bits is left to
    its baseline, and does not hide the mixed models it dominates: mixed precision's best
    answers are trained even where a uniform configuration beats them):

    1. for each uniform baseline the search evaluated, from the cheapest baseline up, the
       most accurate model of the accuracy-against-first-cost front (error and, by default,
       BitOps) that costs no more than that baseline: mixed precision's answer to the
       uniform configuration at its own cost;
    2. the rest of that front, spread evenly over the cost;
    3. the rest of the full front, spread likewise.
    """
    s = int(space.searched.sum())
    baselines = []
    for w, a in BASELINES:
        genes = variation.uniform_genes([w], [a], s, ((w, a),))
        bits = variation.decode(jnp.asarray(genes), np.array([w]), np.array([a]), space.searched)
        baselines.append({"name": f"w{w}a{a}", "kind": "baseline", "w_bits": np.asarray(bits[0][0]).tolist(),
                          "a_bits": np.asarray(bits[1][0]).tolist(), "search_val_accuracy": None})
    bits_of = lambda r: (tuple(r["w_bits"]), tuple(r["a_bits"]))  # noqa: E731
    uniform = {bits_of(b) for b in baselines}
    F = history_objectives(history, cfg.search.objectives)
    mixed = np.flatnonzero([bits_of(r) not in uniform for r in history])
    front, primary = mixed[front_indices(F[mixed])], mixed[front_indices(F[mixed, :2])]
    chosen = []
    for b in baselines[::-1]:
        seen = [j for j, r in enumerate(history) if bits_of(r) == bits_of(b)]
        cheaper = primary[F[primary, 1] <= min(F[j, 1] for j in seen)] if seen else primary[:0]
        if cheaper.size and len(chosen) < cfg.final.max_models:
            chosen.append(int(cheaper[np.argmin(F[cheaper, 0])]))
    chosen = np.unique(np.asarray(chosen, int))
    for pool in (np.setdiff1d(primary, chosen), np.setdiff1d(front, np.union1d(primary, chosen))):
        chosen = np.concatenate([chosen, pool[pick_spread(F[pool, 1], cfg.final.max_models - len(chosen))]])
    chosen = chosen[np.argsort(F[chosen, 1], kind="stable")]
    models = [
        {"name": f"front_{i:02d}", "kind": "front", "w_bits": history[j]["w_bits"], "a_bits": history[j]["a_bits"],
         "search_val_accuracy": history[j]["val_accuracy"]}
        for i, j in enumerate(chosen)
    ]
    return models + baselines


def final_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg`` with its ``train`` section set to the final models' budget (``final``)."""
    fcfg = ml_collections.ConfigDict(cfg.to_dict())
    fcfg.train.epochs, fcfg.train.optimizer = cfg.final.epochs, cfg.final.optimizer
    fcfg.train.learning_rate, fcfg.train.warmup_epochs = cfg.final.learning_rate, 0
    return fcfg


def train_final(cfg, problem: Problem, models: list[dict], workdir: pathlib.Path) -> list[dict]:
    """Train every model of ``models`` ``final.seeds`` times with the same budget (``final``),
    side by side; returns one row per model (its widths, costs, and its accuracies: the mean
    over the seeds, the test accuracy's sample standard deviation and each seed's).

    Training ``r`` draws its mini-batches and augmentation from seed ``cfg.seed + r``, the
    same for every model (so two models' accuracies of one seed are paired) and lives in
    ``final/`` (``r = 0``) or ``final/seed<r>/``: :func:`train_once`."""
    runs = [train_once(cfg, problem, models, final_folder(workdir, r), cfg.seed + r) for r in range(cfg.final.seeds)]
    rows = []
    for m in models:
        c = problem.costs(Bits(w=np.asarray([m["w_bits"]]), a=np.asarray([m["a_bits"]])))
        val = [run[m["name"]]["val_accuracy"] for run in runs]
        test = [run[m["name"]]["test_accuracy"] for run in runs]
        rows.append({**m, "val_accuracy": float(np.mean(val)), "test_accuracy": float(np.mean(test)),
                     "test_accuracy_std": float(np.std(test, ddof=1)) if len(test) > 1 else 0.0,
                     "test_accuracies": [float(t) for t in test], "seeds": len(test),
                     "epochs": runs[0][m["name"]]["epochs"], **{k: float(v[0]) for k, v in c.items()}})
    return rows


def final_folder(workdir: pathlib.Path, r: int) -> pathlib.Path:
    """Where final training ``r`` (of ``final.seeds``) keeps its models: ``final/``, then ``final/seed<r>/``."""
    return workdir / "final" / (f"seed{r}" if r else "")


def train_once(cfg, problem: Problem, models: list[dict], final: pathlib.Path, seed: int) -> dict[str, dict]:
    """Train every model of ``models`` once, side by side, drawing from ``seed``; returns each
    model's results by name.

    The models not yet trained train as one population (:class:`qevo.train.trainer.PopulationTrainer`:
    spread over every device, run on each by ``search.strategy``), checkpointed after every
    epoch in ``<final>/checkpoint.msgpack``. Each model's folder ``<final>/<name>/`` holds its
    ``history.csv``, its variables as ``model.msgpack`` (what :mod:`qevo.export.exporter` reads) and
    ``results.json``; a model with results for its widths and its ``model.msgpack`` is not
    trained again. A model finished by an earlier qevo (one after another, each with its own
    ``checkpoint.msgpack``) before ``model.msgpack`` was written gets it from that checkpoint;
    one that lost it otherwise trains again (to the same variables: the training is seeded)."""
    fcfg = final_config(cfg)
    model, loss, metric = problem.evaluator.model, problem.evaluator.loss, problem.evaluator.metric
    fitted = {}
    for m in models:
        folder = final / m["name"]
        saved = json.loads((folder / RESULTS).read_text()) if (folder / RESULTS).exists() else {}
        if (saved.get("w_bits"), saved.get("a_bits")) != (m["w_bits"], m["a_bits"]):
            continue
        if not (folder / MODEL).exists() and (folder / CHECKPOINT).exists():
            trainer = training.Trainer(fcfg, problem.ds, model, quantized=True, loss=loss, metric=metric)
            state, _ = checkpoint.load(folder / CHECKPOINT, trainer.init_state(problem.final_variables))
            checkpoint.save(folder / MODEL, state.variables, {"model": problem.model_name, "name": m["name"]})
        if (folder / MODEL).exists():
            fitted[m["name"]] = saved
    pending = [m for m in models if m["name"] not in fitted]
    if pending:
        folders = [final / m["name"] for m in pending]
        for folder in folders:  # a model trained with other widths (the candidates changed): train afresh
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        trainer = training.PopulationTrainer(fcfg, problem.ds, model, quantized=True, strategy=cfg.search.strategy,
                                             chunk_size=cfg.search.chunk_size, loss=loss, metric=metric)
        bits = Bits(w=np.array([m["w_bits"] for m in pending]), a=np.array([m["a_bits"] for m in pending]))
        key = jax.random.fold_in(jax.random.key(seed), 2)
        variables, results = training.fit_population(fcfg, problem.ds, problem.final_variables, bits, folders, key,
                                                     f"final {len(pending)} models, seed {seed}", trainer,
                                                     final / CHECKPOINT)
        for i, (m, folder) in enumerate(zip(pending, folders, strict=True)):
            one = jax.tree_util.tree_map(lambda v, i=i: v[i], variables)
            checkpoint.save(folder / MODEL, one, {"model": problem.model_name, "name": m["name"]})
            fitted[m["name"]] = {**results[i], "w_bits": m["w_bits"], "a_bits": m["a_bits"]}
            write_json(folder / RESULTS, fitted[m["name"]])
    return fitted


def paired_differences(rows: list[dict]) -> list[dict]:
    """For each uniform baseline of ``rows`` (:func:`train_final`'s), the front model with the
    highest mean test accuracy among those that cost no more BitOps, against the baseline:
    the mean over the seeds of their paired differences in test accuracy (front minus
    baseline, same seed: same mini-batches, same test images) and its standard error
    (sample standard deviation over sqrt of the seeds; 0 for one seed)."""
    out = []
    front = [r for r in rows if r["kind"] == "front"]
    for b in (r for r in rows if r["kind"] == "baseline"):
        cheaper = [r for r in front if r["bitops"] <= b["bitops"]]
        if not cheaper:
            continue
        best = max(cheaper, key=lambda r: r["test_accuracy"])
        d = np.asarray(best["test_accuracies"]) - np.asarray(b["test_accuracies"])
        se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        out.append({"baseline": b["name"], "model": best["name"], "bitops_ratio": best["bitops"] / b["bitops"],
                    "difference": float(d.mean()), "standard_error": se, "seeds": len(d)})
    return out


def pareto_rows(cfg, problem: Problem, history: list[dict]) -> list[dict]:
    """One row per distinct front model of the search, by ascending BitOps."""
    F = history_objectives(history, cfg.search.objectives)
    rows = []
    for j in front_indices(F):
        r = history[j]
        c = problem.costs(Bits(w=np.asarray([r["w_bits"]]), a=np.asarray([r["a_bits"]])))
        rows.append({"w_bits": r["w_bits"], "a_bits": r["a_bits"], "val_accuracy": r["val_accuracy"],
                     "generation": r["generation"], **{k: float(v[0]) for k, v in c.items()}})
    return sorted(rows, key=lambda r: (r["bitops"], -r["val_accuracy"]))


FINAL_COLUMNS = ["name", "kind", "w_bits", "a_bits", "search_val_accuracy", "val_accuracy", "test_accuracy",
                 "test_accuracy_std", "seeds", "epochs", "bitops", "size", "flops", "params"]
PARETO_COLUMNS = ["w_bits", "a_bits", "val_accuracy", "generation", "bitops", "size", "flops", "params"]
