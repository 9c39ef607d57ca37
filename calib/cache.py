"""The decode cache of image folders: the decoded, resized pixels of every file, stored once as
one safetensors file and reused while the files and the decode settings are unchanged.

Key: the files' relative paths, sizes and modification times (st_mtime_ns), the class list, the
decode settings and Pillow's version. Not a hash of the contents: that reads every byte of every
file on every run (a full pass over 70,000 PNGs is most of what the cache saves), while size +
mtime is the test make, rsync and git use. A false miss (a `touch`, a copy without -p) only
decodes again; it never reruns a stage, since resume hashes the decoded arrays
(calib.checks.data_digest). A false hit needs a file rewritten with the same size and its mtime
set back, which no ordinary tool does. Written to a temp file and renamed, so an interrupted
run never leaves a half-written cache behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

CACHE_VERSION = 1  # bump when what a cache file holds, or how pixels are decoded, changes


def cache_key(root: Path, files: list[tuple[str, int, int]], settings: dict) -> str:
    """files: (path under root, size, mtime_ns); paths count relative to root, so a moved
    folder (mv keeps mtimes) still hits."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, settings], sort_keys=True, default=str).encode())
    prefix = os.path.join(str(root), "")
    for path, size, mtime in files:
        rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
        h.update(f"{rel.replace(os.sep, '/')}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:20]


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"image-folder-{key}.safetensors"


def read(path: Path) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
    """(tensors, metadata), or None when there is no usable cache file."""
    if not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception:  # unreadable (disk trouble): decode again and rewrite it
        return None


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    from compress.checkpoint import atomic_write
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"meta": json.dumps(meta)}))
