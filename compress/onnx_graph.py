"""Who produces and who consumes each tensor of an ONNX graph: the maps every graph pass
(export's Clip folding, parity's comparison points, 2:4 checks, TensorRT-readiness) reads."""
from __future__ import annotations

from collections import defaultdict

import onnx


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it (graph inputs and initializers have none)."""
    return {o: n for n in graph.node for o in n.output if o}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def trace_back(graph: onnx.GraphProto, tensor: str, through: tuple[str, ...],
               producer: dict[str, onnx.NodeProto] | None = None) -> str:
    """Follow `tensor` upstream through nodes of the given op types (first input each):
    a QCDQ weight `W -> Clip -> DequantizeLinear` traces back to `W`."""
    producer = producer if producer is not None else producers(graph)
    while tensor in producer and producer[tensor].op_type in through:
        tensor = producer[tensor].input[0]
    return tensor
