"""qevo: evolutionary compression of neural networks in JAX.

The public API, imported lazily so that ``import qevo`` (and the data-decoding worker
processes) stays light:

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
* weight sharing: ``ClusterTable``, ``build_table``, ``SharedEvaluator``, ``seed_fitness``,
  ``save_compressed``, ``load_compressed``, ``compress_defaults``, ``run_compress``
* integer forward: ``IntKernel``, ``weight_levels``, ``integer_kernels``, ``integer_apply``,
  ``integer_batch_statistics``
* coevolution: ``Coevolution``, ``coevolve_defaults``, ``run_coevolve``, ``derivative_equations``
* ONNX export (``pip install 'qevo[export]'``): ``export_onnx`` (``qevo.export.export``: the
  function behind ``python -m qevo.export``; the module's own name stays the module)
"""

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "quantize_weight": ("qevo.quant", "quantize_weight"),
    "quantize_activation": ("qevo.quant", "quantize_activation"),
    "validate_bits": ("qevo.quant", "validate_bits"),
    "Bits": ("qevo.layers", "Bits"),
    "QuantOptions": ("qevo.layers", "QuantOptions"),
    "get_model": ("qevo.models", "get_model"),
    "init_variables": ("qevo.models", "init_variables"),
    "LeNet5": ("qevo.networks", "LeNet5"),
    "CifarResNet": ("qevo.networks", "CifarResNet"),
    "MobileNetV2": ("qevo.networks", "MobileNetV2"),
    "calibrate": ("qevo.calibration", "calibrate"),
    "BatchNorm": ("qevo.layers", "BatchNorm"),
    "onednn_status": ("qevo.onednn", "status"),
    "quantize_model": ("qevo.interception", "quantize"),
    "QuantizedModel": ("qevo.interception", "QuantizedModel"),
    "Layer": ("qevo.interception", "Layer"),
    "cross_entropy": ("qevo.losses", "cross_entropy"),
    "top1": ("qevo.losses", "top1"),
    "layer_table": ("qevo.cost", "layer_table"),
    "LayerTable": ("qevo.cost", "LayerTable"),
    "bitops": ("qevo.cost", "bitops"),
    "size_bits": ("qevo.cost", "size_bits"),
    "reference_flops": ("qevo.cost", "reference_flops"),
    "reference_params": ("qevo.cost", "reference_params"),
    "load_dataset": ("qevo.data", "load_dataset"),
    "Dataset": ("qevo.data", "Dataset"),
    "DataError": ("qevo.errors", "DataError"),
    "normalize": ("qevo.data", "normalize"),
    "augment": ("qevo.data", "augment"),
    "write_image_folder": ("qevo.data", "write_image_folder"),
    "PopulationEvaluator": ("qevo.population", "PopulationEvaluator"),
    "QATConfig": ("qevo.population", "QATConfig"),
    "PopulationMemoryError": ("qevo.errors", "PopulationMemoryError"),
    "save_checkpoint": ("qevo.checkpoint", "save"),
    "load_checkpoint": ("qevo.checkpoint", "load"),
    "CheckpointError": ("qevo.errors", "CheckpointError"),
    "QevoError": ("qevo.errors", "QevoError"),
    "ConfigError": ("qevo.errors", "ConfigError"),
    "ExportError": ("qevo.errors", "ExportError"),
    "random_genes": ("qevo.variation", "random_genes"),
    "uniform_genes": ("qevo.variation", "uniform_genes"),
    "make_offspring": ("qevo.variation", "make_offspring"),
    "run_train": ("qevo.train", "run"),
    "Trainer": ("qevo.train", "Trainer"),
    "fit": ("qevo.train", "fit"),
    "PopulationTrainer": ("qevo.train", "PopulationTrainer"),
    "fit_population": ("qevo.train", "fit_population"),
    "search_defaults": ("qevo.search", "defaults"),
    "run_search": ("qevo.search", "run"),
    "make_driver": ("qevo.drivers", "make_driver"),
    "Driver": ("qevo.drivers", "Driver"),
    "DriverState": ("qevo.drivers", "DriverState"),
    "EVOSAX_STRATEGIES": ("qevo.drivers", "EVOSAX_STRATEGIES"),
    "ClusterTable": ("qevo.sharing", "ClusterTable"),
    "build_table": ("qevo.sharing", "build_table"),
    "SharedEvaluator": ("qevo.sharing", "SharedEvaluator"),
    "seed_fitness": ("qevo.sharing", "seed_fitness"),
    "save_compressed": ("qevo.sharing", "save_compressed"),
    "load_compressed": ("qevo.sharing", "load_compressed"),
    "compress_defaults": ("qevo.compress", "defaults"),
    "run_compress": ("qevo.compress", "run"),
    "IntKernel": ("qevo.intforward", "IntKernel"),
    "weight_levels": ("qevo.intforward", "weight_levels"),
    "integer_kernels": ("qevo.intforward", "integer_kernels"),
    "integer_apply": ("qevo.intforward", "apply"),
    "integer_batch_statistics": ("qevo.intforward", "batch_statistics"),
    "Coevolution": ("qevo.coevolve", "Coevolution"),
    "coevolve_defaults": ("qevo.coevolve", "defaults"),
    "run_coevolve": ("qevo.coevolve", "run"),
    "derivative_equations": ("qevo.coevolve", "derivative_equations"),
    "export_onnx": ("qevo.export", "export"),
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the same names, visible to type checkers and IDEs (tests/test_api.py checks)
    from qevo.calibration import calibrate
    from qevo.checkpoint import load as load_checkpoint
    from qevo.checkpoint import save as save_checkpoint
    from qevo.coevolve import Coevolution, derivative_equations
    from qevo.coevolve import defaults as coevolve_defaults
    from qevo.coevolve import run as run_coevolve
    from qevo.compress import defaults as compress_defaults
    from qevo.compress import run as run_compress
    from qevo.cost import LayerTable, bitops, layer_table, reference_flops, reference_params, size_bits
    from qevo.data import Dataset, augment, load_dataset, normalize, write_image_folder
    from qevo.drivers import EVOSAX_STRATEGIES, Driver, DriverState, make_driver
    from qevo.errors import CheckpointError, ConfigError, DataError, ExportError, PopulationMemoryError, QevoError
    from qevo.export import export as export_onnx
    from qevo.interception import Layer, QuantizedModel
    from qevo.interception import quantize as quantize_model
    from qevo.intforward import (
        IntKernel,
        integer_kernels,
        weight_levels,
    )
    from qevo.intforward import (
        apply as integer_apply,
    )
    from qevo.intforward import (
        batch_statistics as integer_batch_statistics,
    )
    from qevo.layers import BatchNorm, Bits, QuantOptions
    from qevo.losses import cross_entropy, top1
    from qevo.models import get_model, init_variables
    from qevo.networks import CifarResNet, LeNet5, MobileNetV2
    from qevo.onednn import status as onednn_status
    from qevo.population import PopulationEvaluator, QATConfig
    from qevo.quant import quantize_activation, quantize_weight, validate_bits
    from qevo.search import defaults as search_defaults
    from qevo.search import run as run_search
    from qevo.sharing import ClusterTable, SharedEvaluator, build_table, load_compressed, save_compressed, seed_fitness
    from qevo.train import PopulationTrainer, Trainer, fit, fit_population
    from qevo.train import run as run_train
    from qevo.variation import make_offspring, random_genes, uniform_genes


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qevo' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(module), attr)


def __dir__():
    return __all__
