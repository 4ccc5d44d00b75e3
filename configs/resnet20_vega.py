"""ResNet-20 on CIFAR-10 under the QuantEA reference's own protocol, for a side-by-side run.

16 individuals, 50 generations, 32 initial random samples, weight and activation
candidates {4, 8}, DoReFa quantizers, objectives error and the reference's "flops" and
"params"; every candidate trained one epoch from scratch (SGD 0.1, momentum 0.9, weight
decay 1e-4, 45k training images, 351 steps of 128) and validated on the 5k held out;
front models trained 400 epochs from scratch. A GPU run:
``python -m qevo.search --config configs/resnet20_vega.py``.
"""

from qevo.search.config import defaults

SIZED_FOR = "accelerator"  # on a CPU, every command says so at start (qevo.config.sized_for)


def get_config():
    c = defaults()
    c.data.name = "cifar10"
    c.data.val_size = 5000
    c.model.name = "resnet20"
    c.quant.mode = "dorefa"
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.1
    c.train.momentum = 0.9
    c.train.weight_decay = 1e-4
    c.train.augment = True
    c.population_size = 16
    c.generations = 50
    c.search.initial_samples = 32
    c.search.w_candidates = (4, 8)
    c.search.a_candidates = (4, 8)
    c.search.objectives = ("error", "flops", "params")
    c.search.start = "scratch"
    c.search.qat_steps = 45000 // 128
    c.search.qat_batch_size = 128
    c.search.qat_learning_rate = 0.1
    c.search.qat_momentum = 0.9
    c.search.qat_weight_decay = 1e-4
    c.final.start = "scratch"
    c.final.epochs = 400
    c.final.optimizer = "sgd"
    c.final.learning_rate = 0.1
    c.final.max_models = 16
    return c
