"""The TensorRT-ready ONNX: everything before the engine build, checkable without a GPU.

TensorRT 10/11 builds strongly typed networks: precision comes from the ONNX itself.
int8 comes from explicit quantization (Q/DQ), which TensorRT accepts only in a narrow
form (its ONNX operator table: DequantizeLinear takes INT8/FP8 with a zero zero-point);
fp16 comes from converting the float graph's types before the build.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from compress.onnx_graph import consumers, producers

QDQ = ("QuantizeLinear", "DequantizeLinear")
COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TRT_QUANT_TYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}


class TrtOnnxError(ValueError):
    pass


def _constants(graph) -> dict:
    out = {i.name: i for i in graph.initializer}
    out.update({n.output[0]: n.attribute[0].t for n in graph.node
                if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    return out


def fold_bias_dequantize(model: onnx.ModelProto) -> int:
    """DequantizeLinear of an int32 constant (brevitas' quantized bias) -> a float
    initializer with the same values. TensorRT has no INT32 DequantizeLinear; its int8
    kernels requantize a float bias themselves, so nothing is lost."""
    g, consts, keep, folded = model.graph, _constants(model.graph), [], 0
    for n in g.node:
        x = consts.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if x is not None and x.data_type == TensorProto.INT32:
            scale = numpy_helper.to_array(consts[n.input[1]]).astype(np.float64)
            zp = numpy_helper.to_array(consts[n.input[2]]) if len(n.input) > 2 and n.input[2] else 0
            val = numpy_helper.to_array(x).astype(np.float64)
            if np.ndim(scale) == 1 and val.ndim > 1:  # per-axis: scale along `axis`
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                shape = [1] * val.ndim
                shape[axis] = -1
                scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
            g.initializer.append(numpy_helper.from_array(((val - zp) * scale).astype(np.float32), n.output[0]))
            folded += 1
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return folded


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """What TensorRT's explicit quantization would reject or silently run in float, one
    line per offending node. Empty for a float graph (no Q/DQ at all)."""
    g = model.graph
    if not any(n.op_type in QDQ for n in g.node):
        return []
    consts = _constants(g)
    producer, users_of = producers(g), consumers(g)
    out_names = {o.name for o in g.output}
    problems = []
    for n in g.node:
        # a pair's zero point is checked once, at its QuantizeLinear (or a constant's DQ)
        if n.op_type == "QuantizeLinear" or (n.op_type == "DequantizeLinear" and n.input[0] in consts):
            zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if zp is None or zp.data_type not in TRT_QUANT_TYPES:
                kind = TensorProto.DataType.Name(zp.data_type) if zp is not None else "UINT8 (default)"
                problems.append(f"{n.op_type} '{n.name}': zero point type {kind}; TensorRT quantizes to "
                                f"INT8/FP8/INT4 only (quantize with `activations: signed`)")
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{n.op_type} '{n.name}': non-zero zero point; "
                                f"TensorRT takes symmetric quantization only")
        if n.op_type == "QuantizeLinear":
            users = users_of.get(n.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users) or n.output[0] in out_names:
                problems.append(f"QuantizeLinear '{n.name}': dangling, its output feeds "
                                f"{[u.op_type for u in users] or 'nothing'} instead of only DequantizeLinear")
        elif n.op_type == "DequantizeLinear":
            src = producer.get(n.input[0])
            if n.input[0] not in consts and (src is None or src.op_type != "QuantizeLinear"):
                problems.append(f"DequantizeLinear '{n.name}': its input comes from "
                                f"{src.op_type if src else 'a graph input'}, "
                                f"not a QuantizeLinear or quantized constant")
        elif n.op_type in COMPUTE:
            for i, what in ((0, "data input"), (1, "weight")):
                src = producer.get(n.input[i])
                if src is None or src.op_type != "DequantizeLinear":
                    problems.append(f"{n.op_type} '{n.name}': {what} '{n.input[i]}' does not come from a "
                                    f"DequantizeLinear; TensorRT would run this layer in float")
    return problems


def toposort(graph) -> None:
    """Stable topological order (Kahn): ORT's fp16 converter appends its input Casts at the
    end of the node list, which onnx.checker and TensorRT's parser reject."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        left = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise TrtOnnxError(f"graph has a cycle or an undefined input at node '{left[0].name}'")
        for n in done:
            ready.update(n.output)
        ordered += done
        pending = left
    del graph.node[:]
    graph.node.extend(ordered)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float graph -> fp16 types, inputs/outputs kept float32 (TensorRT 11 has no fp16
    builder flag: a strongly typed network runs in the types the ONNX holds)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(model, keep_io_types=True)
    toposort(model.graph)
    return model


def make_trt_ready(src: Path, dst: Path, fp16: bool = False) -> dict:
    """Write the ONNX TensorRT will parse; raise TrtOnnxError naming the file and every
    offending node when it would not build as asked."""
    model = onnx.load(str(src))
    quantized = any(n.op_type in QDQ for n in model.graph.node)
    folded = fold_bias_dequantize(model) if quantized else 0
    problems = qdq_problems(model)
    if problems:
        raise TrtOnnxError(f"{src}: Q/DQ placement is not what TensorRT's explicit quantization "
                           f"expects:\n  - " + "\n  - ".join(problems))
    if fp16 and not quantized:
        model = to_fp16(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise TrtOnnxError(f"{src}: the TensorRT-ready graph fails onnx.checker: {e}") from e
    from compress.checkpoint import atomic_write  # a build interrupted mid-write leaves no half file
    atomic_write(Path(dst), lambda tmp: onnx.save(model, str(tmp)))
    return {"path": str(dst), "precision": "int8" if quantized else ("fp16" if fp16 else "fp32"),
            "bias_dequantize_folded": folded}


def max_diff_in_ort(a: Path, b: Path, x: np.ndarray) -> float:
    """Largest |output difference| of two ONNX files on ORT CPU: the TRT-ready graph must
    compute what the exported one does before a GPU ever sees it."""
    import onnxruntime as ort
    outs = []
    for p in (a, b):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0].astype(np.float32))
    return float(np.abs(outs[0] - outs[1]).max())
