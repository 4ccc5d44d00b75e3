"""qevo: evolutionary compression of neural networks in JAX.

The public API (``__all__``), by topic:

* quantization: ``quantize_weight``, ``quantize_activation``, ``validate_bits``, ``Bits``, ``QuantOptions``
* models: ``get_model``, ``init_variables``, ``LeNet5``, ``CifarResNet``, ``MobileNetV2``, ``calibrate``,
  ``BatchNorm``; ``onednn_status`` (what runs the CPU convolutions: oneDNN, its version and the precision
  its kernels give ``model.precision="bfloat16"`` on this CPU, or XLA and why)
* your own Flax Linen or NNX network: ``quantize_model`` (finds its Conv/Dense layers by
  tracing it and quantizes them from outside; ``run_train``, ``run_search`` and
  ``run_sharing`` take the result, or the network itself, as ``model=``),
  ``QuantizedModel``, ``Layer``; your own arrays: ``Dataset.from_arrays``, ``Dataset.from_batches``
* your own loss and metric: ``loss=`` and ``metric=`` of ``run_train``, ``run_search``,
  ``run_sharing`` and ``run_coevolve`` (``qevo.models.losses``: jit-traceable ``loss(logits, labels)
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
  operators live in ``qevo.evolution.variation``), ``make_driver``, ``Driver``, ``DriverState``,
  ``evosax_strategies`` (relaxation and scalarisations in ``qevo.evolution.drivers``),
  ``search_defaults``, ``run_search``
* evolution: ``Strategy`` (``init/ask/tell`` over integer genomes), ``NSGA3``, ``Evosax``;
  ``evolve`` (the resumable generation loop the search and the weight sharing run on) and
  ``step_keys`` (the keys of a step, from its number)
* weight sharing: ``ClusterTable``, ``build_table``, ``SharedEvaluator``, ``seed_fitness``,
  ``save_compressed``, ``load_compressed``, ``sharing_defaults``, ``run_sharing``
* integer forward: ``IntKernel``, ``weight_levels``, ``integer_kernels``, ``integer_apply``,
  ``integer_batch_statistics``
* coevolution: ``Coevolution``, ``coevolve_defaults``, ``run_coevolve``, ``derivative_equations``
* the methods, by name: ``METHODS`` (``{name: Method}``: each method's defaults, validation,
  ``run``, and how to list and load the models of a finished run), ``Method``
* ONNX export (``pip install 'qevo[export]'``): ``export_onnx`` (:func:`qevo.export.exporter.export`,
  the function behind ``python -m qevo.export``)

Every name is imported with the package, except ``EVOSAX_STRATEGIES``: importing evosax
computes on the default device, and a process of a multi-process run must join
(:mod:`qevo.distributed`) before any computation, so :func:`evosax_strategies` gives the table
when called. The former names of this release's renamed ones (``run_compress``,
``compress_defaults``) still resolve, with a ``DeprecationWarning``.
"""

import warnings

# quantization
from qevo.quant.quantizers import quantize_weight
from qevo.quant.quantizers import quantize_activation
from qevo.quant.quantizers import validate_bits
from qevo.quant.layers import Bits
from qevo.quant.layers import QuantOptions

# models
from qevo.models.zoo import get_model
from qevo.models.zoo import init_variables
from qevo.models.networks import LeNet5
from qevo.models.networks import CifarResNet
from qevo.models.networks import MobileNetV2
from qevo.quant.calibration import calibrate
from qevo.quant.layers import BatchNorm
from qevo.quant.onednn import status as onednn_status

# a user's own network, loss and metric
from qevo.quant.interception import quantize as quantize_model
from qevo.quant.interception import QuantizedModel
from qevo.quant.interception import Layer
from qevo.models.losses import cross_entropy
from qevo.models.losses import top1

# cost model
from qevo.models.cost import layer_table
from qevo.models.cost import LayerTable
from qevo.models.cost import bitops
from qevo.models.cost import size_bits
from qevo.models.cost import reference_flops
from qevo.models.cost import reference_params

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
from qevo.evolution.variation import random_genes
from qevo.evolution.variation import uniform_genes
from qevo.evolution.variation import make_offspring
from qevo.evolution.drivers import make_driver
from qevo.evolution.drivers import Driver
from qevo.evolution.drivers import DriverState

# evolution: one init/ask/tell protocol over flax.struct states, and one resumable loop
from qevo.evolution.strategies import Strategy
from qevo.evolution.strategies import NSGA3
from qevo.evolution.strategies import Evosax
from qevo.evolution.loop import evolve
from qevo.evolution.loop import step_keys

# integer forward
from qevo.quant.intforward import IntKernel
from qevo.quant.intforward import weight_levels
from qevo.quant.intforward import integer_kernels
from qevo.quant.intforward import apply as integer_apply
from qevo.quant.intforward import batch_statistics as integer_batch_statistics

# data
from qevo.data.datasets import load_dataset
from qevo.data.datasets import Dataset
from qevo.data.datasets import normalize
from qevo.data.datasets import augment
from qevo.data.datasets import write_image_folder

# population evaluation
from qevo.evolution.population import PopulationEvaluator
from qevo.evolution.population import QATConfig

# training
from qevo.train.method import run as run_train
from qevo.train.trainer import Trainer
from qevo.train.trainer import fit
from qevo.train.trainer import PopulationTrainer
from qevo.train.trainer import fit_population

# bit-width search
from qevo.evolution.drivers import evosax_strategies
from qevo.search.config import defaults as search_defaults
from qevo.search.method import run as run_search

# weight sharing
from qevo.sharing.clusters import ClusterTable
from qevo.sharing.clusters import build_table
from qevo.sharing.clusters import SharedEvaluator
from qevo.sharing.clusters import seed_fitness
from qevo.sharing.clusters import save_compressed
from qevo.sharing.clusters import load_compressed
from qevo.sharing.config import defaults as sharing_defaults
from qevo.sharing.method import run as run_sharing

# coevolution
from qevo.coevolve.algorithm import Coevolution
from qevo.coevolve.algorithm import derivative_equations
from qevo.coevolve.config import defaults as coevolve_defaults
from qevo.coevolve.method import run as run_coevolve

# the methods, by name
from qevo.harness import Method
from qevo.methods import METHODS

# ONNX export
from qevo.export.exporter import export as export_onnx

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
    "evosax_strategies",
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
    "sharing_defaults",
    "run_sharing",

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

    # the methods, by name
    "Method",
    "METHODS",

    # ONNX export (onnx and onnxruntime are imported only when a model is exported)
    "export_onnx",
]


# The former names of renamed ones: old name -> new name.
_RENAMED = {"run_compress": "run_sharing", "compress_defaults": "sharing_defaults"}


def __getattr__(name: str):
    if name == "EVOSAX_STRATEGIES":
        return evosax_strategies()
    if name in _RENAMED:
        warnings.warn(f"qevo.{name} is now qevo.{_RENAMED[name]}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module 'qevo' has no attribute {name!r}")
