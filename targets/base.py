"""The Target and Runner protocols and the one table of backends.

A Target compiles an exported artifact into a Runner; a Runner maps a float32 NCHW
batch to logits and says, in `info`, what actually ran (provider, threads, precision).
Backends share no implementation: timing lives in targets/profile.py.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

# int8 kernels a runtime may execute for a quantized compute layer
INT8_ORT_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"}
FLOAT_ORT_COMPUTE = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm",
                     "ConvTranspose", "NhwcConv"}


@dataclass
class CompileOptions:
    """How a backend compiles one artifact (built by compress.deploy from a targets[] entry)."""
    threads: Optional[int] = None
    device: str = "cpu"
    precision: str = "fp32"  # what the artifact holds: fp32 | int8
    work_dir: Optional[Path] = None  # where a backend may write what it compiled
    options: dict = field(default_factory=dict)


class Runner(Protocol):
    info: dict  # provider, threads, executed_precision {summary, int8_layers, compute_layers, detail}

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class Target(Protocol):
    name: str
    artifact: str  # which exported file it consumes: "onnx" | "openvino"

    def available(self) -> tuple[bool, str]: ...

    def compile(self, path: Path, cfg: CompileOptions) -> Runner: ...


# name -> "module:attribute"; modules load on first use so a missing runtime costs nothing
_TABLE = {
    "onnxruntime": "targets.onnxruntime:TARGET",
    "openvino": "targets.openvino:TARGET",
    "tensorrt": "targets.tensorrt:TARGET",
}


def register(name: str, spec: str) -> None:
    if name in _TABLE:
        raise ValueError(f"backend {name!r} is already registered ({_TABLE[name]})")
    _TABLE[name] = spec


def names() -> list[str]:
    return list(_TABLE)


def get(name: str) -> Target:
    if name not in _TABLE:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(_TABLE)}")
    mod, attr = _TABLE[name].split(":")
    return getattr(importlib.import_module(mod), attr)


def executed_precision(int8_layers: int, compute_layers: int, detail: dict,
                       by_precision: Optional[dict] = None) -> dict:
    """by_precision: compute layers per precision that ran ({"f32": 7} or {"i8": 6, "f32": 1});
    without it, whatever is not int8 is reported as fp32."""
    if by_precision is None:
        by_precision = {k: v for k, v in (("int8", int8_layers),
                                          ("fp32", compute_layers - int8_layers)) if v}
    if compute_layers == 0:
        summary = "no compute layers found"
    else:
        summary = ", ".join(f"{k} {v}/{compute_layers}" for k, v in
                            sorted(by_precision.items(), key=lambda kv: -kv[1]))
    return {"summary": summary, "int8_layers": int8_layers, "compute_layers": compute_layers,
            "by_precision": by_precision, "detail": detail}
