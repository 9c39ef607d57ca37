"""Image folders: class folders of image files, decoded with Pillow once and cached.

Layouts under root: `train/` and `val/` (or `test/`; val wins when both exist) each holding one
folder per class, or the class folders alone, split per class with a seed (stratified).
Class names are the folder names, sorted; a class's index is its place in that list. Files are
found recursively inside a class folder; names starting with '.' and files whose suffix is not
an image's are skipped. Decoding: Pillow, converted to L (1 channel) or RGB (3; alpha dropped),
resized bilinearly (antialiased) and center-cropped as data.transform says; those steps are
returned in Dataset.source so the deployment manifest states them.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from calib import cache
from calib.datasets import DataError, Dataset, Split

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
GRAY = {"1", "L", "LA", "I", "I;16", "F"}  # Pillow modes without colour
TRAIN, TEST, TREE = 0, 1, 2  # where a file came from: train/, val|test/, the one class-folder tree


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _class_dirs(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and _visible(p)}


def _images(folder: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of the image files under folder, sorted by path. os.walk and
    strings, not pathlib: scanning 70,000 files is part of every cached load (~5x faster)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in SUFFIXES:
                continue
            path = os.path.join(dirpath, f)
            try:
                st = os.stat(path)
            except OSError as e:  # e.g. a broken symlink
                raise DataError(f"{path}: cannot read ({e})") from None
            out.append((path, st.st_size, st.st_mtime_ns))
    return sorted(out)


def scan(root: Path, log: Callable[[str], None]) -> tuple[list[str], list[tuple[str, int, int]], list[int], list[int]]:
    """(classes, files, labels, part) of the folder: files as (path, size, mtime_ns); part:
    TRAIN, TEST or TREE per file."""
    if not root.is_dir():
        raise DataError(f"data.root={root}: not a folder (image_folder expects train/ and val/ of class "
                        f"folders, or class folders)")
    top = _class_dirs(root)
    if "train" in top:
        test = "val" if "val" in top else "test" if "test" in top else None
        if test is None:
            raise DataError(f"data.root={root}: has train/ but neither val/ nor test/: add one, or put the "
                            f"class folders directly under data.root to split them (data.split)")
        if test == "val" and "test" in top:
            log(f"data: {root}: evaluating on val/ (test/ is not used)")
        parts = [(TRAIN, _class_dirs(root / "train")), (TEST, _class_dirs(root / test))]
    else:
        parts = [(TREE, top)]
    classes = sorted(set().union(*(dirs for _, dirs in parts)))
    if not classes:
        raise DataError(f"data.root={root}: no class folders: expected train/ and val/ (or test/) holding one "
                        f"folder per class, or the class folders themselves")
    files, labels, part = [], [], []
    for where, dirs in parts:
        for name, folder in dirs.items():
            found = _images(folder)
            files += found
            labels += [classes.index(name)] * len(found)
            part += [where] * len(found)
    if not files:
        raise DataError(f"data.root={root}: no image files ({', '.join(sorted(SUFFIXES))}) in its class folders")
    return classes, files, labels, part


def _decode(path: Path, mode: Optional[str], transform) -> np.ndarray:
    """One file -> uint8 (C, H, W); mode None keeps grayscale images gray (1 channel)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()  # decode fully here: a truncated file fails now, naming itself
            target = mode or ("L" if im.mode in GRAY else "RGB")
            im = im.convert(target) if im.mode != target else im
            im = _resize(im, transform.resize)
            im = _crop(im, transform.center_crop, path)
            a = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _resize(im, size):
    from PIL import Image
    if size is None:
        return im
    w, h = im.size
    if isinstance(size, int):  # shorter side to `size`, as torchvision's Resize(int): long side truncated
        short, long = (w, h) if w <= h else (h, w)
        s, ln = size, int(size * long / short)
        new = (s, ln) if w <= h else (ln, s)
    else:
        new = (size[1], size[0])
    return im if new == (w, h) else im.resize(new, Image.Resampling.BILINEAR)


def _crop(im, size, path: Path):
    if size is None:
        return im
    ch, cw = (size, size) if isinstance(size, int) else size
    w, h = im.size
    if ch > h or cw > w:
        raise DataError(f"{path}: {w}x{h} after resize, smaller than data.transform.center_crop {ch}x{cw} "
                        f"(height x width)")
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))  # torchvision's CenterCrop
    return im.crop((left, top, left + cw, top + ch))


