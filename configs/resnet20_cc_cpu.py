"""ResNet-20 cooperative coevolution at a 2-core CPU budget, from the float model of
``configs/resnet20_cpu.py`` (the same recipe and quantizer as ``configs/resnet20_cc.py``)::

    python -m qevo.coevolve --config configs/resnet20_cc_cpu.py --workdir runs/resnet20_cpu_cc_w4 \\
      --config.float_from=runs/resnet20_cpu_float
    python -m qevo.coevolve --config configs/resnet20_cc_cpu.py --workdir runs/resnet20_cpu_cc_w2 \\
      --config.float_from=runs/resnet20_cpu_float --config.coevolve.w_bits=2

Each cycle: 64 groups of 256 weights, 8 networks each (the context and 7 samples) on
128-image mini-batches; the BatchNorm statistics re-estimated on 1,024 images after each
cycle; then QAT on as many training images as the coevolution drew.
"""

import pathlib

from qevo.config import load, take_sections


def get_config():
    here = pathlib.Path(__file__).parent
    c = take_sections(load(here / "resnet20_cc.py"), here / "resnet20_cpu.py", ("data", "model", "train", "quant"))
    c.coevolve.group_size = 256
    c.coevolve.num_groups = 64
    c.coevolve.population_size = 8
    c.coevolve.batch_size = 128
    c.coevolve.cycles = 32
    c.coevolve.eval_images = 2000
    return c
