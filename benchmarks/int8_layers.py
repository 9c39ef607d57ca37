"""Where int8 loses, per layer, on ONNX Runtime and OpenVINO (issue 16, items 1-3 and 6).

For each net (the demo's student: its pruned FP32 and quantized int8 exports from a demo run;
the zoo's mobilenet_small: random weights calibrated on noise, latency does not depend on
their values) it prints
  1. one table per runtime and batch: every compute layer's kernel, precision and time, FP32
     beside int8 (ORT: SessionOptions.enable_profiling node events; OpenVINO: PERF_COUNT,
     request.profiling_info), averaged over the profiled runs;
  2. interleaved ratios FP32 / variant at batch 1 and 64 on both runtimes (median of rounds;
     a ratio > 1 means the variant is faster): the int8 export, each export change tried, the
     speed-chosen mixed precision (compress.speed_precision) and static-shape compiles.

    nice -n 5 python benchmarks/int8_layers.py --run /work/main/runs/fashion-mnist --rounds 9
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from compress.onnx_graph import producers

SHAPE = (1, 28, 28)
COMPUTE = {"Conv", "Gemm", "MatMul"}


def demo_pair(run: Path, d: Path) -> dict[str, Path]:
    """The demo's own FP32 (prune stage) and int8 (quantize stage) exports, as deployed."""
    return {"fp32": run / "02-prune" / "model.onnx", "int8": run / "03-quantize" / "model.onnx"}


def zoo_pair(spec: str, d: Path) -> dict[str, Path]:
    from brevitas.graph.calibrate import calibration_mode

    from compress.export import export_float, export_qcdq
    from compress.models import build_model
    from compress.quantize import QuantizeConfig, prepare, settings
    torch.manual_seed(0)
    float_model, x = build_model(spec, 10, 1), torch.randn(64, *SHAPE)
    with torch.no_grad():  # BatchNorm statistics of the data (else int32 biases fall off their grid)
        for _ in range(10):
            float_model(x)
    float_model.eval()
    q = prepare(copy.deepcopy(float_model), settings(QuantizeConfig())).eval()
    with torch.no_grad(), calibration_mode(q):
        q(x)
    paths = {"fp32": d / f"{spec}-fp32.onnx", "int8": d / f"{spec}-int8.onnx"}
    export_float(float_model, paths["fp32"], SHAPE, 17)
    export_qcdq(q, paths["int8"], SHAPE, uint8_activations=True, opset=17)
    return paths


def layer_index(path: Path) -> tuple[dict, list[str]]:
    """Node or tensor name of the ONNX -> the index of the compute layer it belongs to (a fused
    Relu/Add/Q/DQ traces back to the Conv in front of it), and the compute layers' names."""
    g = onnx.load(str(path)).graph
    prod = producers(g)
    comp = [n for n in g.node if n.op_type in COMPUTE]
    idx = {n.name: i for i, n in enumerate(comp)}

    def of(name: str):
        for _ in range(12):
            if name in idx:
                return idx[name]
            n = prod.get(name) or next((m for m in g.node if m.name == name), None)
            if n is None or not n.input:
                return None
            if n.op_type in COMPUTE:
                return idx[n.name]
            name = n.input[0]
        return None
    return of, [n.name for n in comp]


