"""The ONNX rewrites behind `precision: speed`: named compute layers of an int8 Q/DQ graph
kept float (their weights dequantized once into float initializers, their activation Q/DQ
kept), or the whole graph float (every activation Q/DQ pair removed too). compress/
speed_precision.py decides by timing which candidate a deployment gets; these build them.
"""
from __future__ import annotations

import copy
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from compress.onnx_graph import consumers, producers

COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _weight_dq(tensor: str, prod: dict, inits: dict) -> Optional[onnx.NodeProto]:
    """The DequantizeLinear that makes `tensor` from an integer initializer, or None."""
    n = prod.get(tensor)
    return n if n is not None and n.op_type == "DequantizeLinear" and n.input[0] in inits else None


def quantized_layers(model: onnx.ModelProto) -> list[str]:
    """Compute nodes (in graph order) whose weight is a DequantizeLinear of an integer initializer:
    the layers a runtime can run in int8, and so the layers that may be kept float."""
    g = model.graph
    prod, inits = producers(g), {i.name for i in g.initializer}
    return [n.name for n in g.node if n.op_type in COMPUTE and len(n.input) > 1
            and _weight_dq(n.input[1], prod, inits) is not None]


def _dequantized(dq: onnx.NodeProto, inits: dict) -> np.ndarray:
    """DequantizeLinear(q, scale, zero point, axis) in numpy, as ONNX Runtime computes it:
    float32(q - zp) * scale, per-tensor or per-channel along `axis`."""
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
    s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    z = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int64) if len(dq.input) > 2 and dq.input[2] else 0
    if np.ndim(s) == 1 and q.ndim > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        s = s.reshape(shape)
        z = np.reshape(z, shape) if np.ndim(z) == 1 else z
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read (the weight DQs a rewrite bypassed), then
    initializers nothing reads."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        live = [n for n in g.node if any(o in used for o in n.output)]
        if len(live) == len(g.node):
            break
        del g.node[:]
        g.node.extend(live)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _in_channels(n: onnx.NodeProto, w: np.ndarray) -> int:
    attr = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    if n.op_type == "Conv":
        return w.shape[1] * attr.get("group", 1)
    if n.op_type == "ConvTranspose":
        return w.shape[0]
    return w.shape[1] if attr.get("transB", 0) and n.op_type == "Gemm" else w.shape[0]


