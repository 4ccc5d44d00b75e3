"""Validation and test accuracy of every NSGA-III front point of a finished weight-sharing run.

``python -m benchmarks.sharing_front --workdir runs/mobilenetv2_cpu_sharing``

The run's search scores networks on a validation prefix (``sharing.eval_images``) and picks
one; its ``results.json`` holds the whole front (k per layer, scoring accuracy, both CRs).
This scores each front point without refinement, float32 codebooks, on the whole
validation and test splits, so that a user can see what the choice of a point costs on
held-out data. Writes ``<workdir>/front_test.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qevo.evolution.population import batch_eval_set
from qevo.harness import read_config, write_json
from qevo.models.inputs import build_model, load_data
from qevo.sharing import clusters
from qevo.sharing import config as sharing_config
from qevo.train.pretrained import float_model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path, help="a finished qevo.sharing run (nsga3)")
    args = parser.parse_args(argv)
    cfg = sharing_config.validate(ml_collections.ConfigDict(read_config(args.workdir / "config.json")[1]))
    result = json.loads((args.workdir / "results.json").read_text())
    ds = load_data(cfg)
    model = build_model(cfg, ds.num_classes)
    variables, _ = float_model(cfg, ds, model, args.workdir)
    paths = clusters.kernel_paths(variables["params"])
    evaluator = clusters.SharedEvaluator(model, ds.mean, ds.std, paths)
    floats = clusters.get_kernels(variables["params"], paths)
    table = clusters.build_table(floats, cfg.sharing.k_max, n_iter=cfg.sharing.kmeans_iters)
    eb = cfg.train.eval_batch_size
    splits = {name: batch_eval_set(jnp.asarray(x), jnp.asarray(y), eb)
              for name, x, y in (("val", ds.val_images, ds.val_labels), ("test", ds.test_images, ds.test_labels))}
    accuracy = jax.jit(lambda kernels, batches: evaluator.accuracy(variables, kernels, batches))
    float_acc = {name: float(accuracy(floats, b)) for name, b in splits.items()}
    rows = []
    for point in result["front"]:
        kernels = clusters.table_kernels(table, table.centroids, jnp.asarray(np.asarray(point["k"]) - 1), floats)
        acc = {name: float(accuracy(kernels, b)) for name, b in splits.items()}
        rows.append({**point, "full_val_accuracy": acc["val"], "test_accuracy": acc["test"],
                     "test_loss_points": 100 * (float_acc["test"] - acc["test"])})
        print(f"CR {point['cr_weighted']:.2f} (mean-of-layers {point['cr_mean']:.2f}): scoring "
              f"{100 * point['val_accuracy']:.2f}%, validation {100 * acc['val']:.2f}%, test {100 * acc['test']:.2f}%")
    out = {"workdir": str(args.workdir), "float": float_acc, "front": rows,
           "scoring_images": result.get("scoring_images"), "codebook": "float32", "refinement": False}
    write_json(args.workdir / "front_test.json", out)
    return out


if __name__ == "__main__":
    main()
