"""ONNX export (float, or QCDQ for brevitas-quantized models), graph clean-up for the
runtimes, each target's own artifact prepared from the ONNX, and the deployment manifest
beside them."""
from __future__ import annotations

import copy
import functools
import importlib.metadata as md
import warnings
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compress.checkpoint import atomic_write, write_json
from compress.errors import UserError
from compress.onnx_graph import consumers, producers
from compress.quantize.inference import is_quantized

INPUT, OUTPUT = "input", "logits"
# Both exports use torch's TorchScript-based exporter (dynamo=False): brevitas' QCDQ
# export rejects quantized bias under dynamo, and the dynamo exporter silently keeps
# opset 18 and writes weights to a side .onnx.data file unless told otherwise.
_DYNAMIC = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
# Part of every stage's export hash (compress.plan): bumped when the same model and settings
# export a different graph, so the exports of earlier runs are made again, not reused.
# 1: unversioned; 2: uint8 activation Q/DQ for ORT, Q/DQ in front of Concat/MaxPool-fed layers;
# 3: int8 exports at export.opset (were brevitas' 13), torch transformer blocks exported explicit
EXPORT_FORMAT = 3


class ExportError(UserError):
    pass


def _exportable(model: nn.Module) -> nn.Module:
    """torch's transformer blocks as explicit attention (a copy, same numbers): their fast
    path (aten::_transformer_encoder_layer_fwd) and SDPA have no ONNX export."""
    from compress.quantize.attention import has_torch_attention, rewrite
    if not has_torch_attention(model):
        return model
    model = copy.deepcopy(model)
    rewrite(model)
    return model


def export_float(model: nn.Module, path: Path, input_shape, opset: int) -> None:
    x = torch.zeros(1, *input_shape)
    model = _exportable(model)

    def write(tmp: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (x,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=_DYNAMIC)
        clean_graph(tmp)
    atomic_write(path, write)


def export_qcdq(model: nn.Module, path: Path, input_shape, uint8_activations: bool = False,
                opset: int = 13) -> None:
    """uint8_activations: rewrite int8 activation Q/DQ pairs as uint8 (exact, see
    activations_to_uint8) so ONNX Runtime on x86 fuses every Conv/Gemm; False keeps the
    all-int8 graph that TensorRT needs (quantize.activations: signed). opset: export.opset
    (13, brevitas' own default, when called directly)."""
    from brevitas.export import export_onnx_qcdq

    from compress.export_brevitas import exact_int32_biases
    x = torch.zeros(1, *input_shape)

    def write(tmp: Path):
        with warnings.catch_warnings(), exact_int32_biases():
            warnings.simplefilter("ignore")
            export_onnx_qcdq(model.eval(), args=x, export_path=str(tmp), dynamo=False, opset_version=opset,
                             input_names=[INPUT], output_names=[OUTPUT], dynamic_axes=_DYNAMIC)
        clean_graph(tmp, fold_clips=True, qdq_for_ort=uint8_activations)
    atomic_write(path, write)


def fold_weight_clips(graph: onnx.GraphProto) -> int:
    """Fold brevitas' Clip(int8 initializer) into the initializer itself.

    brevitas writes  W_int8 -> Clip(-127, 127) -> DequantizeLinear  for each weight; the
    values are already in range, but OpenVINO then no longer sees a constant int8 weight
    and runs the convolution in bf16/f32 (measured: 1538 vs 2684 img/s once folded).
    """
    inits = {i.name: i for i in graph.initializer}
    folded, keep = 0, []
    for n in graph.node:
        if n.op_type == "Clip" and n.input and n.input[0] in inits and all(
                i in inits for i in n.input[1:] if i):
            w = numpy_helper.to_array(inits[n.input[0]])
            lo = numpy_helper.to_array(inits[n.input[1]]) if len(n.input) > 1 and n.input[1] else None
            hi = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
            clipped = np.clip(w, lo, hi).astype(w.dtype)
            graph.initializer.append(numpy_helper.from_array(clipped, n.output[0]))
            folded += 1
            continue
        keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)


