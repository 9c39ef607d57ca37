"""ONNX Runtime: CPU (and CUDA where present) sessions; providers, graph optimization
level and threads come from the target's options and are read back from the session."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field

from targets.base import FLOAT_ORT_COMPUTE, INT8_ORT_OPS, CompileOptions, executed_precision, options_of

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}
# ONNX element types a foreign model's input may have -> the numpy dtype we feed it
INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
                "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


class OrtOptions(BaseModel):
    """Session options of a targets[] entry."""
    model_config = ConfigDict(extra="forbid")
    # ORT_ENABLE_ALL fuses Q/DQ pairs into QLinear* kernels: that is where int8 speed comes from
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="graph optimization level (recorded in the report)")
    inter_op_threads: int = Field(
        1, ge=1, description="inter-op threads; >1 runs independent branches in parallel (ORT_PARALLEL)")


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort
    if device in ("cuda", "gpu"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"device={device} but this onnxruntime build has no CUDAExecutionProvider "
                               f"(available: {', '.join(ort.get_available_providers())})")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(opts: OrtOptions, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    # ORT_ENABLE_ALL fuses Q/DQ pairs into QLinear* kernels: that is where int8 speed
    # comes from (3-6x over FP32 measured here); lower levels leave Q/DQ as float ops.
    so.log_severity_level = 3  # the 'optimized model is hardware specific' warning is expected: we only count its ops
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[opts.graph_optimization])
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = opts.inter_op_threads
    parallel = opts.inter_op_threads > 1
    so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    return so


# matmul kernels -> the index of their second operand (a weight for a Linear, an activation
# for attention's QK^T and AV)
_MATMUL_B = {"MatMul": 1, "FusedMatMul": 1, "MatMulInteger": 1, "MatMulIntegerToFloat": 1, "QLinearMatMul": 3}


def activation_matmuls(graph: onnx.GraphProto) -> dict[str, str]:
    """The optimized graph's matmuls of two activations (attention), by node name -> "int8"
    or "fp32": the per-op counts alone cannot say whether QK^T and AV ran integer kernels."""
    consts = {i.name for i in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return {n.name or n.output[0]: "int8" if n.op_type in INT8_ORT_OPS else "fp32" for n in graph.node
            if n.op_type in _MATMUL_B and len(n.input) > _MATMUL_B[n.op_type]
            and n.input[_MATMUL_B[n.op_type]] not in consts}


def float_between_qdq(graph: onnx.GraphProto) -> dict[str, int]:
    """Op type -> count of the optimized graph's non-compute nodes that read dequantized
    activations before the next QuantizeLinear: what ORT ran in float inside an int8 graph (a
    MobileNet's Hardswish, SiLU, SE gates). Each costs a DQ -> float op -> Q round trip, the
    usual answer to "my int8 model is not faster" (benchmarks/RESULTS.md, SiLU as QuickGelu)."""
    consts = {i.name for i in graph.initializer}
    floating = {o for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in consts
                for o in n.output}
    out: Counter = Counter()
    for n in graph.node:  # graph order is topological
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or not floating & set(n.input):
            continue
        floating.update(n.output)
        if n.op_type not in FLOAT_ORT_COMPUTE:
            out[n.op_type] += 1
    return dict(sorted(out.items()))


def op_counts(path: Path, so, work: Path, providers: list[str]):
    """A session on `path`, the op types of the graph it optimized (written to `work` only to
    be counted, never beside a user's file) and its activation matmuls."""
    import onnxruntime as ort
    opt_path = work / f"{path.stem}.ort-optimized.onnx"
    so.optimized_model_filepath = str(opt_path)
    session = ort.InferenceSession(str(path), so, providers=providers)
    graph = onnx.load(str(opt_path)).graph
    opt_path.unlink(missing_ok=True)
    return session, Counter(n.op_type for n in graph.node), activation_matmuls(graph), float_between_qdq(graph)


class OrtRunner:
    def __init__(self, path: Path, cfg: CompileOptions):
        import onnxruntime as ort
        work = cfg.work_dir or Path(tempfile.mkdtemp(prefix="compress-ort-"))
        work.mkdir(parents=True, exist_ok=True)
        so = session_options(options_of(TARGET, cfg), cfg.threads or os.cpu_count() or 1)
        self._again = (path, options_of(TARGET, cfg), cfg.threads or os.cpu_count() or 1, providers_for(cfg.device))
        self._many = None
        self.session, ops, matmuls, between = op_counts(path, so, work, providers_for(cfg.device))
        inp = self.session.get_inputs()[0]
        self.input_name, self.dtype = inp.name, INPUT_DTYPES.get(inp.type, np.float32)
        int8 = sum(v for k, v in ops.items() if k in INT8_ORT_OPS)
        flt = sum(v for k, v in ops.items() if k in FLOAT_ORT_COMPUTE)
        used = self.session.get_session_options()  # what the session runs with, not what we asked
        self.info = {
            "provider": self.session.get_providers()[0], "providers": self.session.get_providers(),
            "threads": used.intra_op_num_threads, "inter_op_threads": used.inter_op_num_threads,
            "graph_optimization": used.graph_optimization_level.name,
            # ORT spreads its intra-op pool over the allowed CPUs; no affinity set by us
            "pinning": "os default (no session.intra_op_thread_affinities)", "version": ort.__version__,
            "executed_precision": executed_precision(
                int8, int8 + flt, {k: v for k, v in sorted(ops.items())
                                   if k in INT8_ORT_OPS | FLOAT_ORT_COMPUTE}, matmuls=matmuls),
        }
        if between:
            self.info["executed_precision"]["float_between_qdq"] = between

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, self.dtype)})[0]

    def runtime_latency(self, x: np.ndarray, runs: int) -> dict:
        """ORT's own per-run timer, on a profiled twin of this session (see targets/vendor.py)."""
        import onnxruntime as ort

        from targets.vendor import ort_runtime_latency
        path, opts, threads, providers = self._again

        def make(prefix: str):
            so = session_options(opts, threads)
            so.enable_profiling, so.profile_file_prefix = True, prefix
            return ort.InferenceSession(str(path), so, providers=providers)
        return ort_runtime_latency(make, np.ascontiguousarray(x, self.dtype), runs)

    def run_many(self, batches: list) -> dict:
        """Throughput mode: the session as configured, or as many callers as it has intra-op
        threads, each on its own single-threaded session, whichever measures faster
        (targets/ort_throughput.py)."""
        if self._many is None:
            import onnxruntime as ort

            from targets.ort_throughput import Search
            path, opts, threads, providers = self._again
            cands = {(1, threads): [self.session]}
            if threads > 1 and opts.inter_op_threads == 1 and providers == ["CPUExecutionProvider"]:
                cands[(threads, 1)] = [ort.InferenceSession(str(path), session_options(opts, 1), providers=providers)
                                       for _ in range(threads)]
            self._many = Search(cands, self.input_name)
        return self._many([np.ascontiguousarray(b, self.dtype) for b in batches])

    def vendor_latency(self, shape, seconds: float) -> dict:
        from targets.vendor import ort_vendor_latency
        return ort_vendor_latency()


