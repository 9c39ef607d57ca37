"""Small models for the tasks beyond classification (compress/tasks.py): a segmentation
encoder-decoder whose final 1x1 conv gives per-pixel logits at the input's resolution, and a
regression CNN whose final Linear gives K values. Sized for 16-32 px images: tests and the
examples/segmentation.yaml and examples/regression.yaml runs.

Every op is one the chain handles end to end: Conv-BN-ReLU (BN merged at quantization), a
residual add (pruned consistently by torch-pruning), nearest 2x upsampling (ONNX Resize,
which int8 runtimes run on the quantized tensor).
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SegNet(nn.Module):
    """Encoder (full, then half resolution), decoder (2x nearest upsampling + conv), a skip add
    from the full-resolution encoder features, and the 1x1 conv head: [B, C, H, W] logits.
    H and W must be even."""

    def __init__(self, width: int = 8, num_classes: int = 3, in_channels: int = 1):
        super().__init__()
        self.enc1 = conv_bn(in_channels, width)
        self.enc2 = nn.Sequential(conv_bn(width, 2 * width, 2), conv_bn(2 * width, 2 * width))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = conv_bn(2 * width, width)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc1(x)
        y = self.dec(self.up(self.enc2(skip)))
        return self.head(self.relu(y + skip))


class Regressor(nn.Module):
    """Three stride-2 Conv-BN-ReLU blocks, a 4x4 average pool (keeps where things are, which a
    global pool would lose), flatten, and the K-output Linear head."""

    def __init__(self, width: int = 8, num_classes: int = 3, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(conv_bn(in_channels, width), conv_bn(width, 2 * width, 2),
                                      conv_bn(2 * width, 2 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def segnet_tiny(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """~5k params: the segmentation student."""
    return SegNet(8, num_classes, in_channels)


def segnet_small(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """~19k params: the segmentation teacher."""
    return SegNet(16, num_classes, in_channels)


def regressor_tiny(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """~4k params: the regression student (num_classes = K outputs)."""
    return Regressor(8, num_classes, in_channels)


def regressor_small(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """~16k params: the regression teacher."""
    return Regressor(16, num_classes, in_channels)
