"""MobileNetV2 on Imagenette at a 2-core CPU budget: ``configs/mobilenetv2_sharing.py`` cut down.

Every figure of this protocol is at 96x96 px: the loader resizes the stored 224 px images
(``data.image_size``); 96 px trains about twice as fast as 128 px here (98 against 51
images/s for a training step at batch 64).

* ``python -m qevo.train --config configs/mobilenetv2_sharing_cpu.py --workdir runs/mobilenetv2_cpu_float``:
  SGD with Nesterov momentum 0.9, learning rate 0.05, weight decay 4e-5 on the kernels
  only, label smoothing 0.1, 2 warm-up epochs then cosine, batch 64, crop+flip, 40 epochs
  (about 72 minutes here).
* ``python -m qevo.sharing --config configs/mobilenetv2_sharing_cpu.py --workdir runs/mobilenetv2_cpu_sharing
  --config.float_from=runs/mobilenetv2_cpu_float``: weight sharing of all 53 kernels (every
  convolution, depthwise and 1x1 included, and the classifier; BatchNorm is not folded and
  stays float32, as does the classifier's bias), every network scored on the first 500 of
  the 1,000 validation images.  Candidate k = 8, 16, 32, 64 (whole key widths of 3 to 6
  bits); a layer keeps the k that alone cost it at most 0.4 points (with 2, 4, ..., 64 and
  1 point, no network of 24 x 6 NSGA-III evaluations came within 1.5 points of float: the
  small losses of 53 layers add up).  NSGA-III on (accuracy, size-weighted CR), 24
  individuals x 12 generations.  The pick is made on the other 500 validation images, which
  the search never scores on: of the non-dominated networks within 1.5 points of float on the
  scoring images, the highest CR within 1.5 points of float on the held-out images (else the
  most accurate there).  Then the focus refinement on a grid of 6 focus values (0, 1, ...,
  5), kept only if it does not lower held-out accuracy.  Final figures on the whole
  validation and test splits.
"""

import pathlib

from qevo import config as config_lib


def get_config():
    c = config_lib.load(pathlib.Path(__file__).with_name("mobilenetv2_sharing.py"))
    c.data.image_size = 96
    c.train.epochs = 40
    c.train.nesterov = True
    c.train.weight_decay_on = "kernels"
    c.train.label_smoothing = 0.1
    c.population_size = 24
    c.generations = 12
    c.sharing.driver = "nsga3"
    c.sharing.k_values = (8, 16, 32, 64)
    c.sharing.range_max_loss = 0.4
    c.sharing.eval_images = 500
    c.sharing.max_accuracy_loss = 1.5
    c.sharing.focus_max = 5.0
    c.sharing.focus_step = 1.0
    return c
