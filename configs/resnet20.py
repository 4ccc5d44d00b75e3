"""ResNet-20 on CIFAR-10 (JPEG copy): the He et al. recipe (SGD 0.1, Nesterov, wd 5e-4, 200 epochs).

On a CPU, try a short run: ``--config.train.epochs=1 --config.data.max_train_images=5000``.
"""

from qevo.config import defaults


def get_config():
    c = defaults()
    c.data.name = "cifar10"
    c.model.name = "resnet20"
    c.train.epochs = 200
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.1
    c.train.momentum = 0.9
    c.train.nesterov = True
    c.train.weight_decay = 5e-4
    c.train.augment = True
    return c
