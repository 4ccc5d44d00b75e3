"""Your own Flax Linen network and your own arrays through qevo's float training, bit-width
search, weight sharing, integer coevolution and ONNX export.

    python docs/examples/own_linen_model.py --data ../shared/data [--tiny] [--workdir runs/own_linen]

The network below is plain Flax: qevo finds its convolutions and dense layers by tracing
it and quantizes them from outside with per-layer bit widths. qevo trains it once in float;
the search, the weight sharing and the coevolution all start from those variables (the
coevolution at the widths of the search's w4a4 model). The search's w4a4 model is then
exported to ONNX and scored in onnxruntime. The arrays are MNIST read with numpy,
standing in for any data of yours.

The command line exports the runs of this script too, given a function that returns the
network and data they were made with (here :func:`export_inputs`):

    QEVO_DATA_DIR=../shared/data python -m qevo.export --workdir runs/own_linen/search \
        --model front_00 --out front_00.onnx --verify --inputs docs/examples/own_linen_model.py:export_inputs
"""

import os
import pathlib

import flax.linen as nn
import jax
import mnist_arrays

import qevo


class SmallCNN(nn.Module):
    """A network qevo does not ship: a depthwise-separable block and a two-layer head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.Conv(16, (3, 3), strides=2, feature_group_count=16)(x)          # depthwise
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.relu(nn.Conv(32, (1, 1))(x))                                      # pointwise
        x = nn.max_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def own_data(data_dir: pathlib.Path, tiny: bool) -> qevo.Dataset:
    """The arrays, as a qevo Dataset with a tenth of train held out for validation."""
    train, test = mnist_arrays.splits(data_dir, tiny)
    return qevo.Dataset.from_arrays(train=train, test=test, val_size=len(train[0]) // 10)


def export_inputs() -> dict:
    """``--inputs`` of ``python -m qevo.export``: the network and data of this script's runs,
    the data from ``$QEVO_DATA_DIR`` (``QEVO_EXAMPLE_TINY=1`` for a run made with ``--tiny``)."""
    return {"model": SmallCNN(),
            "data": own_data(pathlib.Path(os.environ["QEVO_DATA_DIR"]), os.environ.get("QEVO_EXAMPLE_TINY") == "1")}


def main():
    args = mnist_arrays.arguments(__doc__.splitlines()[0], "runs/own_linen")
    data = own_data(args.data, args.tiny)

    cfg = qevo.search_defaults()
    cfg.train.epochs, cfg.train.optimizer, cfg.train.learning_rate = 4, "adam", 2e-3
    cfg.search.qat_optimizer, cfg.search.qat_learning_rate = "adam", 1e-3
    cfg.final.optimizer, cfg.final.learning_rate = "adam", 1e-3
    sharing = qevo.sharing_defaults()
    sharing.sharing.report_formats = ("int8",)
    integer = qevo.coevolve_defaults()
    integer.bits_from, integer.bits_model = f"{args.workdir}/search", "w4a4"
    if args.tiny:
        cfg.train.epochs, cfg.train.warmup_epochs = 1, 0
        cfg.population_size, cfg.generations, cfg.search.initial_samples = 4, 1, 4
        cfg.search.qat_steps, cfg.final.max_models = 5, 2
        sharing.population_size, sharing.generations, sharing.sharing.refine = 4, 1, False
        sharing.sharing.k_max, sharing.sharing.k_values, sharing.sharing.eval_images = 8, (2, 4, 8), 100
        integer.coevolve.cycles, integer.coevolve.num_groups, integer.coevolve.group_size = 1, 2, 64
        integer.coevolve.population_size, integer.coevolve.eval_images, integer.coevolve.qat = 4, 300, False

    model = qevo.quantize_model(SmallCNN(), qevo.normalize(data.train_images[:64], data.mean, data.std))
    for layer in model.layers:
        print(f"{layer.path:8s} {layer.kind:5s} kernel {layer.kernel_shape}  {layer.macs:>9,} MACs")

    float_run = f"{args.workdir}/float"
    qevo.run_train(cfg, float_run, model=model, data=data)
    template = qevo.init_variables(model, jax.random.key(0), data.train_images.shape[1:])
    variables, _ = qevo.load_checkpoint(f"{float_run}/model.msgpack", template)

    results = qevo.run_search(cfg, f"{args.workdir}/search", model=model, variables=variables, data=data)
    for row in results["final"]:
        print(f"{row['name']:9s} {100 * row['test_accuracy']:6.2f}%  {row['bitops'] / 1e6:9.2f} M BitOps")
    shared = qevo.run_sharing(sharing, f"{args.workdir}/sharing", model=model, variables=variables, data=data)
    int8 = shared["formats"]["int8"]
    print(f"shared   {100 * int8['test_accuracy']:6.2f}%  {int8['cr_weighted']:.1f}x smaller, k {shared['k']}")
    coevolved = qevo.run_coevolve(integer, f"{args.workdir}/coevolve", model=model, variables=variables, data=data)
    for kind in ("round_to_nearest", "coevolution"):
        print(f"{kind:16s} {100 * coevolved[kind]['test_accuracy']:6.2f}%  (integer w4a4)")
    record = qevo.export_onnx(f"{args.workdir}/search", "w4a4", f"{args.workdir}/w4a4.onnx", check=True,
                              model=model, data=data)
    check = record["verification"]
    print(f"onnx w4a4 {100 * check['onnxruntime_test_accuracy']:6.2f}% in onnxruntime, "
          f"{100 * record['test_accuracy']:6.2f}% in final.csv, {100 * check['prediction_agreement']:.2f}% "
          "of predictions agree")

if __name__ == "__main__":
    main()
