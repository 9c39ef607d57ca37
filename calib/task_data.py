"""Seeded synthetic data for the tasks beyond classification (compress/tasks.py): squares and
discs on a noisy background. Factories for `data.dataset`:

    data: {dataset: "calib.task_data:shapes_segmentation"}   # task: segmentation
    data: {dataset: "calib.task_data:shapes_regression"}     # task: regression

Every argument is a keyword with a default (sizes, noise, seed), so a factory call with no
arguments gives the set the examples and tests use. Both are learnable by the zoo's tiny
models in a few epochs, and neither can be solved from brightness alone: squares and discs
overlap in intensity, and positions must be read from where the shape is.
"""
from __future__ import annotations

import torch

from calib.datasets import Dataset, Split

SEG_CLASSES = ["background", "square", "disc"]
REG_OUTPUTS = ["center_y", "center_x", "size"]


def _shape(size: int, g: torch.Generator) -> tuple[int, float, float, float, float]:
    """(class 1 square | 2 disc, centre y, centre x, radius, intensity) of one random shape."""
    cls = int(torch.randint(1, 3, (1,), generator=g))
    r = 2 + float(torch.rand(1, generator=g)) * (size / 4 - 2)
    cy, cx = (r + torch.rand(2, generator=g) * (size - 1 - 2 * r)).tolist()
    # intensities overlap between classes (0.55-0.85 vs 0.45-0.75): the outline decides
    intensity = (0.55 if cls == 1 else 0.45) + 0.3 * float(torch.rand(1, generator=g))
    return cls, cy, cx, r, intensity


def _paint(img: torch.Tensor, mask: torch.Tensor, shape, yy, xx, ignore_index) -> None:
    cls, cy, cx, r, intensity = shape
    if cls == 1:
        inside = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        edge = torch.zeros_like(inside)
    else:
        dist = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        inside, edge = dist < r - 0.5, (dist >= r - 0.5) & (dist < r + 0.5)
        img[:, edge] = torch.maximum(img[:, edge], torch.tensor(intensity / 2))  # anti-aliased rim
        if ignore_index is not None:
            mask[edge] = ignore_index  # half-covered pixels: no right answer (VOC marks them void)
    img[:, inside] = intensity
    mask[inside] = cls


def _finish(images: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    images = images + noise * torch.randn(images.shape, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _stats(train: torch.Tensor) -> tuple[list[float], list[float]]:
    x = train.float() / 255
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()


def shapes_segmentation(train_size: int = 512, test_size: int = 128, image_size: int = 16, channels: int = 1,
                        max_shapes: int = 2, noise: float = 0.08, ignore_index: int | None = 255,
                        seed: int = 0) -> Dataset:
    """Images uint8 [N, C, S, S] with 1..max_shapes squares/discs; masks int64 [N, S, S]:
    0 background, 1 square, 2 disc, `ignore_index` on discs' rims (None: the rim is the disc's)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(image_size).float(), torch.arange(image_size).float(), indexing="ij")

    def make(n: int) -> Split:
        images = torch.full((n, channels, image_size, image_size), 0.15)
        masks = torch.zeros(n, image_size, image_size, dtype=torch.int64)
        for i in range(n):
            for _ in range(int(torch.randint(1, max_shapes + 1, (1,), generator=g))):
                shape = _shape(image_size, g)
                _paint(images[i], masks[i], shape, yy, xx, ignore_index)
                if ignore_index is None and shape[0] == 2:  # the rim belongs to the disc
                    masks[i][(((yy - shape[1]) ** 2 + (xx - shape[2]) ** 2).sqrt() < shape[3] + 0.5)] = 2
        return Split(_finish(images, noise, g), masks)

    train, test = make(train_size), make(test_size)
    mean, std = _stats(train.images)
    return Dataset("shapes_segmentation", train, test, len(SEG_CLASSES), mean, std, list(SEG_CLASSES))


def shapes_regression(train_size: int = 512, test_size: int = 128, image_size: int = 16, channels: int = 1,
                      noise: float = 0.08, seed: int = 0) -> Dataset:
    """One square or disc per image; labels float32 [N, 3]: centre y and x over (S - 1), and
    radius over S / 4, each in about [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(image_size).float(), torch.arange(image_size).float(), indexing="ij")

    def make(n: int) -> Split:
        images = torch.full((n, channels, image_size, image_size), 0.15)
        labels = torch.zeros(n, len(REG_OUTPUTS))
        scratch = torch.zeros(image_size, image_size, dtype=torch.int64)
        for i in range(n):
            shape = _shape(image_size, g)
            _paint(images[i], scratch, shape, yy, xx, None)
            _, cy, cx, r, _ = shape
            labels[i] = torch.tensor([cy / (image_size - 1), cx / (image_size - 1), r / (image_size / 4)])
        return Split(_finish(images, noise, g), labels)

    train, test = make(train_size), make(test_size)
    mean, std = _stats(train.images)
    return Dataset("shapes_regression", train, test, len(REG_OUTPUTS), mean, std, list(REG_OUTPUTS))
