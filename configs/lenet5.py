"""LeNet-5 on MNIST: float training (``python -m qevo.train``)."""

from qevo.config import defaults


def get_config():
    c = defaults()
    c.data.name = "mnist"
    c.model.name = "lenet5"
    c.train.epochs = 12
    c.train.batch_size = 128
    c.train.optimizer = "adam"
    c.train.learning_rate = 2e-3
    return c
