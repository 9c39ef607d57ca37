"""ONNX Runtime: CPU (and CUDA where present) sessions; providers, graph optimization
level and threads come from the target's config and are recorded in `info`."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from targets.base import FLOAT_ORT_COMPUTE, INT8_ORT_OPS, CompileOptions, executed_precision

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}
# ONNX element types a foreign model's input may have -> the numpy dtype we feed it
INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
                "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort
    if device in ("cuda", "gpu"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"device={device} but this onnxruntime build has no CUDAExecutionProvider "
                               f"(available: {', '.join(ort.get_available_providers())})")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtRunner:
    def __init__(self, path: Path, cfg: CompileOptions):
        import onnx
        import onnxruntime as ort
        so = ort.SessionOptions()
        # ORT_ENABLE_ALL fuses Q/DQ pairs into QLinear* kernels: that is where int8 speed
        # comes from (3-6x over FP32 measured here); lower levels leave Q/DQ as float ops.
        so.log_severity_level = 3  # the 'optimized model is hardware specific' warning is expected: we only count its ops
        level = LEVELS[cfg.options.get("graph_optimization", "all")]
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        threads = cfg.threads or os.cpu_count() or 1
        inter = int(cfg.options.get("inter_op_threads", 1))
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = inter
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL if inter > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
        # the optimized graph is written only to count its ops; never beside a user's file
        work = cfg.work_dir or Path(tempfile.mkdtemp(prefix="compress-ort-"))
        work.mkdir(parents=True, exist_ok=True)
        opt_path = work / f"{path.stem}.ort-optimized.onnx"
        so.optimized_model_filepath = str(opt_path)
        self.session = ort.InferenceSession(str(path), so, providers=providers_for(cfg.device))
        inp = self.session.get_inputs()[0]
        self.input_name, self.dtype = inp.name, INPUT_DTYPES.get(inp.type, np.float32)
        ops = Counter(n.op_type for n in onnx.load(str(opt_path)).graph.node)
        opt_path.unlink(missing_ok=True)
        int8 = sum(v for k, v in ops.items() if k in INT8_ORT_OPS)
        flt = sum(v for k, v in ops.items() if k in FLOAT_ORT_COMPUTE)
        self.info = {
            "provider": self.session.get_providers()[0], "providers": self.session.get_providers(),
            "threads": threads, "inter_op_threads": inter, "graph_optimization": level,
            # ORT spreads its intra-op pool over the allowed CPUs; no affinity set by us
            "pinning": "os default (no session.intra_op_thread_affinities)", "version": ort.__version__,
            "executed_precision": executed_precision(
                int8, int8 + flt, {k: v for k, v in sorted(ops.items())
                                   if k in INT8_ORT_OPS | FLOAT_ORT_COMPUTE}),
        }

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, self.dtype)})[0]


class OnnxRuntimeTarget:
    name = "onnxruntime"
    artifact = "onnx"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return False, f"onnxruntime is not importable ({e})"
        return True, ""

    def compile(self, path: Path, cfg: CompileOptions) -> OrtRunner:
        return OrtRunner(path, cfg)


TARGET = OnnxRuntimeTarget()
