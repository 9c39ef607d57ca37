"""TensorRT (10.x / 11.x Python API): ONNX -> strongly typed network -> serialized engine.

Precision comes from the ONNX itself, as TensorRT 11 requires (its precision BuilderFlags
are gone): int8 from the Q/DQ nodes of a quantized export, fp32 otherwise. Buffers are
torch CUDA tensors and the engine runs on a torch CUDA stream.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from targets.base import CompileOptions, executed_precision


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


class TrtRunner:
    def __init__(self, onnx_path: Path, cfg: CompileOptions):
        import tensorrt as trt
        import torch
        self.torch = torch
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{onnx_path}: TensorRT could not parse the ONNX: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                     int(cfg.options.get("workspace_mb", 1024)) << 20)
        inp = network.get_input(0)
        shape = tuple(inp.shape)[1:]
        lo, opt, hi = cfg.options.get("batch_profile", (1, 1, 64))
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (lo, *shape), (opt, *shape), (hi, *shape))
        config.add_optimization_profile(profile)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
        work = cfg.work_dir or onnx_path.parent
        (work / f"{onnx_path.stem}.engine").write_bytes(bytes(serialized))
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()
        self.input_name = inp.name
        self.output_name = network.get_output(0).name
        self.stream = torch.cuda.Stream()
        layers = json.loads(self.engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON)).get("Layers", [])
        compute = [l for l in layers if isinstance(l, dict) and l.get("LayerType") in
                   ("CaskConvolution", "CaskGemmConvolution", "CaskFlattenConvolution", "gemm", "CaskGemm")]
        int8 = [l for l in compute if "Int8" in json.dumps(l.get("Inputs", ""))]
        self.info = {"provider": "tensorrt", "threads": None, "version": trt.__version__,
                     "executed_precision": executed_precision(len(int8), len(compute), {})}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                          device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return out.cpu().numpy()


class TensorRtTarget:
    name = "tensorrt"
    artifact = "onnx"

    def available(self) -> tuple[bool, str]:
        reason = unavailable_reason()
        return (not reason), reason

    def compile(self, path: Path, cfg: CompileOptions) -> TrtRunner:
        return TrtRunner(path, cfg)


TARGET = TensorRtTarget()
