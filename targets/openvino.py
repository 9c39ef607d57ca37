"""OpenVINO: convert the ONNX to IR, compile it for CPU with an explicit inference
precision, and read the precision each layer actually ran from the runtime model."""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from targets.base import CompileOptions, executed_precision, options_of

COMPUTE_TYPES = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution",
                 "GroupDeconvolution", "FullyConnectedCompressed"}


class OvOptions(BaseModel):
    """Compile properties of a targets[] entry."""
    model_config = ConfigDict(extra="forbid")
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field(
        "LATENCY", description="hint of the latency runs (throughput runs always use THROUGHPUT)")
    inference_precision: Literal["f32", "bf16", "f16"] = Field(
        "f32", description="INFERENCE_PRECISION_HINT (f32: never bf16 behind the user's back)")
    fp16_weights: bool = Field(False, description="compile an IR copy with FP16-compressed weights")


def to_ir(onnx_path: Path, xml_path: Path) -> Path:
    """ONNX -> IR (.xml + .bin), written atomically (temp names, then rename)."""
    import openvino as ov
    model = _read(ov, onnx_path)
    # compress_to_fp16=False: the IR keeps the weights exactly as exported; FP16 storage
    # would change the float model's numbers before any precision was asked for.
    tmp_xml = xml_path.with_name(f".{xml_path.stem}.tmp.xml")
    ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
    from compress.checkpoint import fsync
    for f in (tmp_xml, tmp_xml.with_suffix(".bin")):
        fsync(f)  # both on disk before either is renamed; manifest.json's digests cover the pair
    tmp_xml.with_suffix(".bin").replace(xml_path.with_suffix(".bin"))
    tmp_xml.replace(xml_path)
    return xml_path


def _read(ov, onnx_path: Path):
    """A Q/DQ graph is read as it is (Core.read_model: Q -> Convert(u8) -> DQ), not through
    convert_model, whose offline passes fuse each Q+DQ pair into one f32 FakeQuantize that the
    CPU plugin's low-precision passes then leave in f32 in front of the ViTs' patch conv,
    proj, fc1 and fc2 (vit_tiny: 3 of 10 layers int8; read as is: 10 of 10, with the logits of
    ONNX Runtime's int8 kernels; openvino 2026.4). Float graphs keep convert_model's IR.
    Read as is, OpenVINO 2026.4 computes a ViT's patch embedding wrong (targets/ov_bias.py:
    vit_torch_tiny's logits 1.0 off ONNX Runtime's, timm DeiT-tiny's 0.15); the same graph with
    each Conv's bias as an Add after it is right and still int8. So each IR runs a seeded random
    batch beside ONNX Runtime (bit-exact with brevitas on Q/DQ graphs). Where the one read as is
    computes wrong (_wrong), the split-bias one is kept if it does not and runs as many layers
    int8 as convert_model's, else convert_model's. Otherwise the one read as is, unless
    convert_model's, the smaller IR, is as near and as int8 (on a trained MobileNetV3
    convert_model's agreed less with torch: 0.957 vs 0.988)."""
    converted = ov.convert_model(str(onnx_path))
    model = ov.Core().read_model(str(onnx_path))
    if not any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()):
        return converted
    ref, scale = _reference(onnx_path, model)
    (d_read, n_read), (d_conv, n_conv) = (_compare(ov, m, ref) for m in (model, converted))
    if _wrong(d_read, d_conv, scale):
        split = _read_split_bias(ov, onnx_path)
        if split is not None:
            d_split, n_split = _compare(ov, split, ref)
            if not _wrong(d_split, d_conv, scale) and n_split >= n_conv:
                return split
        return converted
    # Where convert_model's IR runs as many layers int8 and is no farther from ONNX Runtime, it
    # is the one to ship: its FakeQuantize stands for each Q/DQ pair, and the IR read as is
    # carries both (the demo's int8 student: 297 kB against 179 kB, the same 10 of 10 int8
    # layers and the same logits)
    return converted if n_conv >= n_read and d_conv <= d_read else model


def _wrong(d: float, d_conv: float, scale: float) -> bool:
    """An IR computes wrong: off ONNX Runtime by more than 2% of the output range, and
    convert_model's at least twice nearer. Two right int8 IRs differ by rounding, by about as
    much each (an untrained ConvNeXt-tiny: 0.037 and 0.032 of a 0.67 range, 59 and 13 layers
    int8); a wrong one is off by orders of magnitude more (vit_torch_tiny: 1.0 against 1e-7)."""
    return d > 0.02 * scale and d_conv < d / 2


