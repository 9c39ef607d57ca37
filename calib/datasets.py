"""Datasets as in-memory image tensors plus the normalization that defines them.

A dataset is kept as raw uint8 images (N, C, H, W) and int64 labels; the float
transform (scale 1/255, then mean/std) is part of the dataset definition so the same
numbers can be written into every deployment manifest and applied by any runtime.
Float images are accepted only when the Dataset declares them (`pixels="float"`: float
values in [0, 1], scale 1); calib/checks.py enforces both rules at load time.
"""
from __future__ import annotations

import gzip
import importlib
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from compress.errors import UserError

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Statistics of the Fashion-MNIST training images after scaling to [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


class DataError(UserError):
    """A dataset path or file that cannot be used; the message names the file."""


PIXELS = {"uint8": 1 / 255.0, "float": 1.0}  # declared pixel type -> the scale to [0, 1]


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W); float32 in [0, 1] where the Dataset declares pixels="float"
    labels: torch.Tensor  # classification: int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: list[float]
    std: list[float]
    classes: list[str] = field(default_factory=list)
    pixels: str = "uint8"
    """uint8: images are uint8 0-255; float: float images already in [0, 1] (declared, never guessed)"""
    source: dict = field(default_factory=dict)
    """how raw files became these pixels (image folders: resize, center_crop, interpolation,
    channels), written to the deployment manifest beside scale/mean/std"""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def scale(self) -> float:
        return PIXELS[self.pixels]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> normalized float32, the model's input. uint8 is scaled by
        1/255; a float tensor is taken as [0, 1] already (declared float images, or images made
        in [0, 1] such as synthetic calibration's), so nothing is divided by 255 twice."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - mean) / std

    def normalize_np(self, images: np.ndarray) -> np.ndarray:
        """The same transform in numpy, as a deployment applies it from the manifest."""
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        scale = np.float32(1 / 255.0) if images.dtype == np.uint8 else np.float32(1.0)
        return ((images.astype(np.float32) * scale) - mean) / std

    def preprocessing(self) -> dict:
        """What a deployment needs to turn raw pixels into the model's input: the decode steps
        (`source`, image folders), then x * scale, then (x - mean) / std per channel."""
        c = self.input_shape[0]  # one mean/std for all channels is written out per channel: one rule to read
        mean, std = ([float(v[0])] * c if len(v) == 1 else list(v) for v in (self.mean, self.std))
        return {**self.source, "scale": self.scale, "mean": mean, "std": std, "layout": "NCHW", "dtype": "float32"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (expected magic 0x0000 then type and rank)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x}, expected 0x08 (uint8)")
    header = 4 + 4 * ndim
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - header != expected:
        raise DataError(f"{path}: header says {dims} = {expected} bytes, file holds "
                        f"{len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def idx_length(path: Path) -> int:
    """The first dimension of an IDX file, from its header only (preflight: no decompression
    of the whole file)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(8)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    if len(head) < 8 or head[0] != 0 or head[1] != 0 or head[3] < 1:
        raise DataError(f"{path}: not an IDX file (expected magic 0x0000 then type and rank)")
    return struct.unpack(">I", head[4:8])[0]


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """IDX labels must be class indices 0..num_classes-1 (a larger one fails mid-training)."""
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise DataError(f"{path}: label {int(labels[bad[0]])} at index {int(bad[0])} ({bad.size} such), "
                        f"expected class indices 0-{num_classes - 1}")


def check_fashion_mnist_root(root: str | Path) -> Path:
    """Fail early, naming the missing files, before any work starts."""
    root = Path(root)
    missing = [n for n in FASHION_MNIST_FILES.values() if not (root / n).is_file()]
    if missing:
        raise DataError(
            f"data.root={root}: Fashion-MNIST files missing: {', '.join(missing)}. "
            f"Install them with `apt-get install dataset-fashion-mnist` (files land in "
            f"{FASHION_MNIST_DEFAULT_ROOT}) or point data.root at a folder holding the four "
            f"IDX .gz files.")
    return root


def fashion_mnist(root: str | Path = FASHION_MNIST_DEFAULT_ROOT) -> Dataset:
    root = check_fashion_mnist_root(root)
    arrays = {k: read_idx(root / n) for k, n in FASHION_MNIST_FILES.items()}
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab or arrays[f"{part}_images"].ndim != 3:
            raise DataError(f"{root}: {part} split has {n_img} images (rank "
                            f"{arrays[f'{part}_images'].ndim}) but {n_lab} labels")

        check_labels(arrays[f"{part}_labels"], 10, root / FASHION_MNIST_FILES[f"{part}_labels"])

    def split(part: str) -> Split:
        imgs = torch.from_numpy(arrays[f"{part}_images"].copy()).unsqueeze(1)
        return Split(imgs, torch.from_numpy(arrays[f"{part}_labels"].astype(np.int64)))

    return Dataset("fashion_mnist", split("train"), split("test"), 10,
                   [FASHION_MNIST_MEAN], [FASHION_MNIST_STD], list(FASHION_MNIST_CLASSES))


def synthetic(num_classes: int = 10, train_size: int = 2048, test_size: int = 512,
              image_size: int = 28, channels: int = 1, noise: float = 0.15,
              seed: int = 0) -> Dataset:
    """A seeded, learnable image classification set for tests and smoke runs.

    Each class is a smooth random prototype; samples are the prototype shifted by up to
    two pixels, with random contrast and pixel noise, so a small CNN needs its spatial
    filters (not just a mean) to separate the classes, but learns them in an epoch or two.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(num_classes, channels, 7, 7, generator=g) > 0.5).float()
    protos = torch.nn.functional.interpolate(coarse, size=(image_size, image_size),
                                             mode="bilinear", align_corners=False)

    def make(n: int) -> Split:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        x = protos[labels]
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        x = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2))
                         for img, s in zip(x, shifts)])
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        x = (x - 0.5) * contrast + 0.5 + noise * torch.randn(x.shape, generator=g)
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return Split(images, labels.long())

    train, test = make(train_size), make(test_size)
    mean = [float(train.images.float().mean() / 255)]
    std = [float(train.images.float().std() / 255)]
    return Dataset("synthetic", train, test, num_classes, mean * channels, std * channels,
                   [f"class{i}" for i in range(num_classes)])


