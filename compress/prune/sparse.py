"""2:4 semi-structured sparsity (NVIDIA's sparse tensor-core pattern, as in GPUSQ-ViT): in
every group of 4 consecutive weights along the input channels, at least 2 are zero.

The pattern is chosen once by magnitude (keep the 2 largest of 4), then its mask is fixed:
every later optimizer step (recovery, distillation, QAT) re-applies it, BN merging only
scales rows, and symmetric int8 quantization maps 0 to 0, so the exported weights keep the
pattern. The export checks this and the manifest records it for a TensorRT build
(which can then pick sparse kernels)."""
from __future__ import annotations

import fnmatch

import numpy as np
import torch
from torch import nn

from compress.errors import UserError

PATTERN = "2:4"


def _rows(w: torch.Tensor) -> torch.Tensor:
    """Conv [O, I, kh, kw] -> [O, kh*kw*I] with input channels innermost (the layout
    sparse kernels group), Linear [O, I] unchanged."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w


def eligible(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() not in (2, 4):
        return False
    return getattr(m, "groups", 1) == 1 and w.shape[1] % 4 == 0


def select(model: nn.Module, patterns: list[str]) -> list[str]:
    """Module names matching the patterns; a pattern that matches no eligible layer fails
    with the eligible names, so a typo never silently leaves a model dense."""
    names = [n for n, m in model.named_modules() if n and eligible(m)]
    chosen = []
    for p in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, p)]
        if not hit:
            raise UserError(f"prune.semi_structured: {p!r} matches no Conv2d/Linear layer with "
                            f"groups=1 and input channels divisible by 4 (eligible: "
                            f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''})")
        chosen += [n for n in hit if n not in chosen]
    return chosen


def mask_2of4(w: torch.Tensor) -> torch.Tensor:
    rows = _rows(w.detach())
    groups = rows.abs().reshape(rows.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(2, dim=2).indices, True)
    keep = keep.reshape(rows.shape)
    if w.dim() == 4:
        o, i, kh, kw = w.shape
        keep = keep.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    return keep


def apply(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for n in names:
            w = modules[n].weight
            w.mul_(mask_2of4(w).to(w.dtype))


def holds(w: np.ndarray | torch.Tensor) -> bool:
    w = torch.tensor(np.asarray(w)) if not isinstance(w, torch.Tensor) else w  # a copy: onnx arrays are read-only
    if w.dim() not in (2, 4) or w.shape[1] % 4:
        return False
    return bool(((_rows(w) == 0).reshape(w.shape[0], -1, 4).sum(2) >= 2).all())


class MaskKeeper:
    """A training-loop callback: the current zeros of each sparse layer, taken when training
    starts (on the device the loop placed the model on), re-applied after every optimizer
    step. Layers are looked up by qualified name, which brevitas' graph quantization keeps."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.masks: dict[str, torch.Tensor] = {}
        self.modules: dict[str, nn.Module] = {}

    def on_train_start(self, state) -> None:
        modules = dict(state.model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise UserError(f"structure: sparse layers {missing} are not in the model")
        self.modules = {n: modules[n] for n in self.names}
        # in the weight's dtype: a multiply, not a conversion, at every step
        self.masks = {n: (m.weight != 0).to(m.weight.dtype) for n, m in self.modules.items()}

    @torch.no_grad()
    def on_step_end(self, state) -> None:
        for n, m in self.modules.items():
            m.weight.mul_(self.masks[n])


PASS_THROUGH = ("DequantizeLinear", "Clip", "Identity")  # ops between a weight initializer and its Conv/Gemm


def onnx_weights(path) -> list[tuple[str, np.ndarray]]:
    """(node name, weight) of every Conv/Gemm in an exported graph, the weight traced
    through DequantizeLinear to its initializer (QCDQ exports); Gemm weights as [O, I]."""
    import onnx
    from onnx import numpy_helper
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 2:
            continue
        src = n.input[1]
        while src not in inits and src in producer and producer[src].op_type in PASS_THROUGH:
            src = producer[src].input[0]
        if src in inits:
            w = inits[src]
            if n.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in n.attribute):
                w = w.T
            out.append((n.name, w))
    return out


def verify_export(path, expected: list[str]) -> dict:
    """How many of the exported Conv/Gemm weights hold 2:4; fails when fewer than the
    layers made sparse (a later step broke the masks, or the exporter rewrote weights)."""
    holding = [name for name, w in onnx_weights(path) if holds(w)]
    if len(holding) < len(expected):
        raise UserError(f"{path}: {len(expected)} layers were made 2:4 sparse "
                        f"({', '.join(expected)}) but only {len(holding)} exported weights hold the pattern")
    return {"pattern": PATTERN, "layers": expected, "exported_nodes_holding": holding}