def _read_split_bias(ov, onnx_path: Path):
    """The Q/DQ graph read as is with each Conv's bias split out (None: no Conv has a bias, or
    the graph is too large to rewrite in memory)."""
    import io

    import onnx

    from targets.ov_bias import split_conv_bias
    graph = onnx.load(str(onnx_path))
    if not split_conv_bias(graph):
        return None
    try:
        data = graph.SerializeToString()
    except ValueError:  # over protobuf's 2 GB: such a graph is not rewritten
        return None
    return ov.Core().read_model(io.BytesIO(data))


def _reference(onnx_path: Path, model) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """A seeded random batch of 2, ONNX Runtime's outputs on it, and their range."""
    import onnxruntime as ort
    shape = [2 if d.is_dynamic else d.get_length() for d in model.input(0).get_partial_shape()]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], np.float32)
    return (x, ref), max(float(np.abs(ref).max()), 1e-6)


def _compare(ov, model, ref: tuple[np.ndarray, np.ndarray]) -> tuple[float, int]:
    """The IR's max |difference| from ONNX Runtime's outputs, and how many compute layers the
    CPU plugin runs int8."""
    x, want = ref
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    d = float(np.abs(np.asarray(compiled(x)[0], np.float32) - want).max())
    layers = runtime_layers(compiled)
    return d, sum(1 for layer in layers if layer["layerType"] in COMPUTE_LAYERS and is_int8_layer(layer))


COMPUTE_LAYERS = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"}


def runtime_layers(compiled) -> list[dict]:
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        get = lambda k: str(rt[k].astype(str)) if k in rt else ""  # noqa: E731
        out.append({"name": op.get_friendly_name(), "layerType": get("layerType"),
                    "primitiveType": get("primitiveType"),
                    "runtimePrecision": get("runtimePrecision"), "fused": get("originalLayersNames")})
    return out


def _op_kind(name: str) -> str:
    """"Softmax" of "/attn/Softmax_1" or "Softmax_4126" (the plugin's own names)."""
    return re.sub(r"_\d+$", "", name.rsplit("/", 1)[-1])


def fused_matmuls(layers: list[dict]) -> list[dict]:
    """Attention's QK^T and AV: the CPU plugin fuses MatMul -> (Multiply) -> Softmax -> MatMul
    into one Subgraph (its MHA tokenization), so no runtime layer is a MatMul and the first
    MatMul may even lose its name. Two rows per Subgraph that fused a Softmax and a MatMul,
    named after it, with its kernel and precision."""
    out = []
    for lyr in layers:
        kinds = {_op_kind(n) for n in lyr["fused"].split(",")}
        if lyr["layerType"] == "Subgraph" and {"Softmax", "MatMul"} <= kinds:
            out += [{**lyr, "name": f"{lyr['name']} ({part})", "layerType": "MatMul"} for part in ("QK^T", "AV")]
    return out


def fused_sums(layers: list[dict]) -> list[list[str]]:
    """The graph nodes each compute layer fused with an Add (a residual sum post-op): where the
    Add's input came through a QuantizeLinear, the plugin skips it (compress/runtime_arith.py)."""
    return [names for lyr in layers if lyr["layerType"] in COMPUTE_TYPES
            for names in [lyr["fused"].split(",")] if any(_op_kind(n) == "Add" for n in names)]


def is_int8_layer(layer: dict) -> bool:
    prim, prec = layer["primitiveType"].lower(), layer["runtimePrecision"].lower()
    return prim.endswith("_i8") or prim.endswith("_u8") or prec in ("i8", "u8")


def kernel_precision(layer: dict) -> str:
    """The precision a float kernel ran in, from its primitiveType suffix (brgconv_avx512_f32,
    ..._bf16) or, failing that, the layer's runtimePrecision."""
    suffix = layer["primitiveType"].rsplit("_", 1)[-1].lower()
    if suffix in ("f32", "bf16", "f16", "fp32", "fp16"):
        return {"fp32": "f32", "fp16": "f16"}.get(suffix, suffix)
    return layer["runtimePrecision"].lower() or "unknown"


