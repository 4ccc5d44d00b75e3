"""The weight sharing's report: per codebook format, both compression rates, validation and
test accuracy, the compressed model saved and reloaded (:func:`report`); ``front.csv`` and
``front.png`` (:func:`write_front`).
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from qevo import distributed
from qevo.harness import figure, write_csv
from qevo.sharing import clusters
from qevo.sharing.codebook import CODEBOOK_BITS, quantize_codebook
from qevo.sharing.generations import front_keys

if TYPE_CHECKING:
    from qevo.sharing.method import Prepared


def report(prep: Prepared, cfg, layers: list[clusters.Layer], workdir: pathlib.Path | None) -> dict:
    """Step 5: per codebook format, both CRs, validation and test accuracy; with ``workdir``
    the compressed model saved and reloaded (its test accuracy checked)."""
    k = np.array([x.codebook.shape[0] for x in layers], np.int32)
    out = {}
    for fmt in cfg.sharing.report_formats:
        cr_mean, cr_weighted = clusters.compression_rates(jnp.asarray(k), prep.table.sizes, fmt)
        entry = {
            "codebook_bits": CODEBOOK_BITS[fmt],
            "cr_mean": float(cr_mean),
            "cr_weighted": float(cr_weighted),
            "val_accuracy": layers_accuracy(prep, layers, fmt, prep.val),
            "test_accuracy": layers_accuracy(prep, layers, fmt, prep.test),
        }
        entry["test_loss_points"] = 100 * (prep.float_test - entry["test_accuracy"])
        if workdir is not None:
            path = workdir / f"compressed_{fmt}.msgpack"
            meta = {"model": prep.model_name, "activation": cfg.model.activation, "dataset": prep.ds.name,
                    **{key: entry[key] for key in ("cr_mean", "cr_weighted", "val_accuracy", "test_accuracy")}}
            clusters.save_compressed(path, prep.variables, prep.paths, layers, fmt, meta)
            distributed.sync(f"saved {path.name}")  # process 0 wrote it; every process reads it back
            loaded, _ = clusters.load_compressed(path, prep.variables)
            entry["file"] = path.name
            reloaded = clusters.get_kernels(loaded["params"], prep.paths)
            entry["reloaded_test_accuracy"] = float(prep.accuracy(loaded, reloaded, prep.test))
        out[fmt] = entry
    return out


def write_front(workdir: pathlib.Path, rows: list[dict], names: list[str], float_val: float) -> None:
    """``front.csv`` (k per layer, validation accuracy, both CRs; atomic) and ``front.png``."""
    columns = [f"k_{n}" for n in names]
    keys = front_keys(rows[0])
    write_csv(workdir / "front.csv",
              [{**dict(zip(columns, r["k"], strict=True)), **{k: f"{r[k]:.6f}" for k in keys}} for r in rows],
              [*columns, *keys])
    with figure(workdir / "front.png") as ax:
        ax.plot([r["cr_weighted"] for r in rows], [100 * r["val_accuracy"] for r in rows], "o-",
                label="NSGA-III front")
        ax.axhline(100 * float_val, color="gray", ls="--", label="float model")
        ax.set_xlabel("size-weighted compression rate")
        ax.set_ylabel("validation accuracy [%]")
        ax.legend()


def layer_kernels(layers: list[clusters.Layer], fmt: str) -> list[jax.Array]:
    """Kernels of stored layers with codebooks rounded to ``fmt``."""
    return [quantize_codebook(jnp.asarray(x.codebook), fmt)[jnp.asarray(x.indices, jnp.int32)] for x in layers]


def layers_accuracy(prep: Prepared, layers: list[clusters.Layer], fmt: str, batches) -> float:
    """Accuracy on ``batches`` of the float model with the stored ``layers`` (codebooks in ``fmt``)."""
    return float(prep.accuracy(prep.variables, layer_kernels(layers, fmt), batches))
