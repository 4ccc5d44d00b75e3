"""LeNet-5 on MNIST, cooperative-coevolution training of integer weights (``python -m qevo.coevolve``).

conv2, fc1 and fc2 (60,480 weights) as 4-bit integer levels with 8-bit activations; conv1
and fc3 stay float (``quant.float_layers``); ``--config.coevolve.w_bits=2`` (or 3) for
lower widths. 12 cycles of 32 groups of 256 weights, 16 networks per group on 512-image
mini-batches: 6,144 evaluations, then the QAT baseline on the same 196,608 images.
The float model trains as ``configs/lenet5.py`` does unless ``--config.float_from`` names
a trained run.

The population runs vmapped: the integer layers are patch matrix products, and the float
first convolution, the same for every candidate, is then computed once per mini-batch
(on this 2-core CPU about 1.2x the evaluations per second of a sequential map).
"""

import pathlib

from qevo.coevolve.config import defaults
from qevo.config import take_sections


def get_config():
    c = take_sections(defaults(), pathlib.Path(__file__).with_name("lenet5.py"))
    c.coevolve.w_bits = 4
    c.coevolve.a_bits = 8
    c.coevolve.radius = 1
    c.coevolve.initial_mass = 0.98
    c.coevolve.threshold = 0.995
    c.coevolve.learning_rate = 0.5
    c.coevolve.group_size = 256
    c.coevolve.num_groups = 32
    c.coevolve.population_size = 16
    c.coevolve.batch_size = 512
    c.coevolve.cycles = 12
    c.coevolve.strategy = "vmap"
    c.coevolve.qat_optimizer = "adam"
    c.coevolve.qat_learning_rate = 1e-4
    return c
