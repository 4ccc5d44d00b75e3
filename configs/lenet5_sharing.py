"""LeNet-5 on MNIST, weight-sharing compression (``python -m qevo.sharing``).

ReLU by default; ``--config.model.activation=tanh`` (or ``configs/lenet5_tanh_sharing.py``)
gives the seed's tanh network.  The float model trains as ``configs/lenet5.py`` does
(Adam 2e-3, 12 epochs, batch 128) unless ``--config.float_from`` names a trained run.
"""

import pathlib

from qevo.config import take_sections
from qevo.sharing.config import defaults


def get_config():
    c = take_sections(defaults(), pathlib.Path(__file__).with_name("lenet5.py"))
    c.population_size = 16
    c.generations = 16
    c.sharing.driver = "simple_ga"
    c.sharing.k_max = 16
    c.sharing.range_max_loss = 1.0
    c.sharing.max_accuracy_loss = 0.9
    return c
