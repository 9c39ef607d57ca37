"""TensorRT (10.x / 11.x Python API): ONNX -> strongly typed network -> serialized engine.

Precision comes from the ONNX itself, as TensorRT 11 requires (its precision BuilderFlags
are gone): int8 from the Q/DQ nodes of a quantized export, fp16 when the float ONNX is
converted before the build (`fp16_weights`), fp32 otherwise. The TRT-ready ONNX
(targets/trt_onnx.py) is checked and compared with the export on ORT before the build.
Buffers are torch CUDA tensors, the engine runs on a torch CUDA stream and each call is
timed with CUDA events (`inner_ms`, read by the profiler).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from targets.base import CompileOptions, executed_precision, options_of
from targets.trt_onnx import make_trt_ready, max_diff_in_ort

# fp16 logits of a float model differ from fp32 by ~1e-3 relative; more means a broken conversion
FP16_MAX_DIFF = 0.05


class TrtOptions(BaseModel):
    """Engine build settings of a targets[] entry."""
    model_config = ConfigDict(extra="forbid")
    fp16_weights: bool = Field(False, description="convert the float ONNX to fp16 before the build")
    # TensorRT builds one optimization profile; a batch outside [min, max] cannot run
    batch_profile: tuple[int, int, int] = Field(
        (1, 1, 64), description="dynamic batch min/opt/max of the engine's optimization profile")
    # 1 GiB: the workspace every engine here has been built with (not tuned)
    workspace_mb: int = Field(1024, ge=1, description="builder workspace memory pool (MiB)")

    @field_validator("batch_profile")
    @classmethod
    def _batch_profile(cls, v):
        if not 1 <= v[0] <= v[1] <= v[2]:
            raise ValueError(f"expected 1 <= min <= opt <= max, got {list(v)}")
        return v


def unavailable_reason() -> str:
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return (f"tensorrt is not importable ({e}); install NVIDIA's tensorrt wheel "
                f"(pip install 'edge-compress[tensorrt]') on a machine with an NVIDIA GPU")
    try:
        import torch
    except ImportError:
        return "torch is needed for TensorRT buffers"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    return ""


def write_engine(path: Path, serialized) -> Path:
    """The serialized engine (TensorRT's IHostMemory, or any bytes-like object) written atomically:
    a run killed while writing leaves the previous engine or none, never a truncated one that a
    later `trtexec --loadEngine` or deserialize_cuda_engine would fail on."""
    from compress.checkpoint import atomic_write
    data = memoryview(serialized).cast("B")  # IHostMemory exports the buffer protocol: no copy
    atomic_write(path, lambda p: p.write_bytes(data))
    return path


class TrtRunner:
    def __init__(self, onnx_path: Path, cfg: CompileOptions):
        import tensorrt as trt
        import torch
        self.torch = torch
        opts = options_of(TARGET, cfg)
        work = cfg.work_dir or onnx_path.parent
        ready = work / f"{onnx_path.stem}.trt.onnx"
        prep = make_trt_ready(onnx_path, ready, fp16=opts.fp16_weights)
        lo, opt, hi = opts.batch_profile
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(ready.read_bytes()):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{ready}: TensorRT could not parse the ONNX: {errs}")
        inp = network.get_input(0)
        shape = tuple(inp.shape)[1:]
        # the graph TensorRT builds must compute what was exported (checked on ORT, CPU)
        x = np.random.default_rng(0).standard_normal((opt, *shape)).astype(np.float32)
        diff = max_diff_in_ort(onnx_path, ready, x)
        if prep["precision"] == "fp16" and diff > FP16_MAX_DIFF:
            raise RuntimeError(f"{ready}: fp16 conversion changes outputs by {diff:.3g} (> {FP16_MAX_DIFF})")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                     opts.workspace_mb << 20)
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (lo, *shape), (opt, *shape), (hi, *shape))
        config.add_optimization_profile(profile)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if cfg.sparse_weights and hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
            # the manifest says some weights hold 2:4: let TensorRT pick sparse tensor-core kernels
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"{ready}: TensorRT engine build failed (see the log above)")
        engine_path = write_engine(work / f"{onnx_path.stem}.engine", serialized)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()
        self.input_name = inp.name
        self.output_name = network.get_output(0).name
        self.stream = torch.cuda.Stream()
        self.inner_ms: list[float] = []
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        layers = json.loads(self.engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON)).get("Layers", [])
        compute = [lyr for lyr in layers if isinstance(lyr, dict) and lyr.get("LayerType") in
                   ("CaskConvolution", "CaskGemmConvolution", "CaskFlattenConvolution", "gemm", "CaskGemm")]
        int8 = [lyr for lyr in compute if "Int8" in json.dumps(lyr.get("Inputs", ""))]
        self.info = {"provider": "tensorrt", "threads": None, "version": trt.__version__,
                     "engine": str(engine_path), "trt_onnx": prep, "ort_max_diff": diff,
                     "batch_profile": [lo, opt, hi],
                     "executed_precision": executed_precision(len(int8), len(compute), {})}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                          device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # x and out were made on the default stream
        start, end = self._events
        start.record(self.stream)
        self.context.execute_async_v3(self.stream.cuda_stream)
        end.record(self.stream)
        self.stream.synchronize()
        self.inner_ms.append(start.elapsed_time(end))  # GPU time only, without the copies
        return out.cpu().numpy()


class TensorRtTarget:
    name = "tensorrt"
    artifact = "onnx"  # the engine depends on the entry's options: compile() builds it
    suffixes = (".onnx",)
    Options = TrtOptions

    def available(self) -> tuple[bool, str]:
        reason = unavailable_reason()
        return (not reason), reason

    def prepare(self, onnx_path: Path, work_dir: Path) -> Path:
        return onnx_path

    def compile(self, artifact: Path, cfg: CompileOptions) -> TrtRunner:
        return TrtRunner(artifact, cfg)

    def intermediate_outputs(self, artifact: Path, tensors: list[str], x: np.ndarray,
                             cfg: CompileOptions) -> list[Optional[np.ndarray]]:
        # marking a tensor as a network output changes which layers TensorRT fuses, so
        # the values read would not be those of the engine that failed
        raise NotImplementedError("tensorrt does not read intermediate tensors of the engine it built "
                                  "(marking them as outputs changes its layer fusion)")

    def read_input(self, artifact: Path) -> tuple[list, str]:
        raise NotImplementedError("tensorrt compiles ONNX files only")

    def check_offline(self, path: Path, cfg: CompileOptions, x: np.ndarray) -> str:
        """Everything before the engine build, for a machine without TensorRT: the verdict
        on the TRT-ready ONNX, one line, so a skipped row still says whether it would build."""
        work = cfg.work_dir or path.parent
        try:
            prep = make_trt_ready(path, work / f"{path.stem}.trt.onnx", options_of(self, cfg).fp16_weights)
        except ValueError as e:
            lines = str(e).splitlines()
            more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
            return f"TRT-ready ONNX check FAILED: {lines[1].strip(' -') if len(lines) > 1 else lines[0]}{more}"
        diff = max_diff_in_ort(path, Path(prep["path"]), x)
        return (f"TRT-ready ONNX ({prep['precision']}) passes onnx.checker and Q/DQ placement, "
                f"max |diff| on ORT {diff:.2g}")


TARGET = TensorRtTarget()