def ort_layers(path: Path, x: np.ndarray, runs: int, threads: int) -> dict[int, tuple]:
    """Compute layer index -> (kernel, precision, microseconds per run) from ORT's profiler."""
    import onnxruntime as ort
    of, _ = layer_index(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    so.enable_profiling, so.profile_file_prefix = True, str(path.parent / f"prof-{path.stem}")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        s.run(None, {"input": x})
    for _ in range(runs):
        s.run(None, {"input": x})
    events = json.load(open(s.end_profiling()))
    per = collections.defaultdict(lambda: ["", []])
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in nodes[-runs * len({e["name"] for e in nodes}):]:  # the last `runs` runs: no warm-up
        name = re.sub(r"(_token_\d+|_nchwc)$", "", e["name"][:-len("_kernel_time")])
        op = e["args"]["op_name"]
        if op not in ("Conv", "QLinearConv", "Gemm", "QGemm", "MatMul", "QLinearMatMul", "FusedConv"):
            continue
        i = of(name)
        per[i][0] = op
        per[i][1].append(e["dur"])
    # the median run of each layer: a loaded machine preempts single runs (a 28 us conv seen at 1.4 ms)
    return {i: (k, "int8" if k.startswith("Q") else "fp32", float(np.median(t))) for i, (k, t) in per.items()
            if i is not None}


def ov_layers(path: Path, x: np.ndarray, runs: int, threads: int) -> dict[int, tuple]:
    import openvino as ov
    of, _ = layer_index(path)
    c = ov.Core().compile_model(str(path), "CPU", {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads,
                                                   "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    r = c.create_infer_request()
    r.infer({0: x})
    per = collections.defaultdict(lambda: ["", []])
    for _ in range(runs):
        r.infer({0: x})
        for p in r.profiling_info:
            if p.node_type not in ("Convolution", "GroupConvolution", "FullyConnected", "MatMul",
                                   "FullyConnectedQuantizedLegacy", "FullyConnectedQuantized"):
                continue
            i = of(p.node_name.split("/WithoutBiases")[0])
            if i is None:
                i = of(p.node_name.rsplit("/", 2)[0])
            per[i][0] = p.exec_type
            per[i][1].append(p.real_time.total_seconds() * 1e6)
    return {i: (k, "int8" if k.lower().endswith(("_i8", "_u8")) else "fp32", float(np.median(t)))
            for i, (k, t) in per.items() if i is not None}


def layer_table(title: str, names: list[str], fp: dict, q: dict) -> None:
    print(f"\n{title}\n| # | layer | FP32 kernel | µs | int8 kernel | precision | µs | int8/FP32 |")
    print("|---|---|---|---|---|---|---|---|")
    for i, name in enumerate(names):
        (fk, _, ft), (qk, qp, qt) = fp.get(i, ("-", "", 0.0)), q.get(i, ("-", "", 0.0))
        ratio = f"{qt / ft:.2f}" if ft and qt else "-"
        print(f"| {i} | {name} | {fk} | {ft:.1f} | {qk} | {qp} | {qt:.1f} | {ratio} |")
    ft, qt = sum(v[2] for v in fp.values()), sum(v[2] for v in q.values())
    print(f"| | all compute layers | | {ft:.1f} | | | {qt:.1f} | {qt / max(ft, 1e-9):.2f} |")


def ort_runner(path: Path, threads: int, static: int | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    if static:
        so.add_free_dimension_override_by_name("batch", static)
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda x: s.run(None, {"input": x})[0]


def ov_runner(path: Path, threads: int, static: int | None = None):
    import openvino as ov
    core = ov.Core()
    m = core.read_model(str(path))
    if static:
        m.reshape([static, *SHAPE])
    c = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                      "PERFORMANCE_HINT": "LATENCY"})
    r = c.create_infer_request()

    def run(x):
        return next(iter(r.infer({0: x}, share_inputs=True).values()))
    return run


def ratios(variants: dict[str, Path], rounds: int, threads: int, static: bool) -> dict:
    """FP32 time / variant time at batch 1 and 64 on both runtimes, interleaved: within a round
    every runner is timed once per batch, in turn; the median over rounds of each runner's mean."""
    runs = {1: 100, 64: 6}
    runners = {}
    for rt, make in (("ort", ort_runner), ("ov", ov_runner)):
        for k, p in variants.items():
            for b in runs:
                runners[rt, k, b] = make(p, threads)
                if static:
                    runners[rt, f"{k} static", b] = make(p, threads, static=b)
    times = collections.defaultdict(list)
    for _ in range(rounds):
        for (rt, k, b), run in runners.items():
            x = np.random.default_rng(b).standard_normal((b, *SHAPE)).astype(np.float32)
            run(x)
            t0 = time.perf_counter()
            for _ in range(runs[b]):
                run(x)
            times[rt, k, b].append((time.perf_counter() - t0) / runs[b] * 1e3)
    med = {key: float(np.median(v)) for key, v in times.items()}
    return {key: (med[key[0], "fp32", key[2]] / t, t) for key, t in med.items()}


def print_ratios(net: str, r: dict) -> None:
    print(f"\n{net}: FP32 time / variant time (>1: faster than FP32), median ms in brackets")
    print("| variant | ORT b1 | ORT b64 | OV b1 | OV b64 |\n|---|---|---|---|---|")
    for k in dict.fromkeys(k for _, k, _ in r):
        cells = [f"{r[rt, k, b][0]:.2f} ({r[rt, k, b][1]:.3f})" for rt in ("ort", "ov") for b in (1, 64)]
        print(f"| {k} | " + " | ".join(cells) + " |")


def speed_variants(pair: dict, d: Path, threads: int) -> dict[str, Path]:
    """The int8 graph with layers kept float where the backend measured them faster
    (compress.speed_precision, the same search `precision: speed` runs at deploy time)."""
    from compress.speed_precision import search_file
    out = {}
    for backend in ("onnxruntime", "openvino"):
        path, choice = search_file(pair["int8"], backend, d / f"{pair['int8'].stem}-{backend}", threads=threads)
        print(f"  {backend}: float {choice['float_layers']} ({choice['seconds']:.0f} s)")
        out[f"int8 speed({backend})"] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("/work/main/runs/fashion-mnist"))
    ap.add_argument("--nets", default="demo,mobilenet_small")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--speed", action="store_true", help="also search and time the speed-chosen precision")
    ap.add_argument("--static", action="store_true", help="also time static-shape compiles")
    args = ap.parse_args()
    import onnxruntime as ort
    import openvino as ov
    print(f"ORT {ort.__version__}, OpenVINO {ov.__version__}, {args.threads} thread(s), "
          f"load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for net in args.nets.split(","):
            pair = demo_pair(args.run, d) if net == "demo" else zoo_pair(net, d)
            _, names = layer_index(pair["fp32"])
            for b in (() if args.no_layers else (1, 64)):
                x = np.random.default_rng(b).standard_normal((b, *SHAPE)).astype(np.float32)
                for rt, fn in (("ORT", ort_layers), ("OpenVINO", ov_layers)):
                    layer_table(f"{net} on {rt}, batch {b} (µs per run, median of {args.profile_runs})", names,
                                fn(pair["fp32"], x, args.profile_runs, args.threads),
                                fn(pair["int8"], x, args.profile_runs, args.threads))
            variants = dict(pair)
            if args.speed:
                variants.update(speed_variants(pair, d, args.threads))
            print_ratios(net, ratios(variants, args.rounds, args.threads, args.static))
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
