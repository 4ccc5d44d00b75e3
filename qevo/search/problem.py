"""What the search evaluates: the searched layers and their candidate widths
(:class:`SearchSpace`), the costs of a population's widths (:func:`costs`), and the
:class:`Problem` (the float model, the population evaluator, the objectives and the
constraint violation of every candidate), prepared from a config (:func:`prepare`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qevo import config as config_lib
from qevo.data.datasets import Dataset, normalize
from qevo.evolution import nsga3, variation
from qevo.evolution.population import PopulationEvaluator, QATConfig, batch_eval_set
from qevo.models import cost
from qevo.models import inputs as model_inputs
from qevo.models.zoo import init_variables
from qevo.quant.calibration import calibrate
from qevo.quant.layers import Bits
from qevo.search.config import COSTS, parse_constraints
from qevo.train import trainer as training
from qevo.train.pretrained import float_model


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Genome layout: which layers are searched and their candidate widths.

    Attributes:
      w_candidates, a_candidates: int32 ``[Cw]``, ``[Ca]`` candidate widths.
      searched: bool ``[L]``, the searched quantizable layers (others stay float).
    """

    w_candidates: np.ndarray
    a_candidates: np.ndarray
    searched: np.ndarray

    @property
    def num_genes(self) -> int:
        return 2 * int(self.searched.sum())

    @property
    def n_choices(self) -> np.ndarray:
        s = int(self.searched.sum())
        return np.array([len(self.w_candidates)] * s + [len(self.a_candidates)] * s, np.int32)

    def extremes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int32 ``[G]`` each: per gene, the index of its lowest, middle and highest candidate width."""
        s = int(self.searched.sum())
        out = []
        for pick in (lambda c: c[0], lambda c: c[len(c) // 2], lambda c: c[-1]):
            w, a = pick(np.argsort(self.w_candidates)), pick(np.argsort(self.a_candidates))
            out.append(np.array([w] * s + [a] * s, np.int32))
        return out[0], out[1], out[2]

    def decode(self, genes) -> Bits:
        """Widths ``[P, L]`` of genes ``[P, G]``."""
        w, a = variation.decode(jnp.asarray(genes), self.w_candidates, self.a_candidates, self.searched)
        return Bits(w=np.asarray(w), a=np.asarray(a))


def make_space(cfg: ml_collections.ConfigDict, model) -> SearchSpace:
    """The genome of ``model``'s layers: every layer but those ``quant.float_layers`` keeps float."""
    searched = np.ones(model.num_layers, bool)
    searched[list(model_inputs.float_layers(cfg, model))] = False
    if not searched.any():
        raise config_lib.ConfigError(f"config quant.float_layers={cfg.quant.float_layers!r} keeps all "
                                     f"{model.num_layers} layers float: nothing is left to search; select fewer")
    return SearchSpace(np.array(cfg.search.w_candidates, np.int32), np.array(cfg.search.a_candidates, np.int32),
                       searched)


def costs(table: cost.LayerTable, bits: Bits) -> dict[str, np.ndarray]:
    """BitOps, size (bits) and the reference's "flops"/"params" of a population ``[P, L]``."""
    return {
        "bitops": np.asarray(cost.bitops(table, bits.w, bits.a), np.float64),
        "size": np.asarray(cost.size_bits(table, bits.w), np.float64),
        "flops": np.asarray(cost.reference_flops(table, bits.w, bits.a), np.float64),
        "params": np.asarray(cost.reference_params(table, bits.w), np.float64),
    }


@dataclasses.dataclass(frozen=True)
class Rung:
    """One fidelity of the scores: ``evaluator`` (its ``qat.steps`` of QAT per candidate) and
    the validation images it scores on, uint8 ``images [N, H, W, C]`` and ``labels [N, ...]``."""

    evaluator: PopulationEvaluator
    images: jax.Array
    labels: jax.Array


