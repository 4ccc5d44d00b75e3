"""ResNet-20 on CIFAR-10 (JPEG copy) at a 2-core CPU budget: ``configs/resnet20.py`` cut down.

* ``python -m qevo.train --config configs/resnet20_cpu.py --workdir runs/resnet20_cpu_float``:
  the float recipe of ``configs/resnet20.py`` (SGD with Nesterov momentum 0.9, learning rate
  0.1, weight decay 5e-4 on the kernels only, label smoothing 0.1, 2 warm-up epochs then
  cosine, batch 128, crop+flip) for the 52 epochs that fit an hour on a 2-core CPU with
  AMX, its convolutions' products in bfloat16 (float32 sums).
* ``python -m qevo.search --config configs/resnet20_cpu.py --workdir runs/resnet20_cpu_search
  --config.float_from=runs/resnet20_cpu_float``: the bit-width search from that model.
  Weights {1, 2, 4, 8} and activations {2, 4, 8} bits for the 18 inner convolutions;
  Objectives error and BitOps; a first population of 24 (the six uniform seeds of
  ``configs/resnet20.py`` and 18 random genomes), then 15 generations of 16, 30 QAT steps
  each (batch 128), scored on all 5,000 validation images; then 4 QAT epochs for 5 front
  models and for w8a8, w4a4 and w2a2 alike.
"""

import pathlib

from qevo import config as config_lib


def get_config():
    c = config_lib.load(pathlib.Path(__file__).with_name("resnet20.py"))
    c.train.epochs = 52
    c.model.precision = "bfloat16"
    c.population_size = 16
    c.generations = 15
    c.search.initial_samples = 24
    c.search.qat_steps = 30
    c.final.epochs = 4
    c.final.max_models = 5
    return c
