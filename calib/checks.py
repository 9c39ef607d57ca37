"""Data checked, not trusted: what a Dataset must satisfy before anything trains on it.

Each check returns a list of one-line problems (empty: fine), so preflight can report every
problem at once. The rules (the README's "Your data" states them for users):
- images: (N, C, H, W) tensors, the same C, H, W in train and test; uint8 0-255, or float in
  [0, 1] only where the Dataset declares `pixels="float"` (an undeclared float tensor would be
  scaled by 1/255 as if it were 0-255 pixels: the chance-accuracy run of issue 12);
- classification labels: int64, 1-D, one per image, in [0, num_classes), every class present
  in train and in test (a class missing from test is never measured, from train never learnt);
- limits (limit_train, limit_test, calib_samples) no larger than the data they draw from;
- class names and their order as the teacher was trained with (its recorded list).
Task-specific label checks beside check_classification are the tasks' own (regression: float
targets; segmentation: int64 masks N x H x W).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from calib.datasets import PIXELS, Dataset

SPLITS = ("train", "test")


def _splits(ds: Dataset):
    return [(name, getattr(ds, name)) for name in SPLITS]


def check_images(ds: Dataset, where: str) -> list[str]:
    """Dtype, value range and shape of both splits' images; mean/std fit the channels."""
    if ds.pixels not in PIXELS:
        return [f"{where}: pixels={ds.pixels!r}, expected one of {sorted(PIXELS)}"]
    errors, shapes = [], {}
    for name, split in _splits(ds):
        x = split.images
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            errors.append(f"{where}: {name} images are {got}, expected a tensor (N, C, H, W)")
            continue
        if len(x) == 0:
            errors.append(f"{where}: the {name} split is empty")
            continue
        shapes[name] = tuple(x.shape[1:])
        errors += _check_pixels(x, ds.pixels, f"{where}: {name} images")
    if len(set(shapes.values())) > 1:
        errors.append(f"{where}: train images are {shapes['train']} (C, H, W) but test images "
                      f"{shapes['test']}: both splits must have one shape")
    c = next(iter(shapes.values()))[0] if shapes else None
    for key in ("mean", "std"):
        v = getattr(ds, key)
        if c is not None and len(v) not in (1, c):
            errors.append(f"{where}: {key} has {len(v)} values for {c}-channel images (give 1 or {c})")
    if any(s <= 0 for s in ds.std):
        errors.append(f"{where}: std {list(ds.std)} must be > 0")
    return errors


def _check_pixels(x: torch.Tensor, pixels: str, what: str) -> list[str]:
    if x.dtype == torch.uint8:
        if pixels == "float":
            return [f"{what} are uint8 but the Dataset declares pixels='float' (floats in [0, 1]): "
                    f"drop the declaration for 0-255 images"]
        return []
    if not x.is_floating_point():
        return [f"{what} are {x.dtype}, expected uint8 (0-255) or, declared with pixels='float', "
                f"float in [0, 1]"]
    lo, hi = float(x.min()), float(x.max())
    if pixels != "float":
        return [f"{what} are {str(x.dtype).removeprefix('torch.')} in [{lo:.3g}, {hi:.3g}], expected uint8 0-255; "
                f"float images in [0, 1] must be declared: Dataset(..., pixels='float') (they are "
                f"never rescaled by guess)"]
    if lo < 0 or hi > 1 or x.isnan().any():
        return [f"{what} hold values in [{lo:.3g}, {hi:.3g}], expected [0, 1] as declared by "
                f"pixels='float' (0-255 values: give uint8 images)"]
    return []


def check_classification(ds: Dataset, where: str, require_all_classes: bool = True) -> list[str]:
    """Labels of a classification dataset: int64 (N,), in range, every class in both splits.
    `require_all_classes`: False for the built-in synthetic set, whose labels are drawn at
    random (a test fixture: a tiny split may miss a class, and changing that changes numbers)."""
    errors = []
    if ds.classes and len(ds.classes) != ds.num_classes:
        errors.append(f"{where}: {len(ds.classes)} class names for num_classes={ds.num_classes}")
    for name, split in _splits(ds):
        y = split.labels
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            errors.append(f"{where}: {name} labels are {got}, expected int64 (N,) class indices")
            continue
        if len(y) != len(split.images):
            errors.append(f"{where}: {name} has {len(split.images)} images but {len(y)} labels")
        if len(y) == 0:
            continue
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= ds.num_classes:
            bad = y[(y < 0) | (y >= ds.num_classes)]
            errors.append(f"{where}: {name} labels hold {int(bad[0])} ({len(bad)} labels out of range), "
                          f"expected 0..{ds.num_classes - 1} (num_classes={ds.num_classes})")
            continue
        missing = sorted(set(range(ds.num_classes)) - set(y.unique().tolist()))
        if missing and require_all_classes:
            names = [ds.classes[i] if ds.classes else str(i) for i in missing]
            errors.append(f"{where}: class{'es' if len(missing) > 1 else ''} {', '.join(names[:10])}"
                          f"{' ...' if len(names) > 10 else ''} missing from the {name} split "
                          f"({len(y)} examples): every class must be in train and test")
    return errors


def check_limits(sizes: dict[str, int], limits: dict[str, Optional[int]]) -> list[str]:
    """sizes: {"train": n, "test": n}; limits: {field: value} for data.limit_train,
    data.limit_test and data.calib_samples (None: not set). calib_samples draws from the
    training split after limit_train."""
    train = min(sizes["train"], limits.get("limit_train") or sizes["train"])
    errors = []
    for key, n, what in (("limit_train", sizes["train"], "the training split"),
                         ("limit_test", sizes["test"], "the test split"),
                         ("calib_samples", train, "the training split" + (
                             " after limit_train" if limits.get("limit_train") else ""))):
        v = limits.get(key)
        if v is not None and v > n:
            errors.append(f"data.{key}={v}: larger than {what} ({n} examples)")
    return errors


def check_class_order(expected: list[str], classes: list[str], what: str) -> Optional[str]:
    """One line showing both lists when the data's class names or their order differ from
    those `what` (a teacher) was trained with; None when they agree or either is unknown."""
    if not expected or not classes or list(expected) == list(classes):
        return None
    how = "in another order" if sorted(expected) == sorted(classes) else "with other names"
    return (f"{what} was trained with classes {list(expected)}; the data has {list(classes)} ({how}): "
            f"its logits would be read against the wrong labels. Use data with the teacher's classes "
            f"and order, or retrain the teacher")


def checkpoint_classes(path: Path) -> Optional[list[str]]:
    """The class list a run recorded in a .safetensors file's metadata (pipeline._save), or None."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable: the checkpoint loader reports it with the file named
        return None
    try:
        classes = json.loads(meta["classes"]) if "classes" in meta else None
    except ValueError:
        return None
    return classes if isinstance(classes, list) else None


def data_digest(ds: Dataset) -> str:
    """A digest of what a run trains and evaluates on (pixels, labels, classes, normalization),
    hashed for resume: changed data reruns the stages. Of the arrays, not the files: the same
    for a moved or re-copied folder (a copy changes mtimes, not pixels), and ~0.1 s for
    Fashion-MNIST's 55 MB."""
    h = hashlib.sha256(json.dumps([ds.classes, ds.num_classes, list(ds.mean), list(ds.std), ds.pixels,
                                   ds.source]).encode())
    for _, split in _splits(ds):
        for t in (split.images, split.labels):
            t = t.contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().numpy())  # a C-contiguous array hashes without a copy
    return h.hexdigest()[:16]
