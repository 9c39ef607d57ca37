"""`compress profile`: time any ONNX or OpenVINO IR file on a backend with the shared
harness, whatever produced it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from compress.errors import UserError
from compress.export import check_onnx_file
from targets import base
from targets.profile import profile


def input_shape(path: Path, batch: int, shape: Optional[str]) -> tuple[int, ...]:
    """The input shape from the file (first dimension = batch), or from --shape."""
    if shape:
        try:
            dims = tuple(int(d) for d in shape.lower().split("x"))
        except ValueError:
            raise UserError(f"--shape {shape!r}: expected dimensions like 1x28x28 (without batch)") from None
        return (batch, *dims)
    if path.suffix == ".xml":
        import openvino as ov
        ps = ov.Core().read_model(str(path)).inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in ps]
    else:
        t = check_onnx_file(path).graph.input[0].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if any(d is None for d in dims[1:]):
        raise UserError(f"{path}: input shape {dims} has dynamic dimensions besides the batch; "
                        f"give --shape, e.g. --shape 1x28x28")
    return (batch, *dims[1:])


def profile_file(path: Path, backend: str, batch: int = 1, threads: Optional[int] = None,
                 shape: Optional[str] = None, runs: int = 200, warmup: int = 20,
                 throughput_batch: int = 64) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix not in (".onnx", ".xml"):
        raise UserError(f"{path}: expected an .onnx file or an OpenVINO .xml IR")
    target = base.get(backend)
    ok, why = target.available()
    if not ok:
        raise UserError(f"backend {backend} is unavailable here: {why}")
    # OpenVINO reads ONNX directly, so a one-off profile writes no IR
    if backend != "openvino" and path.suffix == ".xml":
        raise UserError(f"{path}: {backend} runs ONNX files, not OpenVINO IR")
    shp = input_shape(path, batch, shape)
    runner = target.compile(path, base.CompileOptions(threads=threads))
    sample = np.random.default_rng(0).standard_normal((max(batch, 1), *shp[1:])).astype(np.float32)
    res = profile(runner, sample, warmup=warmup, runs=runs, throughput_batch=throughput_batch,
                  batch=batch)
    return {"file": str(path), "backend": backend, "input_shape": list(shp), **res,
            "executed_precision": runner.info["executed_precision"],
            "runtime": {k: v for k, v in runner.info.items() if k != "executed_precision"}}
