"""Artifacts on disk: atomic writes, weights without pickled modules, structure as data.

A model is stored as (structure.json, model.safetensors). structure.json names the
factory and records every changed module shape and the quantizer settings, so loading is
"build from the factory, re-apply the recorded changes, load tensors" and never unpickles
a module (the failure mode of Torch-Pruning #139).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    # clone(): safetensors refuses tensors that share storage (e.g. tied or viewed params)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata=metadata))


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
