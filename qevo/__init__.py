"""qevo: evolutionary compression of neural networks in JAX.

The public API (``__all__``), by topic:

* quantization: ``quantize_weight``, ``quantize_activation``, ``validate_bits``, ``Bits``, ``QuantOptions``
* models: ``get_model``, ``init_variables``, ``LeNet5``, ``CifarResNet``, ``MobileNetV2``, ``calibrate``,
  ``BatchNorm``; ``onednn_status`` (what runs the CPU convolutions: oneDNN, its version and the precision
  its kernels give ``model.precision="bfloat16"`` on this CPU, or XLA and why)
* your own Flax Linen or NNX network: ``quantize_model`` (finds its Conv/Dense layers by
  tracing it and quantizes them from outside; ``run_train``, ``run_search`` and
  ``run_compress`` take the result, or the network itself, as ``model=``),
  ``QuantizedModel``, ``Layer``; your own arrays: ``Dataset.from_arrays``, ``Dataset.from_batches``
* your own loss and metric: ``loss=`` and ``metric=`` of ``run_train``, ``run_search``,
  ``run_compress`` and ``run_coevolve`` (``qevo.losses``: jit-traceable ``loss(logits, labels)
  -> []`` and per-example ``metric(logits, labels) -> [N]`` in [0, 1]; defaults ``cross_entropy``
  and ``top1``); labels other than classes: ``Dataset.from_arrays(..., labels="any")``
* cost model: ``layer_table``, ``LayerTable``, ``bitops``, ``size_bits``, ``reference_flops``, ``reference_params``
* data: ``load_dataset``, ``Dataset``, ``normalize``, ``augment``, ``write_image_folder``
* population evaluation: ``PopulationEvaluator``, ``QATConfig``
* checkpoints: ``save_checkpoint``, ``load_checkpoint``
* errors a user can fix (subclasses of ``QevoError``, itself a ``ValueError``): ``ConfigError``,
  ``DataError``, ``CheckpointError``, ``PopulationMemoryError``, ``ExportError``
* training: ``run_train``; ``Trainer`` and ``fit`` (one model, data-parallel over the devices),
  ``PopulationTrainer`` and ``fit_population`` (many models side by side, spread over the devices)
* bit-width search: ``random_genes``, ``uniform_genes``, ``make_offspring`` (the single
  operators live in ``qevo.variation``), ``make_driver``, ``Driver``, ``DriverState``,
  ``EVOSAX_STRATEGIES`` (relaxation and scalarisations in ``qevo.drivers``),
  ``search_defaults``, ``run_search``
* evolution: ``Strategy`` (``init/ask/tell`` over integer genomes), ``NSGA3``, ``Evosax``;
  ``evolve`` (the resumable generation loop the search and the weight sharing run on) and
  ``step_keys`` (the keys of a step, from its number)
* weight sharing: ``ClusterTable``, ``build_table``, ``SharedEvaluator``, ``seed_fitness``,
  ``save_compressed``, ``load_compressed``, ``compress_defaults``, ``run_compress``
* integer forward: ``IntKernel``, ``weight_levels``, ``integer_kernels``, ``integer_apply``,
  ``integer_batch_statistics``
* coevolution: ``Coevolution``, ``coevolve_defaults``, ``run_coevolve``, ``derivative_equations``
* ONNX export (``pip install 'qevo[export]'``): ``export_onnx`` (``qevo.export.export``: the
  function behind ``python -m qevo.export``; the module's own name stays the module)

Most names are imported with the package. The modules that are also commands, ``python -m
qevo.<command>`` (``data``, ``train``, ``search``, ``compress``, ``coevolve``, ``export``), are
imported when one of their names is first used, and so are ``qevo.population`` and
``qevo.sharing``, which import ``qevo.data``: a module the package had imported would run a
second time as the command (Python's runpy warns of it). ``EVOSAX_STRATEGIES`` waits too:
importing evosax computes on the default device, and a process of a multi-process run must
join (``qevo.distributed``) before any computation.
"""

import importlib
from typing import TYPE_CHECKING

# quantization
from qevo.quant import quantize_weight
from qevo.quant import quantize_activation
from qevo.quant import validate_bits
from qevo.layers import Bits
from qevo.layers import QuantOptions

# models
from qevo.models import get_model
from qevo.models import init_variables
from qevo.networks import LeNet5
from qevo.networks import CifarResNet
from qevo.networks import MobileNetV2
from qevo.calibration import calibrate
from qevo.layers import BatchNorm
from qevo.onednn import status as onednn_status

# a user's own network, loss and metric
from qevo.interception import quantize as quantize_model
from qevo.interception import QuantizedModel
from qevo.interception import Layer
from qevo.losses import cross_entropy
from qevo.losses import top1

# cost model
from qevo.cost import layer_table
from qevo.cost import LayerTable
from qevo.cost import bitops
from qevo.cost import size_bits
from qevo.cost import reference_flops
from qevo.cost import reference_params

# checkpoints
from qevo.checkpoint import save as save_checkpoint
from qevo.checkpoint import load as load_checkpoint

# errors a user can fix
from qevo.errors import QevoError
from qevo.errors import ConfigError
from qevo.errors import DataError
from qevo.errors import CheckpointError
from qevo.errors import PopulationMemoryError
from qevo.errors import ExportError

# bit-width search: genes and drivers
from qevo.variation import random_genes
from qevo.variation import uniform_genes
from qevo.variation import make_offspring
from qevo.drivers import make_driver
from qevo.drivers import Driver
from qevo.drivers import DriverState

