"""`compress profile`: time any model file a backend compiles (an ONNX, or the backend's
own format) with the shared harness, whatever produced it."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import BaseModel, ValidationError

from compress.errors import UserError
from compress.export import check_onnx_file
from targets import base
from targets.profile import profile


def file_input(path: Path, target) -> tuple[list, str]:
    """The single input's dimensions (None where dynamic) and numpy dtype name."""
    if path.suffix != ".onnx":  # the backend's own format: only it can read it
        try:
            return target.read_input(path)
        except ValueError as e:
            raise UserError(str(e)) from None
    from onnx import helper
    graph = check_onnx_file(path).graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]  # old exports list weights as inputs
    if len(inputs) != 1:
        raise UserError(f"{path}: {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                        f"compress profile times single-input models")
    t = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return dims, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name


def input_shape(dims: list, path: Path, batch: int, shape: Optional[str]) -> tuple[int, ...]:
    """The input shape from the file's dims (first dimension = batch), or from --shape, which
    must agree with every static dimension the file has."""
    if shape:
        try:
            given = [int(d) for d in shape.lower().split("x")]
        except ValueError:
            raise UserError(f"--shape {shape}: expected dimensions like 1x28x28 (without batch), for {path}") from None
        if len(given) != len(dims) - 1 or any(f is not None and f != g for f, g in zip(dims[1:], given)):
            want = "x".join("?" if d is None else str(d) for d in dims[1:])
            raise UserError(f"--shape {shape}: {path} takes input {dims} (batch first); "
                            f"expected --shape {want} with ? filled in")
        dims = [dims[0], *given]
    if any(d is None for d in dims[1:]):
        raise UserError(f"{path}: input shape {dims} has dynamic dimensions besides the batch; "
                        f"give --shape, e.g. --shape {'x'.join(str(d or 8) for d in dims[1:])}")
    if dims[0] not in (None, batch):
        raise UserError(f"--batch {batch}: {path} has a fixed batch of {dims[0]}; use --batch {dims[0]}")
    return (batch, *dims[1:])


def backend_options(target, options: Optional[dict]) -> BaseModel:
    """--option KEY=VALUE pairs checked by the backend's own options model."""
    try:
        return target.Options.model_validate(options or {})
    except ValidationError as e:
        known = ", ".join(target.Options.model_fields) or "none"
        bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise UserError(f"--option: {bad} (options of {target.name}: {known})") from None


def usable_target(path: Path, backend: str):
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        target = base.get(backend)
    except ValueError as e:
        raise UserError(f"--backend: {e}") from None
    ok, why = target.available()
    if not ok:
        raise UserError(f"backend {backend} is unavailable here: {why}")
    if path.suffix not in target.suffixes:
        raise UserError(f"{path}: {backend} compiles {' or '.join(target.suffixes)} files, not {path.suffix}")
    return target


def check_counts(**given) -> None:
    """Sizes and counts the harness takes: --batch 0 used to time one input and report it, and a
    negative --threads reached the runtime ("-3 threads")."""
    for name, v in given.items():
        least = {"warmup": 0, "runs": 100}.get(name, 1)  # runs: >= 100 for a stable p99
        if v is not None and v < least:
            raise UserError(f"--{name.replace('_', '-')} {v}: expected an integer >= {least}")


def sample_input(shp: tuple, dtype: str, batch: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    n = max(batch, 1)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return rng.standard_normal((n, *shp[1:])).astype(dtype)
    # ids / pixels: small non-negative values are valid for embeddings and images alike
    return rng.integers(0, 2, (n, *shp[1:])).astype(dtype)


def profile_file(path: Path, backend: str, batch: int = 1, threads: Optional[int] = None,
                 shape: Optional[str] = None, runs: int = 200, warmup: int = 20,
                 throughput_batch: int = 64, throughput_runs: int = 30,
                 options: Optional[dict] = None) -> dict:
    check_counts(batch=batch, threads=threads, runs=runs, warmup=warmup, throughput_batch=throughput_batch,
                 throughput_runs=throughput_runs)
    target = usable_target(path, backend)
    opts = backend_options(target, options)
    dims, dtype = file_input(path, target)
    shp = input_shape(dims, path, batch, shape)
    if dims[0] is not None:  # a fixed-batch file can only be timed at its own batch
        throughput_batch = dims[0]
    # what a backend compiles (ORT's optimized graph, a TensorRT engine) goes to a temp dir,
    # never beside the user's file
    work = Path(tempfile.mkdtemp(prefix="compress-profile-"))
    runner = target.compile(path, base.CompileOptions(threads=threads, work_dir=work, options=opts))
    res = profile(runner, sample_input(shp, dtype, batch), warmup=warmup, runs=runs,
                  throughput_batch=throughput_batch, throughput_runs=throughput_runs, batch=batch)
    return {"file": str(path), "backend": backend, "input_shape": list(shp), "input_dtype": dtype, **res,
            "executed_precision": runner.info["executed_precision"],
            "runtime": {k: v for k, v in runner.info.items() if k != "executed_precision"}}


def timer_lines(res: dict) -> list[str]:
    """The runtime's own figure and the vendor tool's beside the Python-side p50, each labelled."""
    lat, out = res["latency_ms"], []
    if lat.get("runtime"):
        rt = lat["runtime"]
        out.append(f"  runtime's own timer b{lat['batch']}: p50 {rt['p50']:.3f} ms ({rt['timer']})")
    vd = lat.get("vendor")
    if vd:
        got = f"median {vd['p50']:.3f} ms ({vd['command']})" if vd.get("p50") is not None else vd["status"]
        out.append(f"  vendor tool {vd['tool']} b{lat['batch']}: {got}")
    thr = res["throughput"]
    if thr.get("search"):
        out.append(f"  throughput settings chosen by measurement: {thr['streams']} streams, {thr['infer_requests']} "
                   f"requests of batch {thr['request_batch']} (the hint's: {thr['hint_choice']})")
    return out
