"""The method table: every method qevo runs, by the name its command and its runs carry.

Each method registers one :class:`qevo.harness.Method` (its name, defaults, validation,
``run``, and how to list and load the models of a finished run). ``config.json`` records the
method that made the run, and what reads a finished run (:mod:`qevo.export`) looks the method
up here instead of knowing each one.
"""

from __future__ import annotations

import json
import pathlib

import ml_collections

from qevo import config as config_lib
from qevo.coevolve.method import METHOD as COEVOLVE
from qevo.errors import CheckpointError
from qevo.harness import CONFIG, Method, fill_defaults, read_config
from qevo.search.method import METHOD as SEARCH
from qevo.sharing.method import METHOD as SHARING
from qevo.train.method import METHOD as TRAIN

METHODS: dict[str, Method] = {m.name: m for m in (TRAIN, SEARCH, SHARING, COEVOLVE)}
# Former names of methods, as runs made under them recorded them.
RENAMED = {"compress": "sharing"}


def of_run(workdir: pathlib.Path) -> tuple[Method, ml_collections.ConfigDict]:
    """The method that made the run in ``workdir`` and the run's config, with every key added
    to qevo since the run began at its default (:func:`qevo.harness.fill_defaults`). A run
    recorded before ``config.json`` named its method is known by the section only that
    method's config has.

    Raises:
      CheckpointError: ``workdir`` holds no readable ``config.json``, or one of no method
        qevo knows.
    """
    name, saved = read_config(workdir / CONFIG)
    if name is None:
        name = next((m.name for m in METHODS.values() if m.section is not None and m.section in saved), TRAIN.name)
    name = RENAMED.get(name, name)
    if name not in METHODS:
        raise CheckpointError(f"{workdir / CONFIG} names the method {name!r}, which this qevo does not have "
                              f"(it has {', '.join(METHODS)}); use the qevo version that made the run")
    method = METHODS[name]
    defaults = json.loads(json.dumps(config_lib.to_dict(method.defaults())))
    return method, ml_collections.ConfigDict(fill_defaults(saved, defaults))
