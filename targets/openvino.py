"""OpenVINO: compile the IR for CPU with an explicit inference precision, and read the
precision each layer actually ran from the runtime model."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from targets.base import CompileOptions, executed_precision

COMPUTE_TYPES = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution",
                 "GroupDeconvolution", "FullyConnectedCompressed"}


def runtime_layers(compiled) -> list[dict]:
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        get = lambda k: str(rt[k].astype(str)) if k in rt else ""  # noqa: E731
        out.append({"name": op.get_friendly_name(), "layerType": get("layerType"),
                    "primitiveType": get("primitiveType"),
                    "runtimePrecision": get("runtimePrecision")})
    return out


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
        threads = cfg.threads or os.cpu_count() or 1
        if cfg.options.get("fp16_weights") and path.suffix == ".xml":
            path = fp16_ir(path, cfg.work_dir or path.parent)
        self.model = self.core.read_model(str(path))
        # f32 explicitly: on CPUs with bf16 support OpenVINO otherwise runs "FP32" models
        # in bf16. An int8 model keeps its int8 layers either way; the hint governs the rest.
        self.props = {"INFERENCE_PRECISION_HINT": cfg.options.get("inference_precision", "f32"),
                      "INFERENCE_NUM_THREADS": threads}
        self.device = "GPU" if cfg.device in ("gpu", "cuda") else "CPU"
        hint = cfg.options.get("performance_hint", "LATENCY")
        self.compiled = self.core.compile_model(self.model, self.device, {**self.props, "PERFORMANCE_HINT": hint})
        self.request = self.compiled.create_infer_request()
        self.dtype = self.compiled.inputs[0].get_element_type().to_dtype()
        self._queue = None
        self.inner_ms: list[float] = []
        device = self.device
        layers = runtime_layers(self.compiled)
        compute = [l for l in layers if l["layerType"] in COMPUTE_TYPES]
        int8 = [l for l in compute if is_int8_layer(l)]
        kernels = Counter(f"{l['layerType']}:{l['primitiveType']}" for l in compute)
        by_prec = Counter("int8" if is_int8_layer(l) else kernel_precision(l) for l in compute)
        self.info = {
            "provider": f"openvino-{device}", "threads": threads, "version": ov.__version__,
            "performance_hint": hint, "artifact": path.name,
            "streams": int(self.compiled.get_property("NUM_STREAMS")),
            "pinning": f"ENABLE_CPU_PINNING={self.compiled.get_property('ENABLE_CPU_PINNING')}"
            if device == "CPU" else None,
            "inference_precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "executed_precision": executed_precision(len(int8), len(compute), dict(kernels), dict(by_prec)),
        }

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # shared buffers: no copy in or out of the request (~9 us of a 60 us tiny model,
        # measured); the output is copied once because the next call overwrites it
        res = self.request.infer({0: np.ascontiguousarray(batch, self.dtype)},
                                 share_inputs=True, share_outputs=True)
        self.inner_ms.append(self.request.latency)  # the plugin's own timer for this call (ms)
        return next(iter(res.values())).copy()

    def run_many(self, batches: list) -> dict:
        """Throughput mode: a second compilation with the THROUGHPUT hint, as many async
        requests as the plugin says are optimal, all kept busy by an AsyncInferQueue."""
        if self._queue is None:
            props = {**self.props, "PERFORMANCE_HINT": "THROUGHPUT"}
            tput = self.core.compile_model(self.model, self.device, props)
            self._nireq = int(tput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self._streams = int(tput.get_property("NUM_STREAMS"))
            self._queue = self.ov.AsyncInferQueue(tput, self._nireq)
        for b in batches:
            self._queue.start_async({0: np.ascontiguousarray(b, self.dtype)})
        self._queue.wait_all()
        return {"mode": "openvino THROUGHPUT hint, AsyncInferQueue", "infer_requests": self._nireq,
                "streams": self._streams}


class OpenVinoTarget:
    name = "openvino"
    artifact = "openvino"

    def available(self) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            return False, f"openvino is not importable ({e})"
        return True, ""

    def compile(self, path: Path, cfg: CompileOptions) -> OvRunner:
        return OvRunner(path, cfg)


TARGET = OpenVinoTarget()
