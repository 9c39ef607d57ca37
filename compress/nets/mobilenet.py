"""A MobileNetV2/V3-style network for small images: inverted residuals with depthwise
convolutions, squeeze-excite, SiLU/Hardswish, a Ghost-style block that concatenates two
branches, and a grouped convolution. It exists so pruning and quantization are exercised
on every structural dependency edge models have, not only on plain residual adds."""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.SiLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """MobileNetV3's SE: channel gates from pooled features (a multiplicative dependency
    between the block's width and the SE expand conv)."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        mid = max(8, c // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, mid, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(mid, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> (SE) -> project 1x1; residual add when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool,
                 act: type[nn.Module]):
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn(cin, mid, 1, act=act)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid, act=act)
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.project = conv_bn(mid, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class GhostBlock(nn.Module):
    """GhostNet: half the outputs from a 1x1 conv, half from a cheap depthwise conv on
    them, concatenated (a concat dependency for the pruner)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.primary = conv_bn(cin, cout // 2, 1, act=nn.Hardswish)
        self.cheap = conv_bn(cout // 2, cout // 2, 3, groups=cout // 2, act=nn.Hardswish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        return torch.cat([p, self.cheap(p)], dim=1)


class MobileNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.stem = conv_bn(in_channels, w, 3, act=nn.Hardswish)
        # (cout, stride, expand, se, act): V2's ReLU-family blocks early, V3's SE+Hardswish late
        spec = [(w, 1, 2, False, nn.SiLU), (2 * w, 2, 4, False, nn.SiLU), (2 * w, 1, 4, False, nn.SiLU),
                (4 * w, 2, 4, True, nn.Hardswish), (4 * w, 1, 4, True, nn.Hardswish)]
        blocks, cin = [], w
        for cout, stride, expand, se, act in spec:
            blocks.append(InvertedResidual(cin, cout, stride, expand, se, act))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.ghost = GhostBlock(cin, 8 * w)
        # a grouped (not depthwise) conv: its channel groups must be pruned evenly
        self.mix = conv_bn(8 * w, 8 * w, 3, groups=4, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.ghost(self.blocks(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def mobilenet_small(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """~150k params: MobileNetV2/V3-style student."""
    return MobileNet(num_classes, in_channels, width=16)


def mobilenet_tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A few thousand params: for tests."""
    return MobileNet(num_classes, in_channels, width=4)