def compile_properties(opts: OvOptions, threads: int) -> dict:
    # f32 explicitly: on CPUs with bf16 support OpenVINO otherwise runs "FP32" models
    # in bf16. An int8 model keeps its int8 layers either way; the hint governs the rest.
    return {"INFERENCE_PRECISION_HINT": opts.inference_precision, "INFERENCE_NUM_THREADS": threads}


def fp16_ir(path: Path, work: Path) -> Path:
    """A copy of the IR with FP16-compressed weights (only when asked: it changes a float
    model's numbers). OpenVINO decompresses them to the inference precision at load."""
    import openvino as ov
    out = work / f"{path.stem}.fp16.xml"
    ov.save_model(ov.Core().read_model(str(path)), str(out), compress_to_fp16=True)
    return out


class OvRunner:
    def __init__(self, path: Path, cfg: CompileOptions):
        import openvino as ov
        self.ov, self.core = ov, ov.Core()
        opts = options_of(TARGET, cfg)
        if opts.fp16_weights and path.suffix == ".xml":
            path = fp16_ir(path, cfg.work_dir or path.parent)
        self.model, self.path = self.core.read_model(str(path)), path
        self.props = compile_properties(opts, cfg.threads or os.cpu_count() or 1)
        self.device = "GPU" if cfg.device in ("gpu", "cuda") else "CPU"
        self.compiled = self.core.compile_model(self.model, self.device,
                                                {**self.props, "PERFORMANCE_HINT": opts.performance_hint})
        self.request = self.compiled.create_infer_request()
        self.dtype = self.compiled.inputs[0].get_element_type().to_dtype()
        self._queue = None
        self.inner_ms: list[float] = []
        device = self.device
        layers = runtime_layers(self.compiled)
        compute = [lyr for lyr in layers if lyr["layerType"] in COMPUTE_TYPES] + fused_matmuls(layers)
        int8 = [lyr for lyr in compute if is_int8_layer(lyr)]
        matmuls = {lyr["name"]: "int8" if is_int8_layer(lyr) else kernel_precision(lyr)
                   for lyr in compute if lyr["layerType"] == "MatMul"}
        kernels = Counter(f"{lyr['layerType']}:{lyr['primitiveType']}" for lyr in compute)
        by_prec = Counter("int8" if is_int8_layer(lyr) else kernel_precision(lyr) for lyr in compute)
        prop = self.compiled.get_property  # what the plugin compiled with, not what we asked
        self.info = {
            "provider": f"openvino-{device}", "threads": int(prop("INFERENCE_NUM_THREADS")),
            "version": ov.__version__, "performance_hint": str(prop("PERFORMANCE_HINT")), "artifact": path.name,
            "streams": int(self.compiled.get_property("NUM_STREAMS")),
            "pinning": f"ENABLE_CPU_PINNING={self.compiled.get_property('ENABLE_CPU_PINNING')}"
            if device == "CPU" else None,
            "inference_precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "executed_precision": executed_precision(len(int8), len(compute), dict(kernels), dict(by_prec),
                                                     matmuls),
            "fused_sums": fused_sums(layers),
        }

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # shared input buffer: no copy into the request (~9 us of a 60 us tiny model, measured);
        # the output is copied once because the next call overwrites it. start_async + wait, not
        # infer(): the request then runs on the plugin's pinned stream thread, as benchmark_app's
        # do, not on the calling thread; on 2 threads under load (12-14) infer() took 1.3-20x as
        # long per call (teacher int8 b1: 8.2-9.9 vs 0.86 ms, 4 interleaved rounds), same outputs
        self.request.start_async({0: np.ascontiguousarray(batch, self.dtype)}, share_inputs=True)
        self.request.wait()
        self.inner_ms.append(self.request.latency)  # the plugin's own timer for this call (ms)
        return self.request.get_output_tensor(0).data.copy()

    def runtime_latency(self, x: np.ndarray, runs: int) -> dict:
        """The plugin's own per-call time on this request (see targets/vendor.py)."""
        from targets.vendor import ov_runtime_latency
        return ov_runtime_latency(self.request, self.ov.Tensor(np.ascontiguousarray(x, self.dtype)), runs)

    def vendor_latency(self, shape, seconds: float) -> dict:
        """benchmark_app on the same file with what this compiled model runs with."""
        from targets.vendor import ov_vendor_latency
        prop = self.compiled.get_property
        props = {"device": self.device, "hint": str(prop("PERFORMANCE_HINT")), "threads": self.info["threads"],
                 "streams": self.info["streams"], "pinning": self.device == "CPU" and bool(prop("ENABLE_CPU_PINNING")),
                 "precision": self.info["inference_precision"],
                 "static": self.compiled.input(0).get_partial_shape().is_static}
        return ov_vendor_latency(self.path, props, shape, seconds)

    def run_many(self, batches: list) -> dict:
        """Throughput mode: THROUGHPUT-hint compilations with streams, async requests and the
        batch of each request chosen by measurement on the first call (targets/ov_throughput.py),
        all requests kept busy by an AsyncInferQueue."""
        from targets import ov_throughput
        if self._queue is None:
            self._queue = ov_throughput.Queues(self.ov, self.core, self.model, self.device, self.props, self.dtype)
            dynamic = self.model.input(0).get_partial_shape()[0].is_dynamic
            self._best, self._table, self._hint = ov_throughput.search(
                self._queue, batches[0], self.info["threads"], dynamic)
        self._queue.run(self._best, batches)
        return {"mode": "openvino THROUGHPUT, streams/requests/request batch chosen by measurement, AsyncInferQueue",
                "streams": self._best[0], "infer_requests": self._best[1], "request_batch": self._best[2],
                "hint_choice": {"streams": self._hint[0], "infer_requests": self._hint[1]}, "search": self._table}


