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

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

ONNX_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
TORCH_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)  # brevitas' Quant* subclass these
TORCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def onnx_points(model: onnx.ModelProto) -> list[dict]:
    """One comparison point per compute node: its output, or the output of the
    BatchNormalization / bias Add that follows it alone (torch's exporter folds eval-mode BN
    into the Conv; an unfolded one is compared after the BN, like the torch side)."""
    inits = {i.name for i in model.graph.initializer}
    consumers = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    points = []
    for n in model.graph.node:
        if n.op_type not in ONNX_COMPUTE:
            continue
        tensor, nxt = n.output[0], consumers.get(n.output[0], [])
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


def _prefix(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """The part of the graph `tensor` depends on, with `tensor` as its only output."""
    producer = {o: n for n in model.graph.node for o in n.output}
    need, stack, seen = set(), [tensor], set()
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        need.add(id(n))
        stack.extend(i for i in n.input if i)
    nodes = [n for n in model.graph.node if id(n) in need]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "prefix", list(model.graph.input),
                              [helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None)],
                              [i for i in model.graph.initializer if i.name in used])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def ort_outputs(onnx_path: Path, tensors: list[str], x: np.ndarray, threads: int = 1) -> list:
    """Run the ONNX on ORT (optimizations on, as deployed) and read the tensors.

    A float graph: one session with the tensors as extra graph outputs. A Q/DQ graph: ORT
    will not fuse DequantizeLinear -> Conv -> QuantizeLinear into its int8 kernel when a
    tensor inside the group is a graph output (measured: 4 of 9 QLinearConv left), so each
    tensor is read from its own prefix of the graph, in which every earlier layer keeps its
    int8 kernel."""
    import onnxruntime as ort
    model = onnx.load(str(onnx_path))
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3

    def run(m: onnx.ModelProto, names: list[str]) -> list:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(names, {sess.get_inputs()[0].name: x})
    if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return [run(_prefix(model, t), [t])[0] for t in tensors]
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in dict.fromkeys(tensors) if t not in have)
    return run(model, tensors)


def openvino_outputs(ir_path: Path, tensors: list[str], x: np.ndarray, threads: int = 1) -> list:
    """Run the IR on the OpenVINO CPU plugin with the tensors (names kept from the ONNX by
    the converter) as extra outputs; a name the IR no longer has gives None. Unlike ORT, the
    CPU plugin keeps its int8 kernels with these outputs (measured on the demo's int8 IR: 10 of
    10 compute layers still *_I8)."""
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(ir_path))
    for t in tensors:
        try:
            model.add_outputs(t)
        except RuntimeError:
            pass
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                 "INFERENCE_NUM_THREADS": threads})
    res = compiled({0: x})
    by_name = {n: res[o] for o in compiled.outputs for n in o.get_names()}
    return [by_name.get(t) for t in tensors]


def diverging_layers(model: nn.Module, onnx_path: Path, runtime_path: Path, backend: str,
                     x: np.ndarray, tolerance: float, threads: int = 1) -> dict:
    """Relative error ||runtime - torch|| / ||torch|| per compute layer and the first one
    over `tolerance` (None when every layer is within it)."""
    points = onnx_points(onnx.load(str(onnx_path)))
    ref = torch_points(model, x)
    out = {"backend": backend, "tolerance": tolerance, "batch": int(len(x)), "mapped": False,
           "first_diverging": None, "layers": []}
    if len(points) != len(ref):
        out["reason"] = (f"{len(points)} compute nodes in {onnx_path.name} but {len(ref)} compute "
                         f"modules ran in torch: cannot pair them")
        return out
    tensors = [p["tensor"] for p in points]
    if backend == "openvino":
        got = openvino_outputs(runtime_path, tensors, x, threads)
    else:
        got = ort_outputs(onnx_path, tensors, x, threads)
    for p, (name, want), have in zip(points, ref, got):
        layer = {"module": name, "node": p["node"], "op": p["op"], "rel_error": None}
        if have is not None and np.shape(have) != want.shape:
            out["reason"] = (f"shape of {p['node']} {list(np.shape(have))} differs from torch module "
                             f"{name} {list(want.shape)}: the graph and the model do not pair up")
            return out
        if have is not None:
            layer["rel_error"] = float(np.linalg.norm(have - want) / max(np.linalg.norm(want), 1e-12))
        out["layers"].append(layer)
    out["mapped"] = True
    first = next((l for l in out["layers"] if l["rel_error"] is not None and l["rel_error"] > tolerance), None)
    out["first_diverging"] = first
    return out
