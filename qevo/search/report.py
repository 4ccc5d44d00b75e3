"""The search's figures: ``pareto.png``, every evaluated candidate by BitOps and validation
error, the front, and the final models and baselines at their test error; with
``search.sensitivity``, ``sensitivity.png``, the layers' sensitivity beside the front's widths.
"""

from __future__ import annotations

import pathlib

import numpy as np

from qevo.harness import figure
from qevo.models import cost


def plot(path: pathlib.Path, history: list[dict], final: list[dict], float_acc: float | None,
         table: cost.LayerTable) -> None:
    """``pareto.png``: accuracy against BitOps; searched models, the trained front, baselines, float."""
    with figure(path, (7, 4.5)) as ax:
        scored = [r for r in history if r["val_accuracy"] is not None]
        if scored:
            x = cost.bitops(table, np.array([r["w_bits"] for r in scored]), np.array([r["a_bits"] for r in scored]))
            y = 100 * np.array([r["val_accuracy"] for r in scored])
            ax.scatter(np.asarray(x), y, s=10, c="0.75", label="evaluated (validation, after search QAT)")
        front = [r for r in final if r["kind"] == "front"]
        if front:
            ax.plot([r["bitops"] for r in front], [100 * r["test_accuracy"] for r in front], "o-", c="C0",
                    label="front (test, after final training)")
        for i, r in enumerate(r for r in final if r["kind"] == "baseline"):
            ax.scatter([r["bitops"]], [100 * r["test_accuracy"]], marker="s", s=60, c=f"C{i + 1}",
                       label=f"uniform {r['name']} (test)", zorder=3)
        if float_acc is not None:
            ax.axhline(100 * float_acc, c="k", ls="--", lw=1, label="float (test)")
        ax.set_xscale("log")
        ax.set_xlabel("BitOps per image")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7, loc="lower right")


def plot_sensitivity(path: pathlib.Path, table: cost.LayerTable, searched: np.ndarray, sensitivity: np.ndarray,
                     final: list[dict]) -> None:
    """``sensitivity.png``: per searched layer (bool ``searched [L]``), the accuracy points its weights and its
    activations cost alone at their lowest width (bars, left axis), beside the weight widths
    the trained front models give it (lines, right axis)."""
    index = np.flatnonzero(searched)
    layers = [table.names[i] for i in index]
    x, n = np.arange(len(layers)), len(layers)
    with figure(path, (max(6.0, 0.45 * n + 2), 4.5)) as ax:
        ax.bar(x - 0.2, 100 * sensitivity[:n], 0.4, color="C0", label="weights at their lowest width")
        ax.bar(x + 0.2, 100 * sensitivity[n:], 0.4, color="C1", label="activations at their lowest width")
        ax.set_ylabel("validation accuracy lost alone (points)")
        ax.set_xticks(x, layers, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7, loc="upper left")
        right = ax.twinx()
        front = [r for r in final if r["kind"] == "front"]
        for i, r in enumerate(front):
            right.plot(x, np.asarray(r["w_bits"])[index], "o-", lw=0.8, ms=3, alpha=0.7,
                       color=f"C{(i + 2) % 10}", label=f"{r['name']} weight bits")
        right.set_ylabel("weight bits of the front models")
        if front:
            right.legend(fontsize=6, loc="upper right")
