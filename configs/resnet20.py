"""ResNet-20 on CIFAR-10 (JPEG copy): the GPU budget. ``configs/resnet20_cpu.py`` is the
same protocol cut to a 2-core CPU.

* ``python -m qevo.train --config configs/resnet20.py``: the float recipe (SGD 0.1 with
  Nesterov momentum 0.9, weight decay 5e-4 on the convolution and dense kernels only,
  label smoothing 0.1, 2 warm-up epochs then cosine, batch 128, crop+flip), 100 epochs:
  on the JPEG copy the test accuracy levels off well before (52 epochs: 87.27%; the same
  recipe in PyTorch, 96 epochs: 87.18%), so expect about 87-88%.
* ``python -m qevo.search --config configs/resnet20.py``: bit-width search over weights
  {1, 2, 4, 8} and activations {2, 4, 8} for the 18 inner layers (MSE-clipped weight
  scales), 32 individuals x 30 generations with 100 QAT steps each, then 15 QAT epochs for
  up to 8 front models and the 3 uniform baselines. The objectives are error and BitOps, the costs
  the baselines are judged by (size and the reference "flops"/"params" are reported
  beside them); the first population holds, beside the baselines w8a8, w4a4 and w2a2, the
  uniform w1a2, w1a4 and w2a4, so that the front starts below w2a2 and between w2a2 and
  w4a4.
"""

from qevo.search.config import defaults

SIZED_FOR = "accelerator"  # on a CPU, every command says so at start (qevo.config.sized_for)
CPU_CONFIG = "resnet20_cpu.py"


def get_config():
    c = defaults()
    c.data.name = "cifar10"
    c.model.name = "resnet20"
    c.train.epochs = 100
    c.train.batch_size = 128
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.1
    c.train.momentum = 0.9
    c.train.nesterov = True
    c.train.weight_decay = 5e-4
    c.train.weight_decay_on = "kernels"
    c.train.label_smoothing = 0.1
    c.train.warmup_epochs = 2
    c.train.augment = True
    c.quant.mode = "mse"
    c.search.w_candidates = (1, 2, 4, 8)
    c.search.objectives = ("error", "bitops")
    c.search.uniform_seeds = ((8, 8), (4, 4), (2, 2), (1, 2), (1, 4), (2, 4))
    c.population_size = 32
    c.generations = 30
    c.search.qat_steps = 100
    c.search.qat_learning_rate = 0.01
    c.search.qat_weight_decay = 5e-4
    c.final.epochs = 15
    c.final.learning_rate = 0.01
    c.final.max_models = 8
    return c
