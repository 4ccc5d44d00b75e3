"""MobileNetV2 on Imagenette (224 px), weight-sharing compression (``python -m qevo.sharing``).

Needs an accelerator: the float model trains here first (SGD, 40 epochs) unless
``--config.float_from`` names a trained ``python -m qevo.train`` run; each evaluation is a
forward pass over the 1,000-image validation split.  53 shared layers (every conv and the
classifier), 2.2 M weights; the cluster table is built in several batched calls.
"""

from qevo.sharing.config import defaults

SIZED_FOR = "accelerator"  # on a CPU, every command says so at start (qevo.config.sized_for)
CPU_CONFIG = "mobilenetv2_sharing_cpu.py"


def get_config():
    c = defaults()
    c.data.name = "imagenette"
    c.data.val_size = 1000
    c.model.name = "mobilenetv2"
    c.train.epochs = 40
    c.train.batch_size = 64
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.05
    c.train.momentum = 0.9
    c.train.weight_decay = 4e-5
    c.train.warmup_epochs = 2
    c.train.augment = True
    c.train.eval_batch_size = 250
    c.population_size = 32
    c.generations = 30
    c.sharing.driver = "simple_ga"
    c.sharing.k_max = 64
    c.sharing.range_max_loss = 1.0
    c.sharing.max_accuracy_loss = 2.5
    c.sharing.cr_target = 5.0
    return c
