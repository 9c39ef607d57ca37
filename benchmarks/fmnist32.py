"""Fashion-MNIST as 3x32x32 images, for models built for RGB inputs of 32 px or more
(torchvision/timm): a `pkg.module:factory` dataset (config `data.dataset:
benchmarks.fmnist32:fmnist32`, run from the repository root).

Each 28x28 image is resized bilinearly to 32x32 and repeated over 3 channels; labels, class
names and the train/test split are Fashion-MNIST's own."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from calib.datasets import FASHION_MNIST_DEFAULT_ROOT, Dataset, Split, fashion_mnist

SIZE = 32


def _resize(split: Split) -> Split:
    out = []
    for chunk in split.images.split(4096):  # ~50 MB of float at a time
        x = F.interpolate(chunk.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1))
    return Split(torch.cat(out).contiguous(), split.labels)


@functools.lru_cache(maxsize=1)  # a run loads the data at preflight and again to train
def fmnist32(root: str = FASHION_MNIST_DEFAULT_ROOT) -> Dataset:
    d = fashion_mnist(root)
    return Dataset("fashion_mnist_3x32", _resize(d.train), _resize(d.test), d.num_classes,
                   d.mean * 3, d.std * 3, d.classes)
