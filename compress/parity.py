"""The first diverging layer: when a deployment fails parity, compare each compute layer's
output on the runtime with the torch model's, on one batch, in graph order.

Mapping ONNX nodes to torch modules by name does not work for every export: float exports
keep module paths (/layers/layers.0/conv1/Conv) but brevitas' QCDQ export of an fx graph
flattens them (/conv1_1/Conv). Both exporters trace the forward pass, so the order of
compute nodes in the (topologically sorted) graph is the order the compute modules ran;
we pair them in that order and check every pair's output shape, so a mismatch is reported
as "not mapped" instead of producing a wrong name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
from torch import nn

from compress.onnx_graph import consumers
from targets import base

ONNX_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
TORCH_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)  # brevitas' Quant* subclass these
TORCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def onnx_points(model: onnx.ModelProto) -> list[dict]:
    """One comparison point per compute node: its output, or the output of the
    BatchNormalization / bias Add that follows it alone (torch's exporter folds eval-mode BN
    into the Conv; an unfolded one is compared after the BN, like the torch side)."""
    inits = {i.name for i in model.graph.initializer}
    users = consumers(model.graph)
    points = []
    for n in model.graph.node:
        if n.op_type not in ONNX_COMPUTE:
            continue
        tensor, nxt = n.output[0], users.get(n.output[0], [])
        if len(nxt) == 1 and (nxt[0].op_type == "BatchNormalization" or (
                n.op_type == "MatMul" and nxt[0].op_type == "Add" and any(i in inits for i in nxt[0].input))):
            tensor = nxt[0].output[0]
        points.append({"node": n.name or tensor, "op": n.op_type, "tensor": tensor})
    return points


def _value(t):
    return t.value if hasattr(t, "value") else t  # brevitas QuantTensor -> its float tensor


@torch.no_grad()
def torch_points(model: nn.Module, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(qualified module name, output) of each compute module in the order it ran; a
    BatchNorm applied directly to that output replaces it (see onnx_points)."""
    records: list[list] = []

    def on_compute(name):
        return lambda m, i, out: records.append([name, _value(out)])

    def on_norm(m, inp, out):
        if records and _value(inp[0]) is records[-1][1]:
            records[-1][1] = _value(out)
    handles = [m.register_forward_hook(on_compute(n)) for n, m in model.named_modules()
               if isinstance(m, TORCH_COMPUTE)]
    handles += [m.register_forward_hook(on_norm) for m in model.modules() if isinstance(m, TORCH_NORM)]
    try:
        model.eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    finally:
        for h in handles:
            h.remove()
    return [(n, t.detach().float().numpy()) for n, t in records]


def runtime_outputs(backend: str, artifact: Path, tensors: list[str], x: np.ndarray,
                    cfg: base.CompileOptions) -> tuple[Optional[list], str]:
    """(the tensors as the backend computes them, "") or (None, why it cannot read them)."""
    try:
        return base.get(backend).intermediate_outputs(artifact, tensors, x, cfg), ""
    except NotImplementedError as e:
        return None, f"{backend} cannot read layer outputs: {e}"


def compare_layers(points: list[dict], ref: list, got: list) -> tuple[list[dict], str]:
    """Per pair, the relative error; a shape mismatch stops the comparison with the reason."""
    layers = []
    for p, (name, want), have in zip(points, ref, got):
        layer = {"module": name, "node": p["node"], "op": p["op"], "rel_error": None}
        if have is not None and np.shape(have) != want.shape:
            return layers, (f"shape of {p['node']} {list(np.shape(have))} differs from torch module "
                            f"{name} {list(want.shape)}: the graph and the model do not pair up")
        if have is not None:
            layer["rel_error"] = float(np.linalg.norm(have - want) / max(np.linalg.norm(want), 1e-12))
        layers.append(layer)
    return layers, ""


def diverging_layers(model: nn.Module, onnx_path: Path, artifact: Path, backend: str, x: np.ndarray,
                     tolerance: float, threads: int = 1, cfg: Optional[base.CompileOptions] = None) -> dict:
    """Relative error ||runtime - torch|| / ||torch|| per compute layer, read by the backend
    itself from `artifact` (what it compiled), and the first one over `tolerance` (None when
    every layer is within it). A backend that cannot read layer outputs says so in `reason`;
    no other backend stands in for it. cfg: the entry's compile options (threads from it)."""
    cfg = cfg or base.CompileOptions(threads=threads)
    points = onnx_points(onnx.load(str(onnx_path)))
    ref = torch_points(model, x)
    out = {"backend": backend, "tolerance": tolerance, "batch": int(len(x)), "mapped": False,
           "first_diverging": None, "layers": []}
    if len(points) != len(ref):
        out["reason"] = (f"{len(points)} compute nodes in {onnx_path.name} but {len(ref)} compute "
                         f"modules ran in torch: cannot pair them")
        return out
    got, why = runtime_outputs(backend, artifact, [p["tensor"] for p in points], x, cfg)
    if got is None:
        out["reason"] = why
        return out
    layers, why = compare_layers(points, ref, got)
    if why:
        return {**out, "layers": layers, "reason": why}
    first = next((lyr for lyr in layers if lyr["rel_error"] is not None and lyr["rel_error"] > tolerance), None)
    return {**out, "mapped": True, "layers": layers, "first_diverging": first}
