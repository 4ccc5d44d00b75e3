"""Layer sensitivity, measured once before the search: how much validation accuracy each
gene costs when it alone takes its lowest width (HAWQ ranks layers by sensitivity before
choosing widths; this measures the loss of accuracy itself, with the search's own scoring).

It seeds the first population along the sensitivity order (:func:`ladder`) and biases
mutation towards the genes that cost little (:func:`mutation_rates`).
"""

from __future__ import annotations

import jax
import numpy as np

from qevo.search.problem import Problem


def gene_sensitivity(problem: Problem, key: jax.Array) -> np.ndarray:
    """float64 ``[G]``: per gene (the searched layers' weight widths, then their activation
    widths), the validation accuracy of all genes at their highest candidate width minus that
    with this gene alone at its lowest, at the most accurate rung (its QAT included), every
    candidate on the mini-batches of ``key``. Negative where lowering the gene scored higher."""
    lo, _, hi = problem.space.extremes()
    genes = np.tile(hi, (len(hi) + 1, 1))
    genes[np.arange(1, len(hi) + 1), np.arange(len(hi))] = lo
    acc = problem.accuracy(len(problem.rungs) - 1, problem.space.decode(genes), key)
    return acc[0] - acc[1:]


def ladder(sensitivity: np.ndarray, lo: np.ndarray, mid: np.ndarray, hi: np.ndarray, count: int) -> np.ndarray:
    """int32 ``[count', G]`` genomes (``count' <= count``, distinct ``k``) along the sensitivity
    order: the ``k`` least sensitive genes at their lowest candidate (``lo``), the rest at
    their highest (``hi``), for ``k`` spread evenly over ``1..G-1``, alternating with the same
    genes at their middle candidate (``mid``), so the first population spans the cost range
    along the path that costs the least accuracy."""
    g = len(sensitivity)
    order = np.argsort(sensitivity, kind="stable")
    out = []
    for i, k in enumerate(np.unique(np.round(np.linspace(1, max(g - 1, 1), count)).astype(int))):
        genome = hi.copy()
        genome[order[:k]] = (lo if i % 2 == 0 else mid)[order[:k]]
        out.append(genome)
    return np.asarray(out, np.int32).reshape(-1, g)


def mutation_rates(sensitivity: np.ndarray, base: float) -> np.ndarray:
    """float ``[G]`` per-gene mutation probabilities averaging ``base``: proportional to
    ``1 / (1 + s / m)``, ``s`` the gene's sensitivity (clipped at 0) and ``m`` the median of
    the positive ones, so a gene that costs little accuracy mutates more often than one that
    costs much; capped at 0.5."""
    s = np.maximum(np.asarray(sensitivity, np.float64), 0.0)
    m = np.median(s[s > 0]) if (s > 0).any() else 1.0
    u = 1.0 / (1.0 + s / m)
    return np.minimum(base * len(s) * u / u.sum(), 0.5)
