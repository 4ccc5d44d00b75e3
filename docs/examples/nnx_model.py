"""Your own Flax NNX network through qevo's bit-width search.

    python docs/examples/nnx_model.py --data ../shared/data [--tiny] [--workdir runs/own_nnx]

NNX modules are called as ``model(x)``; qevo quantizes a clone of the network (its
``nnx.Conv`` and ``nnx.Linear`` layers) and leaves the one you built untouched.
"""


import mnist_arrays
from flax import nnx

import qevo


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.head = nnx.Linear(16 * 14 * 14, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.norm(self.conv2(x)))
        return self.head(x.reshape(x.shape[0], -1))


def main():
    args = mnist_arrays.arguments(__doc__.splitlines()[0], "runs/own_nnx")

    train, test = mnist_arrays.splits(args.data, args.tiny)
    data = qevo.Dataset.from_arrays(train=train, test=test, val_size=len(train[0]) // 10)

    cfg = qevo.search_defaults()
    cfg.train.epochs, cfg.train.optimizer, cfg.train.learning_rate = 4, "adam", 2e-3
    cfg.search.qat_optimizer, cfg.search.qat_learning_rate = "adam", 1e-3
    cfg.final.optimizer, cfg.final.learning_rate = "adam", 1e-3
    cfg.quant.float_layers = ""  # three layers: search all of them
    if args.tiny:
        cfg.train.epochs, cfg.train.warmup_epochs = 1, 0
        cfg.population_size, cfg.generations, cfg.search.initial_samples = 4, 1, 4
        cfg.search.qat_steps, cfg.final.max_models = 5, 2

    results = qevo.run_search(cfg, args.workdir, model=NNXNet(nnx.Rngs(0)), data=data)
    for row in results["final"]:
        print(f"{row['name']:9s} {100 * row['test_accuracy']:6.2f}%  {row['bitops'] / 1e6:9.2f} M BitOps")


if __name__ == "__main__":
    main()