def promoted(F: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` rows of ``F [P, M]`` (error first, then costs) promoted to the next
    rung: by non-dominated rank, then by error; a row with a non-finite value last."""
    finite = np.all(np.isfinite(F), axis=1)
    rank = np.asarray(nsga3.non_dominated_rank(jnp.asarray(np.where(finite[:, None], F, np.nan), jnp.float32)))
    error = np.where(finite, F[:, 0], np.inf)
    return np.lexsort((error, rank, ~finite))[:k]


@dataclasses.dataclass
class Problem:
    """Everything needed to score genomes: ``objectives(genes, key) -> F [P, M]``."""

    cfg: ml_collections.ConfigDict
    space: SearchSpace
    table: cost.LayerTable
    rungs: tuple[Rung, ...]
    variables: dict
    final_variables: dict
    float_results: dict
    ds: Dataset
    model_name: str
    extra_objectives: dict
    train_images: jax.Array
    train_labels: jax.Array

    @property
    def evaluator(self) -> PopulationEvaluator:
        """The most accurate rung's evaluator (the last)."""
        return self.rungs[-1].evaluator

    def accuracy(self, rung: int, bits: Bits, key: jax.Array) -> np.ndarray:
        """float64 ``[P]`` validation accuracy of widths ``[P, L]`` at ``rung`` (QAT mini-batches
        drawn with ``key``)."""
        r = self.rungs[rung]
        return np.asarray(r.evaluator(self.variables, bits.w, bits.a, r.images, r.labels, key=key,
                                      train_images=self.train_images, train_labels=self.train_labels), np.float64)

    def costs(self, bits: Bits) -> dict[str, np.ndarray]:
        """:func:`costs` and the user's objectives (``objectives=`` of :func:`run`), float64 ``[P]`` each."""
        w, a = np.asarray(bits.w), np.asarray(bits.a)
        return {**costs(self.table, bits),
                **{name: np.asarray(f(w, a, self.table), np.float64).reshape(w.shape[0])
                   for name, f in self.extra_objectives.items()}}

    def violation(self, bits: Bits) -> np.ndarray:
        """float64 ``[P]``: how far each model exceeds ``search.constraints``, the sum over the
        bounds of ``max(0, value / bound - 1)``; 0 where it keeps every bound."""
        limits = parse_constraints(self.cfg.search.constraints)
        values = self.costs(bits) if limits else {}
        total = np.zeros(np.shape(bits.w)[0])
        for name, bound in limits.items():
            total += np.maximum(0.0, values[name] / bound - 1.0)
        return total

    def objectives(self, genes: np.ndarray, key: jax.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(F [P, M] float64, validation accuracy [P], rung [P])``; NaN error where the network
        diverged. Every candidate is scored at the first rung; at each next rung the
        ``search.promote`` share of the last rung's candidates (:func:`promoted`) is scored again,
        more accurately, and keeps that score. ``rung`` is the last rung each reached. Every
        candidate of a rung draws the same QAT mini-batches (``key``): scores are paired."""
        bits = self.space.decode(genes)
        values = {"error": np.zeros(len(genes)), **self.costs(bits)}
        names = self.cfg.search.objectives
        reached = np.arange(len(genes))
        acc, rung = np.zeros(len(genes)), np.zeros(len(genes), np.int32)
        for i in range(len(self.rungs)):
            if i:
                F = np.stack([values[o][reached] for o in names], axis=1)
                reached = reached[promoted(F, math.ceil(self.cfg.search.promote * len(reached)))]
            acc[reached] = self.accuracy(i, Bits(w=bits.w[reached], a=bits.a[reached]), key)
            values["error"][reached] = 1.0 - acc[reached]
            rung[reached] = i
        return np.stack([values[o] for o in names], axis=1), acc, rung

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-objective ``(lower, upper)``: error in [0, 1], costs between all-min and all-max widths."""
        lo, _, hi = self.space.extremes()
        c_lo, c_hi = self.costs(self.space.decode(lo[None])), self.costs(self.space.decode(hi[None]))
        ends = {o: sorted((c_lo[o][0], c_hi[o][0])) for o in c_lo}  # a user's objective may fall with width
        lower = np.array([0.0 if o == "error" else ends[o][0] for o in self.cfg.search.objectives])
        upper = np.array([1.0 if o == "error" else ends[o][1] for o in self.cfg.search.objectives])
        return lower, np.maximum(upper, lower + 1e-12)


def prepare(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, model=None, variables: dict | None = None,
            data: Dataset | None = None, objectives: dict | None = None, loss: Callable | None = None,
            metric: Callable | None = None) -> Problem:
    """Data, float model (trained, loaded or the user's), calibration, cost table and evaluator
    (``model``, ``variables``, ``data``, ``loss``, ``metric``: :func:`qevo.models.inputs.resolve_inputs`;
    ``objectives``: :func:`run`)."""
    unknown = sorted(set(parse_constraints(cfg.search.constraints)) - {*COSTS, *(objectives or {})})
    if unknown:
        raise config_lib.ConfigError(f"config search.constraints bounds {unknown}, which are no costs; bound "
                                     f"{COSTS} or a name of run(objectives=...)")
    inputs = model_inputs.resolve_inputs(cfg, model, variables, data, loss, metric)
    ds, model, loss, metric = inputs.ds, inputs.model, inputs.loss, inputs.metric
    space = make_space(cfg, model)  # a bad quant.float_layers is refused before the float model trains
    calib = normalize(jnp.asarray(ds.train_images[:512]), ds.mean, ds.std)
    starts, float_results = {}, {}
    if "float" in (cfg.search.start, cfg.final.start):
        if inputs.variables is None:
            float_vars, float_results = float_model(cfg, ds, model, workdir, loss, metric)
            starts["float"] = calibrate(model, float_vars, calib)
        else:  # the user's own float model: its test accuracy for final.csv's float row
            starts["float"] = calibrate(model, inputs.variables, calib)
            test = batch_eval_set(jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels), cfg.train.eval_batch_size)
            trainer = training.Trainer(cfg, ds, model, quantized=False, loss=loss, metric=metric)
            float_results = {"test_accuracy": float(trainer.accuracy(starts["float"], None, test))}
    if "scratch" in (cfg.search.start, cfg.final.start):
        fresh = init_variables(model, jax.random.fold_in(jax.random.key(cfg.seed), 7), ds.train_images.shape[1:])
        starts["scratch"] = calibrate(model, fresh, calib)
    start_variables = starts[cfg.search.start]
    s = cfg.search
    n_val = ds.val_images.shape[0]
    if n_val < 1:
        raise config_lib.ConfigError("the search scores on the validation split: set data.val_size > 0")
    rungs = []
    for steps, images in tuple(tuple(r) for r in s.rungs) or ((s.qat_steps, s.eval_images or n_val),):
        qat = QATConfig(
            steps=steps, batch_size=s.qat_batch_size, learning_rate=s.qat_learning_rate,
            momentum=s.qat_momentum, weight_decay=s.qat_weight_decay, weight_decay_on=cfg.train.weight_decay_on,
            optimizer=s.qat_optimizer,
        )
        evaluator = PopulationEvaluator(
            model, ds.mean, ds.std, eval_batch_size=cfg.train.eval_batch_size,
            strategy=s.strategy, chunk_size=s.chunk_size, qat=qat, loss=loss, metric=metric,
        )
        n = min(images, n_val)
        rungs.append(Rung(evaluator, jax.device_put(ds.val_images[:n]), jax.device_put(ds.val_labels[:n])))
    return Problem(
        cfg=cfg,
        space=space,
        table=cost.layer_table(model, start_variables, ds.train_images.shape[1:]),
        rungs=tuple(rungs),
        variables=start_variables,
        final_variables=starts[cfg.final.start],
        float_results=float_results,
        model_name=inputs.model_name,
        extra_objectives=dict(objectives or {}),
        ds=ds,
        train_images=jax.device_put(ds.train_images),
        train_labels=jax.device_put(ds.train_labels),
    )
