"""ONNX Runtime latency of the zoo's mobilenet_small as FP32 and as int8 QCDQ before and after
the export's uint8 activation rewrite (compress.export.activations_to_uint8, issue 11), timed
interleaved in one process (1 thread, batches 1 and 64) so machine load hits all three alike.
Weights are random and calibrated on noise: latency does not depend on their values.

    python benchmarks/ort_uint8_qdq.py --rounds 15
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from compress.export import export_float, export_qcdq
from compress.models import build_model
from compress.quantize import QuantizeConfig, prepare, settings
from targets import base

SHAPE = (1, 28, 28)  # Fashion-MNIST, the data


def exports(spec: str, d: Path) -> dict[str, Path]:
    from brevitas.graph.calibrate import calibration_mode
    torch.manual_seed(0)
    float_model, x = build_model(spec, 10, 1), torch.randn(64, *SHAPE)
    with torch.no_grad():  # BatchNorm statistics of the data: with the initial ones some int32
        for _ in range(10):  # biases fall off their grid ("QuantTensor not valid" at export)
            float_model(x)
    float_model.eval()
    q = prepare(copy.deepcopy(float_model), settings(QuantizeConfig())).eval()
    with torch.no_grad(), calibration_mode(q):  # as compress.quantize.calibrate does
        q(x)
    paths = {"fp32": d / "fp32.onnx", "int8 before": d / "before.onnx", "int8 after": d / "after.onnx"}
    export_float(float_model, paths["fp32"], SHAPE, 17)
    export_qcdq(q, paths["int8 before"], SHAPE)
    export_qcdq(q, paths["int8 after"], SHAPE, uint8_activations=True)
    return paths


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="mobilenet_small")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = exports(args.spec, Path(tmp))
        sessions = {k: session(p) for k, p in paths.items()}
        counts = {}
        for k, p in paths.items():
            ep = base.get("onnxruntime").compile(p, base.CompileOptions(threads=1, work_dir=Path(tmp))) \
                .info["executed_precision"]
            counts[k] = f"{ep['int8_layers']}/{ep['compute_layers']}"
        batches = {1: 200, 64: 10}  # runs per timing, ~0.1-0.5 s each
        times = {(k, b): [] for k in sessions for b in batches}
        for _ in range(args.rounds):
            for b, n in batches.items():
                x = np.random.default_rng(b).standard_normal((b, *SHAPE)).astype(np.float32)
                for k, s in sessions.items():
                    s.run(None, {"input": x})
                    t0 = time.perf_counter()
                    for _ in range(n):
                        s.run(None, {"input": x})
                    times[k, b].append((time.perf_counter() - t0) / n * 1e3)
    print(f"{args.spec}, ORT {ort.__version__}, 1 thread, median of {args.rounds} interleaved rounds")
    print("| model | int8 / compute layers | b1 ms | b64 ms |")
    print("|---|---|---|---|")
    for k in sessions:
        print(f"| {k} | {counts[k]} | {np.median(times[k, 1]):.3f} | {np.median(times[k, 64]):.2f} |")


if __name__ == "__main__":
    main()
