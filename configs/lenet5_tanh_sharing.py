"""LeNet-5 with tanh activations on MNIST, weight-sharing compression (the seed's second network)."""

import pathlib
import runpy


def get_config():
    c = runpy.run_path(str(pathlib.Path(__file__).with_name("lenet5_sharing.py")))["get_config"]()
    c.model.activation = "tanh"
    return c
