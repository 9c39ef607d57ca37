"""The model zoo and the one place a model name is turned into a module.

A model spec is either a zoo name (``resnet8``) or ``pkg.module:factory``. Every factory
takes ``(num_classes, in_channels)`` and returns a fresh float ``nn.Module``; weights are
loaded separately (never by unpickling a module).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from calib.datasets import resolve_factory
from compress.errors import UserError


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual add; ReLUs are separate modules so quantizers and
    pruners see each one (brevitas graph mode gives each its own output quantizer)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet for small images: 3x3 stem, no max-pool, stride-2 stage starts."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], num_classes: int = 10,
                 in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def resnet_teacher(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """~1.2M params: the Fashion-MNIST demo teacher (small enough to ship, < 5 MB)."""
    return ResNet((48, 96, 160), (2, 2, 2), num_classes, in_channels)


def resnet8(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """~78k params: the demo student, one block per stage."""
    return ResNet((16, 32, 64), (1, 1, 1), num_classes, in_channels)


def resnet8_wide(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """~310k params: ResNet-8 at twice the width (a second, different teacher for ensembles)."""
    return ResNet((32, 64, 128), (1, 1, 1), num_classes, in_channels)


def resnet_tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A few thousand params with residual adds: for tests and smoke runs."""
    return ResNet((8, 16), (1, 1), num_classes, in_channels)


def resnet_tiny_teacher(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return ResNet((16, 32), (1, 1), num_classes, in_channels)


from compress.nets.mobilenet import mobilenet_small, mobilenet_tiny  # noqa: E402
from compress.nets.vit import vit_small, vit_tiny  # noqa: E402

ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet_teacher": resnet_teacher,
    "resnet8": resnet8,
    "resnet8_wide": resnet8_wide,
    "resnet_tiny": resnet_tiny,
    "resnet_tiny_teacher": resnet_tiny_teacher,
    "mobilenet_small": mobilenet_small,
    "mobilenet_tiny": mobilenet_tiny,
    "vit_small": vit_small,
    "vit_tiny": vit_tiny,
}


def check_model_spec(spec: str) -> str:
    """Validate a model name without building it (used at config validation)."""
    if spec in ZOO:
        return spec
    if ":" not in spec:
        raise UserError(f"unknown model {spec!r}: expected one of {sorted(ZOO)} "
                         f"or 'pkg.module:factory'")
    resolve_factory(spec, "model")
    return spec


def build_model(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    factory = ZOO.get(spec) or resolve_factory(check_model_spec(spec), "model")
    model = factory(num_classes=num_classes, in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {spec!r}: factory returned {type(model).__name__}, "
                         f"expected a torch.nn.Module")
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
