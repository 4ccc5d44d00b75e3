"""LeNet-5 on MNIST, weight-sharing compression (``python -m qevo.compress``).

ReLU by default; ``--config.model.activation=tanh`` (or ``configs/lenet5_tanh_sharing.py``)
gives the seed's tanh network.  The float model trains as ``configs/lenet5.py`` does
(Adam 2e-3, 12 epochs, batch 128) unless ``--config.float_from`` names a trained run.
"""

from qevo.compress import defaults


def get_config():
    c = defaults()
    c.data.name = "mnist"
    c.model.name = "lenet5"
    c.model.activation = "relu"
    c.train.epochs = 12
    c.train.batch_size = 128
    c.train.optimizer = "adam"
    c.train.learning_rate = 2e-3
    c.population_size = 16
    c.generations = 16
    c.sharing.driver = "ga"
    c.sharing.k_max = 16
    c.sharing.range_max_loss = 1.0
    c.sharing.max_accuracy_loss = 0.9
    return c
