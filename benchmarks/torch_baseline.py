"""PyTorch's training and forward throughput on the CPU, the baseline of ``benchmarks.train_speed``.

``python -m benchmarks.torch_baseline --model resnet20 [--repeats 5] [--steps 10] [--no-compile]``
prints one JSON object: images/s of

* ``float``: a training step (SGD with Nesterov momentum and weight decay, BatchNorm in
  training mode, cross-entropy) on a fixed random batch;
* ``float_bf16``: the same step under ``torch.autocast("cpu", torch.bfloat16)``
  (convolutions and matrix products in bfloat16 on oneDNN's AMX/AVX512-BF16 kernels where
  the CPU has them), qevo's ``model.precision="bfloat16"``;
* ``qat_w4a4``: the float step with fake quantization at 4 bits on every layer but the
  first convolution and the classifier, as qevo's QAT runs it (weights symmetric with
  per-output-channel absmax scales, inputs clipped to a fixed range, straight-through
  gradients);
* ``forward``: inference on ``--forward-images`` images;

each in NCHW, channels_last and (unless ``--no-compile``) ``torch.compile`` of the
channels_last model, and the best of the three. Runs with ``torch.set_num_threads`` =
all cores. The models are the ones qevo trains: the CIFAR ResNet-20 with 1x1 projection
shortcuts, LeNet-5 and torchvision's MobileNetV2. torch and torchvision are benchmark
extras (``pip install -e ".[bench]"``), never imported by qevo.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from benchmarks import common

BITS = 4
ACT_CLIP = 4.0  # fixed activation clip range of the fake-quantized baseline


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel absmax quantization with a straight-through gradient."""
    n = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-8) / n
    return w + (torch.round(w / scale) * scale - w).detach()


def fake_quant_input(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed inputs clipped to ``[-ACT_CLIP, ACT_CLIP]`` on ``2^(b-1)-1`` levels each side, STE."""
    step = ACT_CLIP / (2 ** (bits - 1) - 1)
    xc = x.clamp(-ACT_CLIP, ACT_CLIP)
    return xc + (torch.round(xc / step) * step - xc).detach()


class QConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(fake_quant_input(x, BITS), fake_quant_weight(self.weight, BITS), self.bias)


class QLinear(nn.Linear):
    def forward(self, x):
        return F.linear(fake_quant_input(x, BITS), fake_quant_weight(self.weight, BITS), self.bias)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, features in enumerate((16, 32, 64)):
            for b in range(3):
                blocks.append(BasicBlock(cin, features, 2 if stage > 0 and b == 0 else 1))
                cin = features
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


# model: (constructor, input [C, H, W], training batch)
MODELS = {
    "resnet20": (ResNet20, (3, 32, 32), 128),
    "mobilenetv2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 128, 128), 64),
    "lenet5": (LeNet5, (1, 28, 28), 128),
}


def quantized(model: nn.Module) -> nn.Module:
    """``model`` with every convolution and dense layer but the first and last fake-quantized."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers[1:-1]:
        m.__class__ = QConv2d if isinstance(m, nn.Conv2d) else QLinear
    return model


def measure(name: str, repeats: int, steps: int, forward_images: int, compile_: bool) -> dict:
    build, shape, batch = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    xf = torch.randn(forward_images, *shape)
    layouts = ["nchw", "channels_last"] + ["compile"] * compile_
    result = {}
    for mode in ("float", "float_bf16", "qat_w4a4", "forward"):
        figures = {}
        for layout in layouts:
            model = build()
            if mode == "qat_w4a4":
                model = quantized(model)
            fmt = torch.contiguous_format if layout == "nchw" else torch.channels_last
            model = model.to(memory_format=fmt)
            inputs, images = x.contiguous(memory_format=fmt), xf.contiguous(memory_format=fmt)
            run = torch.compile(model) if layout == "compile" else model
            if mode == "forward":
                model.eval()

                def call(run=run, images=images):
                    with torch.no_grad():
                        run(images)
                seconds = common.median_seconds(call, repeats)
                figures[layout] = forward_images / seconds
                continue
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

            def train(opt=opt, run=run, inputs=inputs, bf16=mode == "float_bf16"):
                for _ in range(steps):
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                        loss = F.cross_entropy(run(inputs), y)
                    loss.backward()
                    opt.step()
            figures[layout] = steps * batch / common.median_seconds(train, repeats)
        best = max(figures, key=figures.get)
        result[mode] = {"images_per_second": figures, "best": best, "best_images_per_second": figures[best]}
    return {"model": name, "batch": batch, "input_chw": list(shape), "forward_images": forward_images,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            **result}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed call")
    parser.add_argument("--forward-images", type=int, default=1000)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    report = measure(args.model, args.repeats, args.steps, args.forward_images, not args.no_compile)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
