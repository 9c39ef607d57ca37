"""The model zoo and the one place a model name is turned into a module.

A model spec is a zoo name (``resnet8``), ``torchvision:<name>``, ``timm:<name>`` or
``pkg.module:factory``, with optional kwargs (compress/model_spec.py: the factory's signature
decides which of num_classes / in_channels it gets; stem and head are adapted to the data).
Weights are loaded separately (never by unpickling a module).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn


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
from compress.nets.tasks import regressor_small, regressor_tiny, segnet_small, segnet_tiny  # noqa: E402
from compress.nets.vit import vit_small, vit_tiny  # noqa: E402
from compress.nets.vit_torch import vit_torch_tiny  # noqa: E402

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
    "vit_torch_tiny": vit_torch_tiny,
    # task: segmentation ([B, C, H, W]) and regression ([B, K]); compress/tasks.py
    "segnet_tiny": segnet_tiny,
    "segnet_small": segnet_small,
    "regressor_tiny": regressor_tiny,
    "regressor_small": regressor_small,
}


def check_model_spec(spec: str) -> str:
    """Validate a model name without building it (used at config validation)."""
    from compress.model_spec import check_spec
    return check_spec(spec, ZOO)


def build(spec: str, num_classes: int, in_channels: int, kwargs: Optional[dict] = None, input_shape=None,
          state: Optional[dict] = None, where: str = "checkpoint"):
    """-> model_spec.Built(model, adapted): the model and what was changed to fit the data."""
    from compress.model_spec import build as _build
    return _build(spec, ZOO, num_classes, in_channels, kwargs, input_shape, state, where)


def build_model(spec: str, num_classes: int, in_channels: int, kwargs: Optional[dict] = None,
                input_shape=None) -> nn.Module:
    return build(spec, num_classes, in_channels, kwargs, input_shape).model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
