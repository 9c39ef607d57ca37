"""Exact rewrites ONNX Runtime's own optimizer leaves undone in a Q/DQ graph.

In a float graph ORT fuses SiLU, `x * Sigmoid(x)`, into its one-pass `com.microsoft.QuickGelu`
(alpha 1). Between a DequantizeLinear and a QuantizeLinear it does not (ORT 1.32), so an int8
MobileNet/EfficientNet runs each SiLU as two full passes over float memory. Measured on the zoo's
trained `mobilenet_small` (ORT, 1 thread, benchmarks/RESULTS.md "SiLU as QuickGelu"): the six SiLUs
took 1.28x longer unfused, the int8 graph went from 0.65x to 0.84x of its FP32 model's speed at
batch 64, and the logits were bit-identical (MLAS computes both with the same logistic kernel).
The rewrite is ORT-only: the contrib op does not load in OpenVINO or TensorRT, so it goes into
ORT's own artifact (`precision: speed`), never into the shared model.onnx.

A ReLU read by a QuantizeLinear whose zero point is not the lowest code (a signed quantizer
exported as uint8, zero point 128: ShuffleNetV2's branch convs, whose ReLU output shares the
signed quantizer of the concat it joins) keeps ORT from dropping the ReLU into the Q, so the
Conv runs float (FusedConv). Q(relu(x)) = max(Q(x), zero point) exactly (rounding is monotone
and Q(0) is the zero point), so Relu -> Q becomes Q -> Clip(min = zero point) on the integer
codes: ORT then fuses DQ -> Conv -> Q into QLinearConv and clips one byte per element.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

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


def _relu_before_quantizers(relu: onnx.NodeProto, cons: dict, inits: dict, outputs: set) -> bool:
    """`relu` is read only by QuantizeLinears, each with a constant per-tensor zero point above
    its type's lowest code (at the lowest code ORT drops the ReLU itself)."""
    users = cons.get(relu.output[0], [])
    if relu.op_type != "Relu" or not users or relu.output[0] in outputs:
        return False
    for q in users:
        zp = inits.get(q.input[2]) if q.op_type == "QuantizeLinear" and len(q.input) > 2 else None
        z = numpy_helper.to_array(zp) if zp is not None else None
        if z is None or z.size != 1 or z.item() == np.iinfo(z.dtype).min:
            return False
    return True


def relu_into_quantize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` with each Relu -> QuantizeLinear(zero point z > lowest code) as
    QuantizeLinear -> Clip(z, highest code), and {"ReLU as a clip of its codes": count}."""
    g = model.graph
    cons, inits, outputs = consumers(g), {i.name: i for i in g.initializer}, {o.name for o in g.output}
    relus = {r.output[0]: r.input[0] for r in g.node if _relu_before_quantizers(r, cons, inits, outputs)}
    if not relus:
        return model, {}
    out = copy.deepcopy(model)
    nodes = []
    for k, n in enumerate(out.graph.node):
        if n.op_type == "Relu" and n.output[0] in relus:  # gone: its Qs read its input
            continue
        nodes.append(n)
        if n.op_type == "QuantizeLinear" and n.input[0] in relus:
            z = numpy_helper.to_array(inits[n.input[2]])
            codes, lo, hi = f"{n.output[0]}_relu", f"relu_min_{k}", f"relu_max_{k}"
            out.graph.initializer.extend([numpy_helper.from_array(z.reshape(()), lo),
                                          numpy_helper.from_array(np.array(np.iinfo(z.dtype).max, z.dtype), hi)])
            nodes.append(helper.make_node("Clip", [codes, lo, hi], [n.output[0]], name=f"{n.name}_relu"))
            n.input[0], n.output[0] = relus[n.input[0]], codes
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, {"ReLU as a clip of its codes": len(relus)}


def exact_rewrites(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Every rewrite here, in turn, and what each did."""
    model, silu = fuse_silu(model)
    model, relu = relu_into_quantize(model)
    return model, {**silu, **relu}
