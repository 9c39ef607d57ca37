"""ONNX Runtime: CPU (and CUDA where present) sessions with graph optimizations on."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from targets.base import FLOAT_ORT_COMPUTE, INT8_ORT_OPS, CompileOptions, executed_precision


class OrtRunner:
    def __init__(self, path: Path, cfg: CompileOptions):
        import onnx
        import onnxruntime as ort
        so = ort.SessionOptions()
        # ORT_ENABLE_ALL fuses Q/DQ pairs into QLinear* kernels: that is where int8 speed
        # comes from (3-6x over FP32 measured here); lower levels leave Q/DQ as float ops.
        so.log_severity_level = 3  # the 'optimized model is hardware specific' warning is expected: we only count its ops
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = cfg.threads or os.cpu_count() or 1
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # the optimized graph is written only to count its ops; never beside a user's file
        work = cfg.work_dir or Path(tempfile.mkdtemp(prefix="compress-ort-"))
        work.mkdir(parents=True, exist_ok=True)
        opt_path = work / f"{path.stem}.ort-optimized.onnx"
        so.optimized_model_filepath = str(opt_path)
        providers = ["CPUExecutionProvider"]
        if cfg.device in ("cuda", "gpu"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("device=cuda but this onnxruntime build has no CUDAExecutionProvider")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        ops = Counter(n.op_type for n in onnx.load(str(opt_path)).graph.node)
        opt_path.unlink(missing_ok=True)
        int8 = sum(v for k, v in ops.items() if k in INT8_ORT_OPS)
        flt = sum(v for k, v in ops.items() if k in FLOAT_ORT_COMPUTE)
        self.info = {
            "provider": self.session.get_providers()[0], "threads": threads,
            "graph_optimization": "ORT_ENABLE_ALL", "version": ort.__version__,
            "executed_precision": executed_precision(
                int8, int8 + flt, {k: v for k, v in sorted(ops.items())
                                   if k in INT8_ORT_OPS | FLOAT_ORT_COMPUTE}),
        }

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


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
