"""Your own loss and metric: a multi-label head on MNIST, trained in float and searched for
bit widths with binary cross-entropy and a per-example score of its own.

    python docs/examples/custom_loss.py --data ../shared/data [--tiny] [--workdir runs/custom_loss]

Each image gets three yes/no labels from its digit: even, above 4, has a loop (0, 6, 8, 9).
The network ends in three logits, one per label (above 0 means yes); the loss is the mean
sigmoid binary cross-entropy and the metric the fraction of an image's three labels it gets
right. qevo trains with the loss (the float training, every candidate's QAT in the search,
the final training of the front) and scores with the metric: each accuracy it reports is
the metric's mean over a split, and the search's error objective is one minus it. qevo calls
both inside compiled programs, so they are written in jax.numpy, with no Python branching
on the arrays' values. The labels are float32 ``[N, 3]``, not class indices: the dataset is
made with ``labels="any"``.
"""

import csv
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import mnist_arrays
import numpy as np
import optax

import qevo


class MultiLabelCNN(nn.Module):
    """A network qevo does not ship: two strided convolutions and a head of one logit per label."""

    labels: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))                            # 28x28x1 -> 14x14x8
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))                           # -> 7x7x16
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.labels)(x)


def attributes(digits: np.ndarray) -> np.ndarray:
    """float32 ``[N, 3]`` labels of int digits ``[N]``: even, above 4, has a loop."""
    return np.stack([digits % 2 == 0, digits > 4, np.isin(digits, (0, 6, 8, 9))], axis=1).astype(np.float32)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The loss: mean sigmoid cross-entropy of ``logits [N, 3]`` against 0/1 ``labels [N, 3]``; float32 ``[]``."""
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


def labels_right(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The metric: float32 ``[N]``, the fraction of each example's labels that its logits get right."""
    return jnp.mean((logits > 0) == (labels > 0.5), axis=-1)


def main():
    args = mnist_arrays.arguments(__doc__.splitlines()[0], "runs/custom_loss")

    (x_train, digits_train), (x_test, digits_test) = mnist_arrays.splits(args.data, args.tiny)
    data = qevo.Dataset.from_arrays(train=(x_train, attributes(digits_train)), test=(x_test, attributes(digits_test)),
                                    val_size=len(x_train) // 10, labels="any")
    guess = np.maximum(data.test_labels.mean(0), 1 - data.test_labels.mean(0)).mean()

    cfg = qevo.search_defaults()
    cfg.train.epochs, cfg.train.optimizer, cfg.train.learning_rate = 4, "adam", 2e-3
    cfg.search.qat_optimizer, cfg.search.qat_learning_rate = "adam", 1e-3
    cfg.final.optimizer, cfg.final.learning_rate = "adam", 1e-3
    if args.tiny:
        cfg.train.epochs, cfg.train.warmup_epochs = 2, 0
        cfg.population_size, cfg.generations, cfg.search.initial_samples = 4, 1, 4
        cfg.search.qat_steps, cfg.final.max_models = 5, 2

    model = qevo.quantize_model(MultiLabelCNN(), qevo.normalize(data.train_images[:64], data.mean, data.std))
    float_run = f"{args.workdir}/float"
    trained = qevo.run_train(cfg, float_run, model=model, data=data, loss=binary_cross_entropy, metric=labels_right)
    print(f"float     {trained['test_accuracy']:.4f} of the labels right on the test split "
          f"(the best constant guess: {guess:.4f})")
    template = qevo.init_variables(model, jax.random.key(0), data.train_images.shape[1:])
    variables, _ = qevo.load_checkpoint(f"{float_run}/model.msgpack", template)

    search_run = pathlib.Path(args.workdir) / "search"
    results = qevo.run_search(cfg, search_run, model=model, variables=variables, data=data,
                              loss=binary_cross_entropy, metric=labels_right)
    with (search_run / "pareto.csv").open() as f:
        for row in csv.DictReader(f):
            print(f"front     error {1 - float(row['val_accuracy']):.4f} (validation)  "
                  f"{float(row['bitops']) / 1e6:8.2f} M BitOps  w {row['w_bits']}  a {row['a_bits']}")
    for row in results["final"]:
        print(f"{row['name']:9s} {row['test_accuracy']:.4f} of the labels right on the test split  "
              f"{row['bitops'] / 1e6:8.2f} M BitOps")


if __name__ == "__main__":
    main()
