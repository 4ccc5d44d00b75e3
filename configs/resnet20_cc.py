"""ResNet-20 on CIFAR-10, cooperative-coevolution training of integer weights
(``python -m qevo.coevolve --config configs/resnet20_cc.py``): the paper's 4-bit claim.

The 18 inner convolutions and both projection shortcuts (269,824 weights) as 4-bit integer
levels with 8-bit activations; the first convolution and the classifier stay float. The
float model trains with the He et al. recipe of ``configs/resnet20.py`` (200 epochs) unless
``--config.float_from`` names a trained run. A GPU run: each cycle evaluates
``num_groups * population_size`` = 2,048 networks on 256-image mini-batches.

A plumbing run for a 2-core CPU (every output file, chance-level accuracy; 4 min 44 s on a
loaded CPU, about 5 evaluations per second)::

    python -m qevo.coevolve --config configs/resnet20_cc.py --workdir runs/resnet20_cc_cpu \
      --config.train.epochs=1 --config.data.max_train_images=256 --config.data.val_size=500 \
      --config.coevolve.cycles=2 --config.coevolve.num_groups=2 --config.coevolve.group_size=256 \
      --config.coevolve.population_size=4 --config.coevolve.batch_size=32 \
      --config.coevolve.eval_images=200 --config.coevolve.qat=False
"""

import pathlib

from qevo.coevolve import defaults
from qevo.config import take_sections


def get_config():
    c = take_sections(defaults(), pathlib.Path(__file__).with_name("resnet20.py"))
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
