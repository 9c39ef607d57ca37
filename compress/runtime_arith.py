"""Arithmetic a runtime changes on purpose, emulated in torch, so that the parity gate can tell a
known fusion from a wrong artifact.

OpenVINO's CPU plugin fuses a residual Add into the convolution that feeds it (a sum post-op)
and does not apply that convolution's output quantizer first: it computes Q(conv + r) where the
Q/DQ graph, and the torch model it came from, compute Q(Q(conv) + r). Its execution graph says
so: the fused layer lists the convolution, that QuantizeLinear and the Add. Found on torchvision's
MobileNetV3-small int8 (examples/fashion_mnist_folder.yaml): 20% of the first fused Add's outputs
one step apart from ONNX Runtime's, top-1 agreement with torch 0.9535; against the same graph
without those quantizers 0.9980 (benchmarks/RESULTS.md, "OpenVINO's fused residual adds").

The emulation is the brevitas fx graph with the quantizer between each fused convolution and its
add bypassed; everything else, the other branch's quantizer included, stays as trained.
"""
from __future__ import annotations

import copy
import operator
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
from torch import nn

from compress.parity import onnx_points, torch_points

ADDS = {operator.add, operator.iadd, torch.add}


def fused_sum_modules(model: nn.Module, onnx_path: Path, fused: list[list[str]], x: np.ndarray) -> list[str]:
    """Torch compute modules whose ONNX node the runtime fused with an Add. fused: per runtime
    layer that fused an Add, the graph node names it fused. ONNX nodes pair with torch modules
    in the order they ran (compress/parity.py); no pairing, no modules."""
    points, ran = onnx_points(onnx.load(str(onnx_path))), torch_points(model, x[:1])
    if len(points) != len(ran):
        return []
    names = {n for group in fused for n in group}
    return [module for p, (module, _) in zip(points, ran) if p["node"] in names]


def _as_float(t):
    return t.value if hasattr(t, "value") else t  # brevitas QuantTensor -> its float tensor


def without_sum_requant(model: nn.Module, modules: list[str]) -> tuple[Optional[nn.Module], int]:
    """A copy of the fx graph model in which each listed module's output goes into its add
    without the quantizer between them (-> (copy, adds changed); (None, 0) where none could be).
    Both inputs of a changed add are taken as float tensors: brevitas adds QuantTensors only when
    their scales are equal, which the bypassed one's no longer is."""
    if not hasattr(model, "graph") or not modules:
        return None, 0
    twin, changed = copy.deepcopy(model), 0
    mods = dict(twin.named_modules())
    for node in list(twin.graph.nodes):
        quant = _only_user(node) if node.op == "call_module" and node.target in modules else None
        if quant is None or quant.op != "call_module":
            continue
        end = quant  # timm leaves nn.Identity modules (drop, act, drop_path) between it and the add
        while _is_identity(_only_user(end), mods):
            end = _only_user(end)
        add = _only_user(end)
        if add is None or not (add.target in ADDS or (add.op == "call_method" and add.target == "add")):
            continue
        with twin.graph.inserting_before(add):
            add.args = tuple(twin.graph.call_function(_as_float, (node if a is end else a,))
                             if hasattr(a, "users") else a for a in add.args)  # brevitas' backported fx Node
        while end is not node:  # the quantizer and the identities after it, now unused
            prev = end.args[0]
            twin.graph.erase_node(end)
            end = prev
        changed += 1
    if not changed:
        return None, 0
    twin.graph.lint()
    twin.recompile()
    return twin, changed


def _is_identity(node, mods: dict) -> bool:
    return node is not None and node.op == "call_module" and isinstance(mods.get(node.target), nn.Identity)


def _only_user(node):
    return next(iter(node.users)) if node is not None and len(node.users) == 1 else None


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray, batch: int) -> np.ndarray:
    model.eval()
    return np.concatenate([_as_float(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch], np.float32))))
                           .float().numpy() for i in range(0, len(x), batch)])


def fused_sum_check(model: nn.Module, onnx_path: Path, runner, x: np.ndarray, batch: int) -> Optional[dict]:
    """Where the runner's execution graph fused residual adds that the model re-quantizes before
    adding: {"adds", "modules", "logits", "twin"}: torch computing the same, and its logits on x; else None."""
    fused = (getattr(runner, "info", None) or {}).get("fused_sums") or []
    if not fused:
        return None
    modules = fused_sum_modules(model, onnx_path, fused, x)
    twin, changed = without_sum_requant(model, modules)
    if twin is None:
        return None
    return {"adds": changed, "modules": modules, "logits": torch_logits(twin, x, batch), "twin": twin}



@torch.no_grad()
def float_activation_logits(model: nn.Module, x: np.ndarray, batch: int) -> Optional[np.ndarray]:
    """What the whole graph in float (compress/keep_float.float_graph: every activation Q/DQ pair
    removed, weights dequantized) computes, in torch: the brevitas model with its activation and
    bias quantizers off, its weights still quantized. None for a model without quantizers.
    Measured on timm's MobileNetV3 (2,000 images): ORT on the float graph agrees with this on
    0.9990 of top-1 and with the int8 model on 0.9325 (benchmarks/RESULTS.md)."""
    from brevitas.graph.calibrate import quantization_status_manager
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector
    if not any(isinstance(m, ActQuantProxyFromInjector) for m in model.modules()):
        return None
    with quantization_status_manager(model, disable_act_quant=True, disable_bias_quant=True, is_training=False):
        return torch_logits(model, x, batch)
