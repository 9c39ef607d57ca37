"""Artifacts on disk: atomic writes, weights without pickled modules, structure as data.

A model is stored as (structure.json, model.safetensors). structure.json names the
factory and records every changed module shape and the quantizer settings, so loading is
"build from the factory, re-apply the recorded changes, load tensors" and never unpickles
a module (the failure mode of Torch-Pruning #139).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the file and the mismatch."""


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: readers never see a
    half-written artifact, and an interrupted run leaves the old one intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        fsync(tmp)  # on disk before the rename: a power loss leaves the old file or the whole new one
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual mode
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _self_digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _covered(folder: Path, files) -> list[str]:
    """The files and, for an OpenVINO .xml, the .bin that holds its weights."""
    out = []
    for f in files:
        out.append(f)
        if f.endswith(".xml") and (folder / f).with_suffix(".bin").is_file():
            out.append(str(Path(f).with_suffix(".bin")))
    return out


def write_sealed(path: Path, record: dict, files=()) -> dict:
    """Write a JSON record (metrics.json, manifest.json) that carries the sha256 of `files` (names
    in its folder) and of its own content: written last, it vouches for what it describes."""
    record = json.loads(json.dumps(record, default=str))  # the form it is read back in
    record["digests"] = {f: file_sha256(path.parent / f) for f in _covered(path.parent, files)}
    record["digest"] = _self_digest(record)
    write_json(path, record)
    return record


def read_sealed(path: Path) -> tuple[Optional[dict], str]:
    """(record, "") when `path` and every file it vouches for are intact, else (None, why).
    Records written before digests existed carry none and are returned as they are."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, ValueError) as e:
        return None, f"{path.name} is unreadable (truncated or edited by hand: {type(e).__name__})"
    if not isinstance(record, dict):
        return None, f"{path.name} is not a JSON object"
    if "digest" not in record:
        return record, ""
    if record["digest"] != _self_digest(record):
        return None, f"{path.name} was changed after it was written (its digest does not match)"
    for f, digest in (record.get("digests") or {}).items():
        p = path.parent / f
        if not p.is_file():
            return None, f"{f} is missing"
        if file_sha256(p) != digest:
            return None, f"{f} is not the file {path.name} was written for (sha256 differs)"
    return record, ""


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    # clone(): safetensors refuses tensors that share storage (e.g. tied or viewed params)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata=metadata))


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}\0{v.dtype}\0{list(v.shape)}\0".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_sealed_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A cache file (safetensors) carrying the sha256 of its tensors in its metadata."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), "sha256": _tensor_digest(tensors)}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_sealed_tensors(path: Path, log, what: str) -> Optional[dict[str, torch.Tensor]]:
    """A cache file's tensors, or None (the file removed, one line why) when it is unreadable or
    its tensors are not those it was written with: the caller builds it again."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        why = "" if meta.get("sha256", _tensor_digest(tensors)) == _tensor_digest(tensors) else "its digest differs"
    except Exception as e:  # safetensors raises its own error types
        why = f"unreadable ({type(e).__name__})"
    if why:
        log(f"  {what}: {path.name} is {why}: building it again")
        path.unlink(missing_ok=True)
        return None
    return tensors


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, refused at load (naming the file, and the tensor) when the file is
    empty, unreadable, not a state_dict, or holds NaN/inf weights (they would train on `loss nan`)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        try:
            obj = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    else:
        obj = _torch_state(path)
    bad = next((k for k, v in obj.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or inf values; expected finite weights "
                              f"(a diverged training run?)")
    return obj


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot load with weights_only=True ({_first_line(e)}). Expected a state_dict of "
            f"tensors; save one with torch.save(model.state_dict(), path) or safetensors.") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (name -> tensor)")
    return obj


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that names what does not fit, and where."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or wrong):
        model.load_state_dict(state, strict=True)
        return
    try:
        # Some modules own state created lazily (brevitas' calibrated activation scales):
        # their _load_from_state_dict accepts keys a fresh state_dict() does not list yet.
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError:
        pass
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(f"shape mismatch: {'; '.join(wrong[:3])}")
    raise CheckpointError(f"{source}: does not fit the model: {'; '.join(parts)}")


_SHAPE_ATTRS = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
    nn.LayerNorm: ("normalized_shape",),
}
# integer attributes a module's forward reads to reshape (timm-style attention): pruning
# heads changes them, so they are recorded with the shapes
_FORWARD_ATTRS = ("num_heads", "head_dim", "attn_dim")  # attn_dim: timm >= 1.0 Attention


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def record_shapes(model: nn.Module) -> dict[str, dict]:
    """Per-module structural attributes and tensor shapes, by qualified name."""
    out = {}
    for name, m in model.named_modules():
        attrs = next((a for t, a in _SHAPE_ATTRS.items() if type(m) is t), ())
        values = {a: getattr(m, a) for a in attrs}
        values.update({a: getattr(m, a) for a in _FORWARD_ATTRS if isinstance(getattr(m, a, None), int)})
        tensors = {k: list(v.shape) for k, v in
                   list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
                   if v is not None}
        if values or tensors:
            out[name] = {"type": type(m).__name__, "attrs": values, "tensors": tensors}
    return out


def apply_shapes(model: nn.Module, shapes: dict[str, dict], removed: list[str] = ()) -> nn.Module:
    """Resize modules of a freshly built model to recorded (pruned) shapes; blocks removed
    by block pruning become identities first."""
    for name in removed:
        set_module(model, name, nn.Identity())
    modules = dict(model.named_modules())
    for name, rec in shapes.items():
        m = modules.get(name)
        if m is None or type(m).__name__ != rec["type"]:
            raise CheckpointError(f"structure: module {name!r} ({rec['type']}) is not in "
                                  f"the model built by its factory")
        for a, v in rec["attrs"].items():
            setattr(m, a, tuple(v) if isinstance(v, list) else v)  # JSON turned tuples into lists
        for k, shape in rec["tensors"].items():
            old = getattr(m, k)
            new = torch.zeros(shape, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                setattr(m, k, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                m.register_buffer(k, new)
    return model
