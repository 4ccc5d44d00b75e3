"""ResNet-20 on CIFAR-10, cooperative-coevolution training of integer weights
(``python -m qevo.coevolve --config configs/resnet20_cc.py``): the paper's 4-bit claim.

The 18 inner convolutions and both projection shortcuts (269,824 weights) as 4-bit integer
levels with 8-bit activations; the first convolution and the classifier stay float. The
float model and the quantizer (MSE-clipped per-channel scales) are those of
``configs/resnet20.py``; the float model trains first (100 epochs) unless
``--config.float_from`` names a trained run. A GPU run: each cycle evaluates
``num_groups * population_size`` = 2,048 networks on 256-image mini-batches.
``configs/resnet20_cc_cpu.py`` is the same method at a 2-core CPU budget.
"""

import pathlib

from qevo.coevolve.config import defaults
from qevo.config import take_sections

SIZED_FOR = "accelerator"  # on a CPU, every command says so at start (qevo.config.sized_for)
CPU_CONFIG = "resnet20_cc_cpu.py"


def get_config():
    c = take_sections(defaults(), pathlib.Path(__file__).with_name("resnet20.py"), ("data", "model", "train", "quant"))
    c.coevolve.w_bits = 4
    c.coevolve.a_bits = 8
    c.coevolve.group_size = 1024
    c.coevolve.num_groups = 64
    c.coevolve.population_size = 32
    c.coevolve.batch_size = 256
    c.coevolve.cycles = 40
    c.coevolve.qat_optimizer = "sgd"
    c.coevolve.qat_learning_rate = 0.01
    return c