def _per_channel_input(g: onnx.GraphProto, n: onnx.NodeProto, prod: dict, inits: dict) -> None:
    """Read the layer's activation through its own DequantizeLinear with the per-tensor scale and
    zero point repeated per channel (axis 1): the same numbers, but ONNX Runtime's
    WeightBiasQuantization (onnxruntime/core/optimizer/qdq_transformer/weight_bias_quantization.cc)
    re-quantizes the float weight of any Conv/Gemm whose input is a per-tensor DQ, per-tensor
    int8 (other numbers, and an int8 kernel again); it leaves a per-channel input alone."""
    dq = prod.get(n.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits or len(dq.input) < 3:
        return
    s, z = (numpy_helper.to_array(inits[t]) for t in dq.input[1:3])
    if s.size != 1:
        return
    c = _in_channels(n, _dequantized(prod[n.input[1]], inits))
    names = [f"{n.name}_float_x_scale", f"{n.name}_float_x_zp", f"{n.name}_float_x"]
    at, make = list(g.node).index(n), onnx.helper.make_node
    q = prod.get(dq.input[0])
    after_concat = q is not None and q.input[0] in prod and prod[q.input[0]].op_type == "Concat"
    if c > 1 and not after_concat:
        g.initializer.extend([numpy_helper.from_array(np.full(c, s.item(), s.dtype), names[0]),
                              numpy_helper.from_array(np.full(c, z.item(), z.dtype), names[1])])
        nodes = [make("DequantizeLinear", [dq.input[0], *names[:2]], [names[2]], name=names[2], axis=1)]
    else:  # one channel (a grey-image stem): a scale of shape [1] counts as per-tensor; after a
        # Concat, OpenVINO 2026.4's MoveFakeQuantize moves a per-channel FakeQuantize into the
        # Concat's inputs and fails on the channel count. Spell the DQ out instead:
        # float(q) - zp, times scale (exact: integers below 2^24, then one rounding)
        g.initializer.extend([numpy_helper.from_array(s.astype(np.float32).reshape(()), names[0]),
                              numpy_helper.from_array(z.astype(np.float32).reshape(()), names[1])])
        cast, sub = f"{names[2]}_cast", f"{names[2]}_sub"
        nodes = [make("Cast", [dq.input[0]], [cast], name=cast, to=onnx.TensorProto.FLOAT),
                 make("Sub", [cast, names[1]], [sub], name=sub),
                 make("Mul", [sub, names[0]], [names[2]], name=names[2])]
    for k, node in enumerate(nodes):
        g.node.insert(at + k, node)
    n.input[0] = names[2]


def keep_float(model: onnx.ModelProto, layers: Iterable[str], own_input_dq: bool = True) -> onnx.ModelProto:
    """A copy of the Q/DQ graph in which the named compute layers read float weights and bias
    (their DequantizeLinear computed once, into an initializer): no runtime can pick an int8
    kernel for them, and each computes what the int8 graph's reference semantics compute."""
    out = copy.deepcopy(model)
    g, wanted = out.graph, set(layers)
    unknown = wanted - set(quantized_layers(model))
    if unknown:
        raise ValueError(f"not quantized compute layers of this graph: {sorted(unknown)}")
    prod, inits = producers(g), {i.name: i for i in g.initializer}
    for n in list(g.node):
        if n.name not in wanted:
            continue
        if own_input_dq:  # float_graph removes the input's Q/DQ altogether
            _per_channel_input(g, n, prod, inits)
        for k in range(1, len(n.input)):  # weight, bias: every input made from an initializer
            dq = _weight_dq(n.input[k], prod, inits)
            if dq is not None:
                name = f"{n.name}_float_in{k}"
                g.initializer.append(numpy_helper.from_array(_dequantized(dq, inits), name))
                n.input[k] = name
    _drop_dead(g)
    return out


WHOLE = "*"  # the candidate "every layer float, activation Q/DQ removed too"


def float_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every layer float and every activation QuantizeLinear -> DequantizeLinear pair removed:
    the float network with the quantized weights' values. Where a runtime has no int8 kernel
    for the activations between layers (ONNX Runtime runs a Q/DQ MobileNet's SiLU and Hardswish
    as DQ -> Sigmoid -> Mul -> Q in float, unfused: 2.6x the time of the float graph's fused
    QuickGelu, benchmarks/int8_layers.py), keeping only the convolutions float cannot win, but
    this can. Its numbers differ from the int8 graph's by the activation rounding: the parity
    gate judges it like any other artifact."""
    out = keep_float(model, quantized_layers(model), own_input_dq=False)
    g = out.graph
    cons, inits = consumers(g), {i.name for i in g.initializer}
    to = {}  # a pair's DQ output -> the Q's float input
    for q in g.node:
        users = cons.get(q.output[0], []) if q.op_type == "QuantizeLinear" else []
        if users and q.input[0] not in inits and all(u.op_type == "DequantizeLinear" for u in users):
            to.update({u.output[0]: q.input[0] for u in users})
    for name in list(to):  # chains (a requantization Q -> DQ -> Q -> DQ) end at the first float tensor
        while to[name] in to:
            to[name] = to[to[name]]
    for n in g.node:
        for k, i in enumerate(n.input):
            n.input[k] = to.get(i, i)
    keep = [n for n in g.node if n.output[0] not in to]  # the pairs' DQs; their Qs go as dead nodes
    del g.node[:]
    g.node.extend(keep)
    for o in g.output:  # an output made by a removed DQ: an Identity of the float tensor
        if o.name in to:
            g.node.append(onnx.helper.make_node("Identity", [to[o.name]], [o.name], name=f"{o.name}_float"))
    _drop_dead(g)
    return out


def candidate(model: onnx.ModelProto, floats: frozenset) -> onnx.ModelProto:
    return float_graph(model) if WHOLE in floats else keep_float(model, floats)
