"""The float model every compression method starts from.

``float_from`` in a config names a finished ``python -m qevo.train`` run folder whose
``model.msgpack`` is loaded; without it the float model is trained (per the config's
``train`` section) in ``<workdir>/float``, resumably, before the method starts.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import jax
import ml_collections

from qevo import config as config_lib
from qevo import distributed
from qevo.data.datasets import Dataset
from qevo.harness import MODEL, RESULTS, float_folder, load_variables
from qevo.models.zoo import init_variables
from qevo.quant.interception import QevoModel
from qevo.train import method


def float_model(cfg: ml_collections.ConfigDict, ds: Dataset, model: QevoModel, workdir: pathlib.Path,
                loss: Callable | None = None, metric: Callable | None = None) -> tuple[dict, dict]:
    """Float variables and the results of the run that made them.

    Args:
      cfg: a command config (``float_from``, ``train``, ``model``, ``seed``).
      ds: the dataset (for the input shape).
      model: the model built from ``cfg``.
      workdir: the command's work folder (the float model trains in ``workdir/float``).
      loss, metric: what the float training minimises and scores (:func:`qevo.train.method.run`).

    Returns:
      ``(variables, results)``: the float ``params``/``batch_stats``/``quant`` and the
      train run's ``results.json`` (test accuracy, wall time).
    """
    folder = float_folder(workdir, cfg)
    if cfg.float_from is None:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / RESULTS).exists():
            float_cfg = ml_collections.ConfigDict(cfg.to_dict())
            float_cfg.train.w_bits = float_cfg.train.a_bits = 32
            method.run(float_cfg, folder, model=model, data=ds, loss=loss, metric=metric)
        distributed.sync("float model")  # process 0 wrote it; every process reads it
    elif not (folder / MODEL).is_file():
        raise config_lib.ConfigError(
            f"float_from={cfg.float_from!r} holds no {MODEL}; "
            "point it at a finished `python -m qevo.train` run folder"
        )
    template = init_variables(model, jax.random.key(cfg.seed), ds.train_images.shape[1:])
    variables = load_variables(folder / MODEL, template)
    results_path = folder / RESULTS
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    return variables, results