def read_tensors(ir_path: Path, tensors: list[str], x: np.ndarray, cfg: CompileOptions) -> list:
    """Run the IR on the OpenVINO CPU plugin with the tensors (names kept from the ONNX by
    the converter) as extra outputs; a name the IR no longer has gives None. Unlike ORT, the
    CPU plugin keeps its int8 kernels with these outputs (measured on the demo's int8 IR: 10 of
    10 compute layers still *_I8)."""
    import openvino as ov
    opts = options_of(TARGET, cfg)
    if opts.fp16_weights and ir_path.suffix == ".xml":  # the model that failed, as OvRunner compiled it
        ir_path = fp16_ir(ir_path, cfg.work_dir or ir_path.parent)
    core = ov.Core()
    model = core.read_model(str(ir_path))
    for t in tensors:
        try:
            model.add_outputs(t)
        except RuntimeError:
            pass
    compiled = core.compile_model(model, "CPU", compile_properties(opts, cfg.threads or 1))
    res = compiled({0: x})
    by_name = {n: res[o] for o in compiled.outputs for n in o.get_names()}
    return [by_name.get(t) for t in tensors]


def read_input(path: Path) -> tuple[list, str]:
    import openvino as ov
    try:
        inputs = ov.Core().read_model(str(path)).inputs
    except RuntimeError as e:
        raise ValueError(f"{path}: not a readable OpenVINO IR ({str(e).splitlines()[0][:200]})") from None
    if len(inputs) != 1:
        raise ValueError(f"{path}: {len(inputs)} inputs; compress profile times single-input models")
    dims = [d.get_length() if d.is_static else None for d in inputs[0].get_partial_shape()]
    return dims, inputs[0].get_element_type().to_dtype().name


class OpenVinoTarget:
    name = "openvino"
    throughput_streams = True  # run_many may choose as many single-thread streams as threads (ov_throughput.py)
    artifact = "openvino"  # the manifest's files key of the IR
    suffixes = (".xml", ".onnx")  # the plugin reads ONNX directly: a one-off profile writes no IR
    Options = OvOptions

    def available(self) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            return False, f"openvino is not importable ({e})"
        return True, ""

    def prepare(self, onnx_path: Path, work_dir: Path) -> Path:
        return to_ir(onnx_path, work_dir / f"{onnx_path.stem}.xml")

    def compile(self, artifact: Path, cfg: CompileOptions) -> OvRunner:
        return OvRunner(artifact, cfg)

    def intermediate_outputs(self, artifact: Path, tensors: list[str], x: np.ndarray,
                             cfg: CompileOptions) -> list[Optional[np.ndarray]]:
        return read_tensors(artifact, tensors, x, cfg)

    def check_offline(self, onnx_path: Path, cfg: CompileOptions, x: np.ndarray) -> str:
        return ""

    def read_input(self, artifact: Path) -> tuple[list, str]:
        return read_input(artifact)


TARGET = OpenVinoTarget()
