"""The Target and Runner protocols and the one table of backends.

A Target owns everything about its backend: its options (a pydantic model, validated from
its `targets[]` entry), whether it can run here, the artifact format it compiles (`prepare`
turns an exported ONNX into it), the compilation into a Runner, and how to read a layer's
output for the parity diagnosis. A Runner maps a float32 batch to outputs and says, in
`info`, what actually ran (provider, threads, precision), read back from the runtime.
Backends share no implementation: timing lives in targets/profile.py.

Adding a backend: one module with a `TARGET` object that has the members of `Target`,
and its line in `_TABLE` (or `register()` from outside the package).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
from pydantic import BaseModel

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
    precision: str = "fp32"  # what the artifact holds: fp32 | int8 | weight-only
    work_dir: Optional[Path] = None  # where a backend may write what it compiled
    options: Optional[BaseModel] = None  # the target's own Options; None: its defaults
    sparse_weights: bool = False  # the artifact holds 2:4 sparse weights (from the manifest)


class Runner(Protocol):
    info: dict  # provider, threads, executed_precision {summary, int8_layers, compute_layers, detail}

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class Target(Protocol):
    name: str
    artifact: str  # the manifest key of the format compile() takes: "onnx", or the backend's own
    suffixes: tuple[str, ...]  # file suffixes compile() accepts (`compress profile` checks them)
    Options: type[BaseModel]  # its own options; fields are keys of its targets[] entry
    # optional: throughput_streams = True where run_many may run single-thread callers or streams
    # side by side (`precision: speed` then times the throughput batch that way)

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, why not, in one line a person can act on)."""

    def prepare(self, onnx_path: Path, work_dir: Path) -> Path:
        """The exported ONNX -> the file compile() takes (the ONNX itself, or a conversion)."""

    def compile(self, artifact: Path, cfg: CompileOptions) -> Runner: ...

    def intermediate_outputs(self, artifact: Path, tensors: list[str], x: np.ndarray,
                             cfg: CompileOptions) -> list[Optional[np.ndarray]]:
        """The values of the named ONNX tensors on input x, as this backend computes them
        (None for a name it no longer has); raises NotImplementedError(why) where it cannot."""

    def check_offline(self, onnx_path: Path, cfg: CompileOptions, x: np.ndarray) -> str:
        """For a row skipped as unavailable: what can still be checked here, one line ("" if nothing)."""

    def read_input(self, artifact: Path) -> tuple[list, str]:
        """Dimensions (None where dynamic) and numpy dtype name of the single input of a
        non-ONNX file in `suffixes` (ONNX files are read by compress.profile_cli itself)."""


# name -> "module:attribute"; modules load on first use so a missing runtime costs nothing
_TABLE = {
    "onnxruntime": "targets.onnxruntime:TARGET",
    "openvino": "targets.openvino:TARGET",
    "tensorrt": "targets.tensorrt:TARGET",
}
_BUILTIN = tuple(_TABLE)  # the default targets[] of a run


def register(name: str, spec: str) -> None:
    """Add a backend from outside the package: spec is "module:attribute" of its Target."""
    if name in _TABLE:
        raise ValueError(f"backend {name!r} is already registered ({_TABLE[name]})")
    _TABLE[name] = spec


def names() -> list[str]:
    return list(_TABLE)


def builtin() -> list[str]:
    return list(_BUILTIN)


def get(name: str) -> Target:
    if name not in _TABLE:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(_TABLE)}")
    mod, attr = _TABLE[name].split(":")
    return getattr(importlib.import_module(mod), attr)


def options_of(target: Target, cfg: CompileOptions) -> BaseModel:
    """The options a compile runs with: the entry's, or the target's defaults."""
    return cfg.options if cfg.options is not None else target.Options()


def executed_precision(int8_layers: int, compute_layers: int, detail: dict,
                       by_precision: Optional[dict] = None, matmuls: Optional[dict] = None) -> dict:
    """by_precision: compute layers per precision that ran ({"f32": 7} or {"i8": 6, "f32": 1});
    without it, whatever is not int8 is reported as fp32. matmuls: the matmuls of two
    activations (attention's QK^T and AV) by node name -> "int8" or the float precision they
    ran in; they are compute layers too."""
    if by_precision is None:
        by_precision = {k: v for k, v in (("int8", int8_layers),
                                          ("fp32", compute_layers - int8_layers)) if v}
    if compute_layers == 0:
        summary = "no compute layers found"
    else:
        summary = ", ".join(f"{k} {v}/{compute_layers}" for k, v in
                            sorted(by_precision.items(), key=lambda kv: -kv[1]))
    if matmuls:
        summary += f"; activation matmuls int8 {sum(v == 'int8' for v in matmuls.values())}/{len(matmuls)}"
    out = {"summary": summary, "int8_layers": int8_layers, "compute_layers": compute_layers,
           "by_precision": by_precision, "detail": detail}
    if matmuls:
        out["matmuls"] = matmuls
    return out
