"""data: config -> a checked Dataset: the built-in sets, image folders and `pkg.module:factory`.

Shared by the run (compress/pipeline.py) and `compress validate` (compress/preflight.py), so
both accept the same data. A factory is called with `root` (when data.root is set) and
data.kwargs, each only where its signature names it; the config's folder is appended to the
import path first, so a module beside the config imports by its file name.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Optional

from calib.checks import check_classification, check_images, check_limits
from calib.datasets import Dataset, fashion_mnist, resolve_factory, synthetic
from compress.errors import UserError


def call_factory(spec: str, config_dir: Path, root: Optional[Path], kwargs: dict[str, Any]) -> Dataset:
    fn = resolve_factory(spec, "data.dataset", search=config_dir)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a C callable: call it as configured, its own error will say
        sig = None
    call = dict(kwargs)
    if root is not None:
        call["root"] = str(root)
    if sig is not None:
        if root is not None and "root" not in sig.parameters:
            raise UserError(f"data.root={root}: data.dataset={spec!r} takes no `root` (factory{sig}): "
                            f"remove data.root, or give the factory a root parameter")
        try:
            sig.bind(**call)
        except TypeError as e:
            raise UserError(f"data.dataset={spec!r}: factory{sig} does not take data.kwargs "
                            f"{sorted(kwargs)} ({e})") from None
    data = fn(**call)
    if not isinstance(data, Dataset):
        raise UserError(f"data.dataset={spec!r} returned {type(data).__name__}, expected calib.datasets.Dataset")
    return data


def load_dataset(d, seed: int, resolve: Callable[[str], Path], config_dir: Path, cache_dir: Path,
                 log: Callable[[str], None] = print) -> Dataset:
    """d: the config's DataConfig; resolve: a path relative to the config file -> Path;
    cache_dir: the image-folder decode cache's default folder (data.cache_dir overrides it)."""
    if d.dataset == "fashion_mnist":
        return fashion_mnist(resolve(d.root))
    if d.dataset == "synthetic":
        return synthetic(**d.synthetic.model_dump(), seed=seed)
    if d.dataset == "image_folder":
        from calib.image_folder import image_folder
        return image_folder(resolve(d.root), d.transform, d.split,
                            resolve(d.cache_dir) if d.cache_dir else cache_dir, log)
    root = resolve(d.root) if "root" in d.model_fields_set else None
    return call_factory(d.dataset, config_dir, root, d.kwargs)


def where(d, data: Dataset) -> str:
    """How an error names the data: the factory, the folder, or the built-in set."""
    if ":" in d.dataset:
        return f"data.dataset={d.dataset!r}"
    return f"data.root={d.root}" if d.dataset == "image_folder" else f"data.dataset={d.dataset}"


def limits(d) -> dict[str, Optional[int]]:
    """The data fields that draw subsets; calib_samples counts only where the user set it (the
    default, 1024, is capped at the training split) and calibration uses real images."""
    own = "calib_samples" in d.model_fields_set and d.calibration == "real"
    return {"limit_train": d.limit_train, "limit_test": d.limit_test,
            "calib_samples": d.calib_samples if own else None}


def check(data: Dataset, d, task: str = "classification") -> list[str]:
    """Every problem of the loaded (not yet subset) data, one line each; labels of other tasks
    are checked by their task (compress/tasks.py: check_labels)."""
    at = where(d, data)
    errors = check_images(data, at)
    if task == "classification":
        # the built-in synthetic set draws labels at random: a tiny split may miss a class
        errors += check_classification(data, at, require_all_classes=d.dataset != "synthetic")
    errors += check_limits({"train": len(data.train), "test": len(data.test)}, limits(d))
    return errors


def load_checked(d, seed: int, resolve, config_dir: Path, cache_dir: Path, log=print,
                 task: str = "classification") -> Dataset:
    data = load_dataset(d, seed, resolve, config_dir, cache_dir, log)
    errors = check(data, d, task)
    if errors:
        raise UserError("\n".join(errors))
    return data
