"""MNIST read with numpy, the stand-in for a user's own arrays in these examples, and the
command line the examples share (``--data``, ``--workdir``, ``--tiny``)."""

import argparse
import gzip
import pathlib

import numpy as np


def idx(path: pathlib.Path) -> np.ndarray:
    """An MNIST idx file as a numpy array."""
    with gzip.open(path) as f:
        raw = f.read()
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def arguments(description: str, workdir: str) -> argparse.Namespace:
    """``--data`` (the folder holding ``mnist/*.gz``), ``--workdir`` (default ``workdir``) and
    ``--tiny`` (a budget of seconds, for the test suite)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=pathlib.Path, required=True, help="folder holding mnist/*.gz")
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--tiny", action="store_true", help="a budget of seconds, for the test suite")
    return parser.parse_args()


def splits(data: pathlib.Path, tiny: bool) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train images, train digits), (test images, test digits))``: uint8 ``[N, 28, 28, 1]``
    and uint8 ``[N]``; the first 3,000 and 1,000 with ``tiny``, else all 60,000 and 10,000."""
    n_train, n_test = (3000, 1000) if tiny else (60000, 10000)
    mnist = data / "mnist"
    return ((idx(mnist / "train-images-idx3-ubyte.gz")[:n_train, :, :, None],
             idx(mnist / "train-labels-idx1-ubyte.gz")[:n_train]),
            (idx(mnist / "t10k-images-idx3-ubyte.gz")[:n_test, :, :, None],
             idx(mnist / "t10k-labels-idx1-ubyte.gz")[:n_test]))
