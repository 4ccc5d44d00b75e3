"""The search's figure: ``pareto.png``, every evaluated candidate by BitOps and validation
error, the front, and the final models and baselines at their test error.
"""

from __future__ import annotations

import pathlib

import numpy as np

from qevo.harness import (
    figure,
)
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