def prefix_extractor(model: onnx.ModelProto):
    """tensor name -> the part of the graph it depends on, with it as the only output.
    onnx.utils.Extractor (what onnx.utils.extract_model runs) keeps ORT's int8 fusion of
    every earlier layer: measured on tests/compress/test_parity.py's QCDQ export, the
    prefix of each layer has as many QLinearConv as the full graph has before that layer
    (0, 1, 2, 3), the same as the hand-written cut it replaced. Shapes are inferred once
    (the Extractor needs each tensor's value_info), not once per layer."""
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    inputs = [i.name for i in model.graph.input]
    return lambda tensor: extractor.extract_model(inputs, [tensor])


def prefix_graph(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    return prefix_extractor(model)(tensor)


def read_tensors(path: Path, tensors: list[str], x: np.ndarray, cfg: CompileOptions) -> list:
    """Run the ONNX on ORT with the entry's options (as deployed) and read the tensors.

    A float graph: one session with the tensors as extra graph outputs. A Q/DQ graph: ORT
    will not fuse DequantizeLinear -> Conv -> QuantizeLinear into its int8 kernel when a
    tensor inside the group is a graph output (measured: 4 of 9 QLinearConv left), so each
    tensor is read from its own prefix of the graph, in which every earlier layer keeps its
    int8 kernel."""
    import onnxruntime as ort
    model = onnx.load(str(path))
    so = session_options(options_of(TARGET, cfg), cfg.threads or 1)

    def run(m: onnx.ModelProto, names: list[str]) -> list:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=providers_for(cfg.device))
        return sess.run(names, {sess.get_inputs()[0].name: x})
    if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        prefix = prefix_extractor(model)
        return [run(prefix(t), [t])[0] for t in tensors]
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in dict.fromkeys(tensors) if t not in have)
    return run(model, tensors)


class OnnxRuntimeTarget:
    name = "onnxruntime"
    throughput_streams = True  # run_many may choose one single-thread session per caller (ort_throughput.py)
    artifact = "onnx"
    suffixes = (".onnx",)
    Options = OrtOptions

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return False, f"onnxruntime is not importable ({e})"
        return True, ""

    def prepare(self, onnx_path: Path, work_dir: Path) -> Path:
        return onnx_path

    def exact_rewrites(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
        """Rewrites of a Q/DQ graph that compute the same numbers faster on this runtime, applied
        to the artifact `precision: speed` writes for it."""
        from targets.ort_fusions import exact_rewrites
        return exact_rewrites(model)

    def int8_rewrites(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
        """Those of exact_rewrites that let layers run int8 which run float without them."""
        from targets.ort_fusions import relu_into_quantize
        return relu_into_quantize(model)

    def compile(self, artifact: Path, cfg: CompileOptions) -> OrtRunner:
        return OrtRunner(artifact, cfg)

    def intermediate_outputs(self, artifact: Path, tensors: list[str], x: np.ndarray,
                             cfg: CompileOptions) -> list[Optional[np.ndarray]]:
        return read_tensors(artifact, tensors, x, cfg)

    def check_offline(self, onnx_path: Path, cfg: CompileOptions, x: np.ndarray) -> str:
        return ""

    def read_input(self, artifact: Path) -> tuple[list, str]:
        raise NotImplementedError("onnxruntime compiles ONNX files only")


TARGET = OnnxRuntimeTarget()
