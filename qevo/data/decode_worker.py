"""The first code each image-decoding worker process of :mod:`qevo.data.datasets` runs.

The pool runs this file (``runpy.run_path``, its initializer) before a worker unpickles its
first task, ``qevo.data.datasets._decode_chunk``. Importing ``qevo.data.datasets`` runs ``qevo/__init__.py``
first, and that imports JAX and the models (seconds in every worker), while decoding needs
only numpy, Pillow and ``qevo.data.datasets``'s own imports. So where the worker has not imported qevo
(a notebook, pytest, ``python -c``), ``qevo`` is registered as a bare package of the same
folder, its ``__init__`` not run. Where the worker has (``spawn`` re-runs the main script or
module, and it imported qevo), qevo stays as it is.
"""

import importlib.machinery
import importlib.util
import pathlib
import sys

if "qevo" not in sys.modules:
    spec = importlib.machinery.ModuleSpec("qevo", None, is_package=True)
    spec.submodule_search_locations = [str(pathlib.Path(__file__).resolve().parent)]
    sys.modules["qevo"] = importlib.util.module_from_spec(spec)