# evolution: one init/ask/tell protocol over flax.struct states, and one resumable loop
from qevo.strategies import Strategy
from qevo.strategies import NSGA3
from qevo.strategies import Evosax
from qevo.loop import evolve
from qevo.loop import step_keys

# integer forward
from qevo.intforward import IntKernel
from qevo.intforward import weight_levels
from qevo.intforward import integer_kernels
from qevo.intforward import apply as integer_apply
from qevo.intforward import batch_statistics as integer_batch_statistics

# The names imported when first used (the module docstring says why): name -> (module, name there).
_LAZY = {
    # data
    "load_dataset": ("qevo.data", "load_dataset"),
    "Dataset": ("qevo.data", "Dataset"),
    "normalize": ("qevo.data", "normalize"),
    "augment": ("qevo.data", "augment"),
    "write_image_folder": ("qevo.data", "write_image_folder"),
    # population evaluation
    "PopulationEvaluator": ("qevo.population", "PopulationEvaluator"),
    "QATConfig": ("qevo.population", "QATConfig"),
    # training
    "run_train": ("qevo.train", "run"),
    "Trainer": ("qevo.train", "Trainer"),
    "fit": ("qevo.train", "fit"),
    "PopulationTrainer": ("qevo.train", "PopulationTrainer"),
    "fit_population": ("qevo.train", "fit_population"),
    # bit-width search
    "EVOSAX_STRATEGIES": ("qevo.drivers", "EVOSAX_STRATEGIES"),
    "search_defaults": ("qevo.search", "defaults"),
    "run_search": ("qevo.search", "run"),
    # weight sharing
    "ClusterTable": ("qevo.sharing", "ClusterTable"),
    "build_table": ("qevo.sharing", "build_table"),
    "SharedEvaluator": ("qevo.sharing", "SharedEvaluator"),
    "seed_fitness": ("qevo.sharing", "seed_fitness"),
    "save_compressed": ("qevo.sharing", "save_compressed"),
    "load_compressed": ("qevo.sharing", "load_compressed"),
    "compress_defaults": ("qevo.compress", "defaults"),
    "run_compress": ("qevo.compress", "run"),
    # coevolution
    "Coevolution": ("qevo.coevolve", "Coevolution"),
    "coevolve_defaults": ("qevo.coevolve", "defaults"),
    "run_coevolve": ("qevo.coevolve", "run"),
    "derivative_equations": ("qevo.coevolve", "derivative_equations"),
    # ONNX export
    "export_onnx": ("qevo.export", "export"),
}

if TYPE_CHECKING:  # the same names, for type checkers and editors (tests/test_api.py checks)
    from qevo.coevolve import Coevolution
    from qevo.coevolve import defaults as coevolve_defaults
    from qevo.coevolve import derivative_equations
    from qevo.coevolve import run as run_coevolve
    from qevo.compress import defaults as compress_defaults
    from qevo.compress import run as run_compress
    from qevo.data import Dataset
    from qevo.data import augment
    from qevo.data import load_dataset
    from qevo.data import normalize
    from qevo.data import write_image_folder
    from qevo.drivers import EVOSAX_STRATEGIES
    from qevo.export import export as export_onnx
    from qevo.population import PopulationEvaluator
    from qevo.population import QATConfig
    from qevo.search import defaults as search_defaults
    from qevo.search import run as run_search
    from qevo.sharing import ClusterTable
    from qevo.sharing import SharedEvaluator
    from qevo.sharing import build_table
    from qevo.sharing import load_compressed
    from qevo.sharing import save_compressed
    from qevo.sharing import seed_fitness
    from qevo.train import PopulationTrainer
    from qevo.train import Trainer
    from qevo.train import fit
    from qevo.train import fit_population
    from qevo.train import run as run_train

__all__ = [
    # quantization
    "quantize_weight",
    "quantize_activation",
    "validate_bits",
    "Bits",
    "QuantOptions",

    # models
    "get_model",
    "init_variables",
    "LeNet5",
    "CifarResNet",
    "MobileNetV2",
    "calibrate",
    "BatchNorm",
    "onednn_status",

    # a user's own network, loss and metric
    "quantize_model",
    "QuantizedModel",
    "Layer",
    "cross_entropy",
    "top1",

    # cost model
    "layer_table",
    "LayerTable",
    "bitops",
    "size_bits",
    "reference_flops",
    "reference_params",

    # data
    "load_dataset",
    "Dataset",
    "normalize",
    "augment",
    "write_image_folder",

    # population evaluation
    "PopulationEvaluator",
    "QATConfig",

    # checkpoints
    "save_checkpoint",
    "load_checkpoint",

    # errors a user can fix
    "QevoError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "PopulationMemoryError",
    "ExportError",

    # training
    "run_train",
    "Trainer",
    "fit",
    "PopulationTrainer",
    "fit_population",

    # bit-width search
    "random_genes",
    "uniform_genes",
    "make_offspring",
    "make_driver",
    "Driver",
    "DriverState",
    "EVOSAX_STRATEGIES",
    "Strategy",
    "NSGA3",
    "Evosax",
    "evolve",
    "step_keys",
    "search_defaults",
    "run_search",

    # weight sharing
    "ClusterTable",
    "build_table",
    "SharedEvaluator",
    "seed_fitness",
    "save_compressed",
    "load_compressed",
    "compress_defaults",
    "run_compress",

    # integer forward
    "IntKernel",
    "weight_levels",
    "integer_kernels",
    "integer_apply",
    "integer_batch_statistics",

    # coevolution
    "Coevolution",
    "coevolve_defaults",
    "run_coevolve",
    "derivative_equations",

    # ONNX export (onnx and onnxruntime are imported only when a model is exported)
    "export_onnx",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'qevo' has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
