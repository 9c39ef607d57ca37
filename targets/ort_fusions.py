"""Exact rewrites ONNX Runtime's own optimizer leaves undone in a Q/DQ graph.

In a float graph ORT fuses SiLU, `x * Sigmoid(x)`, into its one-pass `com.microsoft.QuickGelu`
(alpha 1). Between a DequantizeLinear and a QuantizeLinear it does not (ORT 1.32), so an int8
MobileNet/EfficientNet runs each SiLU as two full passes over float memory. Measured on the zoo's
trained `mobilenet_small` (ORT, 1 thread, benchmarks/RESULTS.md "SiLU as QuickGelu"): the six SiLUs
took 1.28x longer unfused, the int8 graph went from 0.65x to 0.84x of its FP32 model's speed at
batch 64, and the logits were bit-identical (MLAS computes both with the same logistic kernel).
The rewrite is ORT-only: the contrib op does not load in OpenVINO or TensorRT, so it goes into
ORT's own artifact (`precision: speed`), never into the shared model.onnx.
"""
from __future__ import annotations

import copy

import onnx
from onnx import helper

from compress.onnx_graph import consumers, producers

MS_DOMAIN = "com.microsoft"


def _silu_input(mul: onnx.NodeProto, prod: dict, cons: dict, outputs: set) -> tuple[str, onnx.NodeProto] | None:
    """(x, the Sigmoid) when `mul` computes x * Sigmoid(x) and nothing else reads the Sigmoid."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    for x, s in (mul.input, mul.input[::-1]):
        sig = prod.get(s)
        if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x and len(cons[s]) == 1 \
                and s not in outputs:
            return x, sig
    return None


def fuse_silu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` with every x * Sigmoid(x) as one QuickGelu, and {"SiLU as QuickGelu":
    count} (or {} and the model itself when there is none)."""
    g = model.graph
    prod, cons, outputs = producers(g), consumers(g), {o.name for o in g.output}
    found = {id(mul): hit for mul in g.node if (hit := _silu_input(mul, prod, cons, outputs))}
    if not found:
        return model, {}
    out = copy.deepcopy(model)
    nodes, gone = [], {id(sig) for _, sig in found.values()}
    for old, new in zip(g.node, out.graph.node):
        if id(old) in gone:
            continue
        if id(old) in found:
            new = helper.make_node("QuickGelu", [found[id(old)][0]], list(old.output), name=f"{old.name}_silu",
                                   domain=MS_DOMAIN, alpha=1.0)
        nodes.append(new)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out, {"SiLU as QuickGelu": len(found)}
