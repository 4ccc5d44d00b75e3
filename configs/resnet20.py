"""ResNet-20 on CIFAR-10 (JPEG copy).

* ``python -m qevo.train --config configs/resnet20.py``: the He et al. float recipe (SGD 0.1,
  Nesterov, weight decay 5e-4, cosine, 200 epochs, crop+flip augmentation).
* ``python -m qevo.search --config configs/resnet20.py``: bit-width search over {2, 4, 8} for
  the 18 inner layers, 32 individuals x 30 generations with 100 QAT steps each, then 30
  QAT epochs for every front model and uniform baseline. A GPU run.

A reduced budget for a 2-core CPU (every output file, chance-level accuracy)::

    python -m qevo.search --config configs/resnet20.py --workdir runs/resnet20_cpu \\
      --config.train.epochs=1 --config.data.max_train_images=1000 \\
      --config.population_size=8 --config.generations=1 --config.search.qat_steps=2 \\
      --config.search.eval_images=500 --config.final.epochs=1 --config.final.max_models=1

(4 min 51 s on an idle 2-core CPU, with the decoded CIFAR-10 cache already built.)
"""

from qevo.search import search_defaults


def get_config():
    c = search_defaults()
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
    c.population_size = 32
    c.generations = 30
    c.search.qat_steps = 100
    c.search.qat_learning_rate = 0.01
    c.search.qat_weight_decay = 5e-4
    c.final.epochs = 30
    c.final.learning_rate = 0.01
    c.final.max_models = 8
    return c
