"""A finished ``qevo.search`` run's config and final models, as the benchmarks that revisit
them (``final_seeds``, ``score_budget``, ``train_final``) read them."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np

from qevo.harness import fill_defaults, read_config, read_rows
from qevo.search import config as search_config


def run_config(workdir: pathlib.Path) -> dict:
    """The config of the search run in ``workdir`` as a dict, keys added to qevo since the run
    at their defaults."""
    return fill_defaults(read_config(workdir / "config.json")[1], search_config.defaults().to_dict())


def final_models(workdir: pathlib.Path, models: str,
                 fail: Callable[[str], None]) -> tuple[dict, dict, list[str], np.ndarray, np.ndarray]:
    """The run in ``workdir`` and the rows of its ``final.csv`` named in ``models``.

    Args:
      workdir: the run's work folder (``config.json`` and ``final.csv``).
      models: comma-separated row names; each must be a quantized row (not ``float``).
      fail: called with a one-line message when a name is not such a row (``parser.error``).

    Returns:
      ``(config, rows, names, w, a)``: the run's config as a dict (keys added to qevo since the
      run at their defaults), ``final.csv``'s rows by name, the names in order, and their
      weight and activation widths, int32 ``[P, L]``.
    """
    config = run_config(workdir)
    rows = read_rows(workdir / "final.csv")
    names = models.split(",")
    missing = [n for n in names if n not in rows or rows[n]["kind"] == "float"]
    if missing:
        fail(f"--models {missing} are not quantized rows of {workdir / 'final.csv'}; "
             f"choose from {[n for n, r in rows.items() if r['kind'] != 'float']}")
    w = np.array([[int(b) for b in rows[n]["w_bits"].split()] for n in names], np.int32)
    a = np.array([[int(b) for b in rows[n]["a_bits"].split()] for n in names], np.int32)
    return config, rows, names, w, a