# ops that move quantized values without leaving the grid: a Q/DQ after them is exact
_PASSTHROUGH = {"Concat", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _grid_of(tensor: str, prod: dict, inits: dict, depth: int = 0) -> tuple[str, str] | None:
    """The (scale, zero point) initializers of the one per-tensor grid `tensor` lies on: a
    DequantizeLinear's, followed back through _PASSTHROUGH ops whose data inputs all share it."""
    n = prod.get(tensor)
    if n is None or depth > 8:  # deeper than any cat/pool/flatten chain brevitas exports
        return None
    if n.op_type == "DequantizeLinear":
        s, z = (n.input[1:3] if len(n.input) == 3 else (None, None))
        return (s, z) if s in inits and z in inits and inits[s].size == 1 else None
    if n.op_type not in _PASSTHROUGH:
        return None
    found = [_grid_of(i, prod, inits, depth + 1) for i in (n.input if n.op_type == "Concat" else n.input[:1])]
    if not found or None in found:
        return None
    same = {(inits[s].tobytes(), inits[z].tobytes(), inits[z].dtype.str) for s, z in found}
    return found[0] if len(same) == 1 else None


def requantize_compute_inputs(graph: onnx.GraphProto) -> int:
    """DQ(a), DQ(b) -> Concat -> Conv (brevitas passes an aligned QuantTensor through cat,
    max-pool, flatten... and exports no Q/DQ after it): the Conv's input is then no DQ and
    no runtime selects it for an int8 kernel. Insert Q -> DQ with the inputs' own (shared)
    scale and zero point in front of the compute node: exact, the values are on that grid."""
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    prod, made = producers(graph), {}
    for n in list(graph.node):
        t = n.input[0] if n.op_type in _COMPUTE else None
        if t not in prod or prod[t].op_type == "DequantizeLinear":
            continue
        if t not in made:  # one Q/DQ per tensor, however many compute nodes read it
            sz = _grid_of(t, prod, inits)
            if sz is None:
                continue
            q, made[t] = f"{t}_requant_q", f"{t}_requant_dq"
            at = list(graph.node).index(n)
            graph.node.insert(at, onnx.helper.make_node("DequantizeLinear", [q, *sz], [made[t]], name=made[t]))
            graph.node.insert(at, onnx.helper.make_node("QuantizeLinear", [t, *sz], [q], name=q))
        n.input[0] = made[t]
    return len(made)


def _int8_zero_point(inits: dict, name: str) -> bool:
    t = inits.get(name)
    return t is not None and t.data_type == onnx.TensorProto.INT8 and numpy_helper.to_array(t).size == 1


def _int8_pair(q: onnx.NodeProto, cons: dict, inits: dict) -> list | None:
    """The DequantizeLinears reading `q` when q and all of them are per-tensor int8, else None."""
    if q.op_type != "QuantizeLinear" or len(q.input) < 3 or not _int8_zero_point(inits, q.input[2]):
        return None
    users = cons.get(q.output[0], [])
    ok = users and all(u.op_type == "DequantizeLinear" and len(u.input) == 3 and _int8_zero_point(inits, u.input[2])
                       for u in users)
    return users if ok else None


def _u8_zero_point(graph: onnx.GraphProto, inits: dict, made: dict, name: str) -> str:
    """The uint8 twin (value + 128) of the int8 zero point initializer `name`, made once."""
    if name not in made:
        z = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
        made[name] = f"{name}_u8"
        graph.initializer.append(numpy_helper.from_array(z.astype(np.uint8), made[name]))
    return made[name]


def activations_to_uint8(graph: onnx.GraphProto) -> int:
    """Every activation QuantizeLinear -> DequantizeLinear(s) with a per-tensor int8 zero point
    becomes uint8 with zero point + 128: the same grid, q_u8 - zp_u8 == q_s8 - zp_s8, so not a
    number changes. Weights (DQ of an initializer, no Q) stay int8.

    Why: ONNX Runtime on x86 fuses DQ -> Conv -> Q into QLinearConv only for uint8 activations
    with the same type in and out (onnxruntime/core/optimizer/qdq_transformer/selectors_actions/
    qdq_selector_action_transformer.h: QDQIsInt8Allowed() is true only on MLAS_TARGET_ARM_ANY).
    Its QDQS8ToU8Transformer (qdq_transformer/qdq_s8_to_u8.cc) converts an int8 Q/DQ pair only
    when the Q has exactly one consumer (CheckOutputEdges(graph, q, 1)): a tensor that fans
    out (Hardswish = HardSigmoid + Mul, SiLU = Sigmoid + Mul, a residual add's input) stays
    int8 and every Conv touching it stays float (measured: mobilenet_tiny 8/24 int8 -> 24/24)."""
    inits = {i.name: i for i in graph.initializer}
    cons, prod = consumers(graph), producers(graph)
    u8 = functools.partial(_u8_zero_point, graph, inits, {})
    done = 0
    for q in list(graph.node):
        users = _int8_pair(q, cons, inits)
        # a requantization Q -> DQ -> Q -> DQ (asymmetric mode: int8 add output, then the layer's
        # own uint8 input quantizer): with both pairs uint8 and nothing else reading them, ORT's
        # DoubleQDQPairsRemover merges them into one pair with new parameters (measured: agreement
        # with the Q/DQ reference 0.81, max |logit error| 3.45). Such a pair stays int8 (ORT's
        # QDQS8ToU8Transformer converts it after the remover ran).
        if users is None or (q.input[0] in prod and prod[q.input[0]].op_type == "DequantizeLinear"):
            continue
        after = [c for u in users for c in cons.get(u.output[0], [])]
        chained = [c for c in after if c.op_type == "QuantizeLinear"]
        if chained and len(chained) == len(after):
            continue
        if chained:  # the Q also feeds float consumers: the requantizing Qs get a DQ of their own,
            # so that no DQ mixes them with the float consumers
            u0 = next(u for u in users if any(c in chained for c in cons.get(u.output[0], [])))
            twin = onnx.helper.make_node("DequantizeLinear", [q.output[0], u0.input[1], u8(u0.input[2])],
                                         [f"{u0.output[0]}_requant"], name=f"{u0.name}_requant")
            graph.node.insert(list(graph.node).index(q) + 1, twin)
            for c in chained:
                c.input[0] = twin.output[0]
        q.input[2] = u8(q.input[2])
        for u in users:
            u.input[2] = u8(u.input[2])
        done += 1
    return done


def clean_graph(path: Path, fold_clips: bool = False, qdq_for_ort: bool = False) -> None:
    """Make the graph what the runtimes fuse best: no initializers listed as graph inputs
    (ORT treats those as overridable and will not constant-fold or fuse them), weight
    Clips folded, a Q/DQ in front of every compute layer, uint8 activations where ONNX
    Runtime needs them (qdq_for_ort), then the ONNX checker."""
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    if fold_clips:
        fold_weight_clips(model.graph)
        requantize_compute_inputs(model.graph)
        if qdq_for_ort:
            activations_to_uint8(model.graph)
        _drop_unused_initializers(model.graph)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: exported graph fails onnx.checker: {e}") from e
    onnx.save(model, str(path))


def check_onnx_file(path: Path) -> onnx.ModelProto:
    """For user-supplied ONNX files: one clear error naming the file."""
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportError(f"{path}: not a valid ONNX model ({str(e).splitlines()[0][:200]})") from e
    return model


def prepare_artifacts(onnx_path: Path, out_dir: Path, backends: Union[bool, Iterable[str]]) -> dict:
    """Each backend's artifact made from the ONNX by its own Target.prepare: {format: file name}.
    backends: names, or True for every registered backend available here."""
    from targets import base
    names = [n for n in base.names() if base.get(n).available()[0]] if backends is True else list(backends or ())
    files = {"onnx": onnx_path.name}
    for name in names:
        target = base.get(name)
        if target.artifact not in files:
            files[target.artifact] = target.prepare(onnx_path, out_dir).name
    return files


def versions() -> dict:
    out = {}
    for pkg in ("torch", "onnx", "onnxruntime", "openvino", "brevitas", "torch-pruning"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _precision(fmt) -> str:
    """fp32 | int8 | weight-only: "int8" promises int8 kernels (deploy fails it if none ran);
    weight-only promises float kernels on integer-stored weights."""
    if fmt is None:
        return "fp32"
    return "weight-only" if fmt["weight_only"] else "int8"


def _summary(fmt):
    if fmt is None:
        return None
    bits = "/".join(str(b) for b in sorted(set(fmt["weight_bits"].values()))) or "8"
    if fmt["weight_only"]:
        return (f"QCDQ weight-only ({fmt['format']}: int{bits} per-channel weights stored as int8 "
                f"Q/DQ, float activations and bias)")
    return (f"QCDQ ({fmt['format']}: int{bits} per-channel weights stored as int8 Q/DQ, "
            f"int8/uint8 per-tensor activations, int32 bias)")


def export_model(model: nn.Module, out_dir: Path, data, opset: int, backends: Union[bool, Iterable[str]],
                 stage: str, sparse_layers: list[str] = (), activations: str | None = None) -> dict:
    """Write model.onnx, the artifact each of `backends` compiles (see prepare_artifacts),
    and manifest.json; returns the manifest. sparse_layers: layers made 2:4 sparse, checked
    in the exported weights and recorded so a backend can enable sparse kernels. activations:
    the stage's quantize.activations; all but "signed" (TensorRT's all-int8 graph) export
    uint8 activation Q/DQ, which ONNX Runtime on x86 needs for its int8 kernels."""
    quant = is_quantized(model)
    fmt = None
    if quant:
        from compress.quantize.graph import describe
        fmt = describe(model)
    onnx_path = out_dir / "model.onnx"
    if quant:
        export_qcdq(model, onnx_path, data.input_shape, uint8_activations=activations != "signed", opset=opset)
    else:
        export_float(model, onnx_path, data.input_shape, opset)
    files = prepare_artifacts(onnx_path, out_dir, backends)
    manifest = {
        "stage": stage, "files": files,
        "input": {"name": INPUT, "shape": ["batch", *data.input_shape], "layout": "NCHW",
                  "dtype": "float32", **{k: v for k, v in data.preprocessing().items()
                                          if k not in ("layout", "dtype")}},
        "output": {"name": OUTPUT, "kind": "logits", "num_classes": data.num_classes,
                   "classes": data.classes},
        "precision": _precision(fmt),
        "quantization": _summary(fmt),
        # what a deployment should see execute: int8 kernels, or float kernels for weight-only
        "quant_format": fmt,
        "versions": versions(),
        "export_format": EXPORT_FORMAT,
    }
    if sparse_layers:
        from compress.prune.sparse import verify_export
        manifest["sparsity"] = verify_export(onnx_path, list(sparse_layers))
    write_json(out_dir / "manifest.json", manifest)
    return manifest