def decode_all(files: list[Path], transform, log: Callable[[str], None]) -> torch.Tensor:
    mode = {1: "L", 3: "RGB", None: None}[transform.channels]
    arrays, t0 = [], time.time()
    for i, f in enumerate(files):
        a = _decode(f, mode, transform)
        if arrays and a.shape[1:] != arrays[0].shape[1:]:
            raise DataError(f"{f}: {a.shape[2]}x{a.shape[1]} pixels, {files[0]} {arrays[0].shape[2]}x"
                            f"{arrays[0].shape[1]}: images of different sizes need data.transform.resize "
                            f"(and center_crop)")
        arrays.append(a)
        if (i + 1) % 10000 == 0:
            log(f"  decoded {i + 1}/{len(files)} images ({time.time() - t0:.0f}s)")
    if any(a.shape[0] == 3 for a in arrays):  # mixed gray and colour: gray repeated, as Pillow's L -> RGB
        arrays = [np.repeat(a, 3, 0) if a.shape[0] == 1 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays))


def load_decoded(root: Path, transform, cache_dir: Optional[Path], log) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(classes, {images, labels, part}) for every file, from the cache when it is current."""
    import PIL
    t0 = time.time()
    classes, files, labels, part = scan(root, log)
    settings = {"classes": classes, "resize": transform.resize, "center_crop": transform.center_crop,
                "channels": transform.channels, "pillow": PIL.__version__}
    path = cache.cache_path(cache_dir, cache.cache_key(root, files, settings)) if cache_dir else None
    hit = cache.read(path) if path else None
    if hit is not None:
        log(f"data: {len(files)} images of {root} from the decode cache {path} (listed and read "
            f"in {time.time() - t0:.1f}s)")
        return classes, hit[0]
    log(f"data: decoding {len(files)} images of {root} (once; cached by file names, sizes and mtimes)")
    tensors = {"images": decode_all([Path(f[0]) for f in files], transform, log),
               "labels": torch.tensor(labels, dtype=torch.int64), "part": torch.tensor(part, dtype=torch.uint8)}
    seconds = time.time() - t0
    if path:
        cache.write(path, tensors, {"root": str(root), "files": len(files), "decode_seconds": round(seconds, 2)})
    log(f"data: decoded in {seconds:.1f}s" + (f", cached as {path}" if path else ""))
    return classes, tensors


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> torch.Tensor:
    """A bool mask of the test examples: each class's share, drawn with the seed; a class of
    two or more images keeps at least one on each side."""
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        n = len(idx)
        k = min(max(round(n * test_fraction), 1), n - 1) if n >= 2 else 0
        test[idx[torch.randperm(n, generator=g)[:k]]] = True
    return test


def pixel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], exact, from 256-bin counts
    (no float copy of the images)."""
    mean, std = [], []
    values = torch.arange(256, dtype=torch.float64) / 255
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        m = float((counts * values).sum() / counts.sum())
        var = float((counts * (values - m) ** 2).sum() / counts.sum())
        mean.append(round(m, 6))
        std.append(round(max(var, 1e-12) ** 0.5, 6))
    return mean, std


def image_folder(root: Path, transform, split, cache_dir: Optional[Path] = None,
                 log: Callable[[str], None] = print) -> Dataset:
    """transform: data.transform (resize, center_crop, channels, mean, std); split: data.split
    (test_fraction, seed), used when root holds class folders alone."""
    root = Path(root)
    classes, t = load_decoded(root, transform, cache_dir, log)
    images, labels, part = t["images"], t["labels"], t["part"]
    if bool((part == TREE).any()):
        test = stratified_split(labels, split.test_fraction, split.seed)
        log(f"data: one class-folder tree, split {1 - split.test_fraction:.0%}/{split.test_fraction:.0%} per class "
            f"(data.split, seed {split.seed})")
    else:
        test = part == TEST
    train_split, test_split = Split(images[~test], labels[~test]), Split(images[test], labels[test])
    if transform.mean is not None:
        mean, std = list(transform.mean), list(transform.std)
    else:
        mean, std = pixel_stats(train_split.images)
        log(f"data: normalization computed from the {len(train_split)} training images: mean {mean}, std {std} "
            f"(set data.transform.mean/std to fix them)")
    # what a deployment must repeat on a raw file before scale/mean/std (the manifest's input)
    source = {"color": "L" if images.shape[1] == 1 else "RGB"}
    if transform.resize is not None:
        source.update(resize=transform.resize, interpolation="bilinear, antialiased (Pillow)")
    if transform.center_crop is not None:
        source["center_crop"] = transform.center_crop
    return Dataset(f"image_folder:{root.name}", train_split, test_split, len(classes), mean, std, classes,
                   source={k: list(v) if isinstance(v, tuple) else v for k, v in source.items()})
