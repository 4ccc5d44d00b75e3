"""A search objective of your own: latency from a per-layer lookup table, beside error and BitOps.

    QEVO_DATA_DIR=../shared/data python docs/examples/latency_objective.py [--tiny] [--workdir runs/latency]

The table says how many nanoseconds one multiply-accumulate takes at each (weight,
activation) width on some target (here made up: integer units for 8 and 4 bits, a
bit-serial unit below); the objective sums it over the layers. qevo minimises it beside
the error and BitOps, and writes it into history.jsonl, pareto.csv and final.csv.
"""

import argparse

import numpy as np

import qevo

# nanoseconds per MAC by (weight bits, activation bits); 32 is the float unit
NS_PER_MAC = {32: 1.0, 8: 0.25, 4: 0.2, 2: 0.15}


def latency_ms(w_bits, a_bits, table):
    """Milliseconds per image of a population: ``w_bits``, ``a_bits`` int ``[P, L]``."""
    per_mac = np.vectorize(lambda w, a: max(NS_PER_MAC[w], NS_PER_MAC[a]))(w_bits, a_bits)
    return (per_mac * table.macs).sum(axis=1) * 1e-6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/latency")
    parser.add_argument("--tiny", action="store_true", help="a budget of seconds, for the test suite")
    args = parser.parse_args()

    cfg = qevo.search_defaults()  # LeNet-5 on MNIST; any model= of yours works the same way
    cfg.search.objectives = ("error", "bitops")
    cfg.search.w_candidates = cfg.search.a_candidates = (2, 4, 8)
    if args.tiny:
        cfg.data.max_train_images, cfg.data.val_size, cfg.data.max_test_images = 3000, 500, 1000
        cfg.train.epochs, cfg.train.warmup_epochs = 1, 0
        cfg.population_size, cfg.generations, cfg.search.initial_samples = 4, 1, 4
        cfg.search.qat_steps, cfg.final.max_models = 5, 2
    results = qevo.run_search(cfg, args.workdir, objectives={"latency_ms": latency_ms})
    for row in results["final"]:
        print(f"{row['name']:9s} {100 * row['test_accuracy']:6.2f}%  {row['bitops'] / 1e6:8.2f} M BitOps")


if __name__ == "__main__":
    main()
