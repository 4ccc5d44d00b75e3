"""PyTorch's accuracy with qevo's float recipe: is a ResNet-20 result qevo's or the recipe's?

``python -m benchmarks.torch_recipe --epochs 28 [--config configs/resnet20.py] [--bf16]
[--cutout 16] [--out FILE]`` trains the ResNet-20 of ``benchmarks.torch_baseline`` on the
split qevo trains on (``qevo.data.datasets.load_dataset``: CIFAR-10 from ``QEVO_DATA_DIR``, the
config's validation images held out for its seed) with the float recipe read from the
config's ``train`` section: SGD with momentum (Nesterov if set), its learning rate reached
by a linear warm-up then cosine to 0 (per step), weight decay on convolution and dense
kernels only (``weight_decay_on="kernels"``) or on everything, label smoothing, batch size,
and a random 4-pixel-padded crop and horizontal flip per image. ``--epochs`` replaces the
config's epochs. ``--bf16`` runs the training step under
``torch.autocast("cpu", torch.bfloat16)``. It prints JSON with each epoch's loss,
validation accuracy and seconds, the final test accuracy and the environment; beside them
the same for an exponential moving average of the weights and BatchNorm statistics
(``--ema``), and test accuracy with test-time flip augmentation, so that these two can be
judged without building them first. ``--cutout 16`` adds Cutout to the augmentation, a
recipe change to judge the same way. torch is a benchmark extra
(``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.torch_baseline import ResNet20
from qevo import config as config_lib
from qevo.data.datasets import load_dataset


def _tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> normalized float ``[N, C, H, W]`` in channels_last memory."""
    x = torch.from_numpy(images).float().div_(255).sub_(torch.tensor(mean)).div_(torch.tensor(std))
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _augment(x: torch.Tensor, pad: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop of the batch padded by 4 pixels of ``pad [C]`` (a black pixel, normalized)
    and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = pad.view(1, -1, 1, 1).expand(n, -1, h + 8, w + 8).clone()
    padded[:, :, 4:4 + h, 4:4 + w] = x
    offsets = torch.randint(0, 9, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    out[flips] = out[flips].flip(3)
    return out.contiguous(memory_format=torch.channels_last)


def _cutout(x: torch.Tensor, size: int, fill: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``x [N, C, H, W]`` with a ``size`` x ``size`` square around a uniform random
    centre (cut at the borders) set to ``fill [C]`` (DeVries and Taylor 2017)."""
    n, _, h, w = x.shape
    cy, cx = torch.randint(0, h, (n, 1), generator=gen), torch.randint(0, w, (n, 1), generator=gen)
    rows, cols = torch.arange(h).view(1, h), torch.arange(w).view(1, w)
    inside_y = (rows >= cy - size // 2) & (rows < cy - size // 2 + size)
    inside_x = (cols >= cx - size // 2) & (cols < cx - size // 2 + size)
    mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    return torch.where(mask, fill.view(1, -1, 1, 1), x).contiguous(memory_format=torch.channels_last)


def _accuracy(model, x: torch.Tensor, y: torch.Tensor, flip: bool = False) -> float:
    """Top-1 accuracy of ``model`` in eval mode; with ``flip`` the softmax is averaged with that
    of the mirrored images (test-time flip augmentation)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            xb = x[i:i + 1000]
            p = model(xb).softmax(1)
            if flip:
                p = p + model(xb.flip(3)).softmax(1)
            correct += (p.argmax(1) == y[i:i + 1000]).sum().item()
    model.train()
    return correct / len(x)


def train(cfg, bf16: bool, ema: float, cutout: int = 0) -> dict:
    """Train per ``cfg`` (a qevo config of ResNet-20 on CIFAR-10, SGD with a cosine schedule)."""
    t = cfg.train
    ds = load_dataset("cifar10", cfg.data.data_dir or os.environ.get("QEVO_DATA_DIR"), val_size=cfg.data.val_size,
                      seed=cfg.seed)
    black = -torch.tensor(ds.mean) / torch.tensor(ds.std)
    xtr, ytr = _tensor(ds.train_images, ds.mean, ds.std), torch.from_numpy(ds.train_labels).long()
    xva, yva = _tensor(ds.val_images, ds.mean, ds.std), torch.from_numpy(ds.val_labels).long()
    xte, yte = _tensor(ds.test_images, ds.mean, ds.std), torch.from_numpy(ds.test_labels).long()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ResNet20().to(memory_format=torch.channels_last)
    averaged = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema), use_buffers=True)
    kernels_only = t.weight_decay_on == "kernels"
    decay = [p for p in model.parameters() if p.dim() >= 2 or not kernels_only]
    rest = [p for p in model.parameters() if p.dim() < 2 and kernels_only]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=t.learning_rate, momentum=t.momentum, nesterov=t.nesterov)
    batch = t.batch_size
    steps = len(xtr) // batch
    total, warm = t.epochs * steps, t.warmup_epochs * steps

    def lr_at(step: int) -> float:
        if step < warm:
            return t.learning_rate * step / warm
        return t.learning_rate * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    history, step, start = [], 0, time.perf_counter()
    for epoch in range(1, t.epochs + 1):
        order = torch.randperm(len(xtr), generator=gen)[: steps * batch].view(steps, batch)
        losses = []
        for idx in order:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            x = _augment(xtr[idx], black, gen)
            if cutout:
                x = _cutout(x, cutout, black, gen)
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=t.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            averaged.update_parameters(model)
            losses.append(loss.item())
            step += 1
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_accuracy": _accuracy(model, xva, yva),
                        "ema_val_accuracy": _accuracy(averaged, xva, yva),
                        "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(history[-1]), flush=True)
    return {"epochs": t.epochs, "bf16": bf16, "cutout": cutout, "seed": cfg.seed, "batch": batch,
            "train": t.to_dict(), "threads": torch.get_num_threads(), "torch": torch.__version__, "ema_decay": ema,
            "history": history, "test_accuracy": _accuracy(model, xte, yte),
            "test_accuracy_flip": _accuracy(model, xte, yte, flip=True),
            "ema_test_accuracy": _accuracy(averaged, xte, yte),
            "ema_test_accuracy_flip": _accuracy(averaged, xte, yte, flip=True),
            "train_seconds": history[-1]["seconds"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/resnet20.py", help="the qevo config whose float recipe to run")
    parser.add_argument("--epochs", type=int, default=28)
    parser.add_argument("--bf16", action="store_true", help="train under torch.autocast bfloat16")
    parser.add_argument("--ema", type=float, default=0.999,
                        help="decay per step of the exponential moving average of the weights also scored")
    parser.add_argument("--cutout", type=int, default=0,
                        help="also black out a square of this side per training image "
                             "(0: off; 16 in DeVries and Taylor)")
    parser.add_argument("--out", type=pathlib.Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    cfg = config_lib.load(args.config, [f"train.epochs={args.epochs}"])
    recipe = (cfg.model.name, cfg.data.name, cfg.train.optimizer, cfg.train.schedule)
    if recipe != ("resnet20", "cifar10", "sgd", "cosine"):
        parser.error(f"{args.config} is not a ResNet-20 CIFAR-10 recipe of SGD with a cosine schedule")
    torch.set_num_threads(os.cpu_count())
    report = {**common.environment(), **train(cfg, args.bf16, args.ema, args.cutout)}
    if args.out:
        return common.write(report, args.out)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