def add_import_path(folder: Path) -> None:
    """Append `folder` (a config's folder) to sys.path, once. Appended, not prepended: a file
    there named like an installed package (yaml.py, torch.py) must not shadow it."""
    folder = str(Path(folder).resolve())
    if folder not in sys.path:
        sys.path.append(folder)


# builtins and the standard library are never factories: a config naming os:system or
# builtins:eval would run arbitrary calls through a field that looks like data
STDLIB = frozenset(sys.stdlib_module_names) | {"builtins", "__main__"}
IMPORTED: list[str] = []  # modules configs named, in order (report.json's imported_modules)


def resolve_factory(spec: str, what: str, search: Optional[Path] = None) -> Callable:
    """Resolve a "pkg.module:factory" string; the one place configs name code. `search`: a
    folder put on the import path first (the config's), named when the import fails."""
    if ":" not in spec:
        raise UserError(f"{what}={spec!r}: expected a built-in name or 'pkg.module:factory'")
    if search is not None:
        add_import_path(search)
    mod_name, attr = spec.split(":", 1)
    if not mod_name or mod_name.startswith(".") or not all(p.isidentifier() for p in mod_name.split(".")):
        raise UserError(f"{what}={spec!r}: {mod_name!r} is not an absolute module name (expected 'pkg.module:factory')")
    if mod_name.split(".")[0] in STDLIB:
        raise UserError(f"{what}={spec!r}: {mod_name!r} is a module of the Python standard library; a factory "
                        f"must come from your own code or an installed model package")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        file = mod_name.replace(".", "/") + ".py"
        where = (f"; the config's folder {Path(search).resolve()} is on the import path, so {file} "
                 f"beside the config imports" if search is not None else "")
        raise UserError(f"{what}={spec!r}: cannot import module {mod_name!r} ({e}{where})") from e
    if mod_name not in IMPORTED:
        IMPORTED.append(mod_name)
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise UserError(f"{what}={spec!r}: module {mod_name!r} has no callable {attr!r}")
    return fn
