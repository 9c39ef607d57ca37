"""Write an image-folder version of Fashion-MNIST: 3x32x32 RGB PNGs in class folders.

    python examples/make_image_folder.py OUT [--root /usr/share/datasets/fashion-mnist]
                                             [--per-class-train N] [--per-class-test N]

OUT/train/<class>/<index>.png and OUT/test/<class>/<index>.png; a class folder is named by its
label and its file-safe class name ("0-T-shirt_top", "1-Trouser", ...), so the sorted folder
names that `data: {dataset: image_folder, root: OUT}` takes as classes keep Fashion-MNIST's label
order (a teacher trained on the IDX files reads these labels the same way). Each 28x28 gray
image is resized to 32x32 (bilinear, Pillow) and repeated over three channels, the input an RGB
model such as a torchvision ResNet-18 expects. --per-class-* take the first N images of each
class (a subset for quick runs); by default every image is written (70,000 files, ~1 minute).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: calib importable

from calib.datasets import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_ROOT,
    FASHION_MNIST_FILES,
    check_fashion_mnist_root,
    read_idx,
)

SIZE = 32


def folder_name(k: int, cls: str) -> str:
    return f"{k}-" + cls.replace("/", "_").replace(" ", "_")  # one digit: 10 classes sort as 0..9


def write_split(images: np.ndarray, labels: np.ndarray, out: Path, per_class: int | None) -> int:
    written = 0
    for k, cls in enumerate(FASHION_MNIST_CLASSES):
        d = out / folder_name(k, cls)
        d.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(labels == k)[:per_class]
        for i in idx:
            gray = Image.fromarray(images[i]).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            gray.convert("RGB").save(d / f"{i:05d}.png", optimize=False)
        written += len(idx)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write train/ and test/ into")
    p.add_argument("--root", default=FASHION_MNIST_DEFAULT_ROOT, help="the four Fashion-MNIST IDX .gz files")
    p.add_argument("--per-class-train", type=int, default=None, help="first N training images per class")
    p.add_argument("--per-class-test", type=int, default=None, help="first N test images per class")
    a = p.parse_args(argv)
    root = check_fashion_mnist_root(a.root)
    for part, n in (("train", a.per_class_train), ("test", a.per_class_test)):
        images = read_idx(root / FASHION_MNIST_FILES[f"{part}_images"])
        labels = read_idx(root / FASHION_MNIST_FILES[f"{part}_labels"])
        count = write_split(images, labels, a.out / part, n)
        print(f"{a.out / part}: {count} PNGs ({SIZE}x{SIZE} RGB) in {len(FASHION_MNIST_CLASSES)} class folders")


if __name__ == "__main__":
    main()
