"""Does our profiler agree with the runtime vendors' own tools? (issue 6)

For each model.xml/model.onnx under --runs-dir/*/, in rounds that interleave the tools on
the same file (so load from other processes hits both alike):
  - OpenVINO: our batch-1 p50 (targets/profile.py on the OpenVINO target, f32, N threads)
    vs `benchmark_app -hint none -nthreads N -nstreams 1 -infer_precision f32` median;
  - ONNX Runtime: our batch-1 p50 on the ORT target vs the median `model_run` duration of
    ORT's own profiler (SessionOptions.enable_profiling) on an identically configured session.
Prints a markdown table of medians over rounds and ours/vendor ratios (min..max over rounds).

    nice -n 10 python benchmarks/vendor_agreement.py --runs-dir runs/fashion-mnist --threads 1 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from targets import base
from targets.profile import profile

SHAPE = (1, 1, 28, 28)  # the demo's Fashion-MNIST input; the IR's batch is dynamic


def ours(backend: str, path: Path, threads: int, runs: int, work: Path) -> tuple[float, float]:
    """Our p50, and (OpenVINO) the median of the runtime's own per-request timer over the
    same calls: where the two differ, the time went in the Python call around the runtime."""
    runner = base.get(backend).compile(path, base.CompileOptions(threads=threads, work_dir=work))
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    lat = profile(runner, x, warmup=50, runs=runs, throughput_batch=1, throughput_runs=1)["latency_ms"]
    return lat["p50"], lat["inner_p50"] if lat["inner_p50"] is not None else float("nan")


def benchmark_app_cmd(xml: Path, threads: int, seconds: int) -> list[str]:
    exe = shutil.which("benchmark_app", path=str(Path(sys.executable).parent)) or shutil.which("benchmark_app")
    head = [exe] if exe else [sys.executable, "-m", "openvino.tools.benchmark.main"]
    return head + ["-m", str(xml), "-d", "CPU", "-hint", "none", "-nthreads", str(threads), "-nstreams", "1",
                   "-infer_precision", "f32", "-shape", f"[{','.join(map(str, SHAPE))}]", "-t", str(seconds)]


def benchmark_app(xml: Path, threads: int, seconds: int) -> float:
    out = subprocess.run(benchmark_app_cmd(xml, threads, seconds), capture_output=True, text=True, check=True).stdout
    m = re.search(r"Median:\s+([\d.]+)\s+(ms|us)", out)
    if not m:
        raise RuntimeError(f"no 'Median:' in benchmark_app output for {xml}:\n{out[-2000:]}")
    return float(m.group(1)) / (1000 if m.group(2) == "us" else 1)


def ort_profiler(onnx_path: Path, threads: int, runs: int, work: Path) -> tuple[float, float]:
    """Median `model_run` of a session set up like our ORT target's, and the summed kernel
    time per run (the trace's Node *_kernel_time events); ms."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_profiling, so.profile_file_prefix = True, str(work / "ort-profile")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    x = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}
    warm = 50
    for _ in range(warm + runs):
        sess.run(None, x)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"][warm:]
    k = sorted((e["ts"], e["dur"]) for e in trace
               if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"))
    ts, cum = np.array([t for t, _ in k]), np.concatenate([[0], np.cumsum([d for _, d in k])])
    # kernel time inside each timed model_run window
    per_run = [cum[np.searchsorted(ts, e["ts"] + e["dur"], "right")] - cum[np.searchsorted(ts, e["ts"])]
               for e in model_runs]
    return statistics.median(e["dur"] for e in model_runs) / 1000, float(np.median(per_run)) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/fashion-mnist"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=1000, help="timed runs of ours and of ORT's profiler")
    ap.add_argument("--seconds", type=int, default=3, help="benchmark_app -t")
    a = ap.parse_args()
    models = sorted(p for p in a.runs_dir.glob("*/model.xml") if p.with_suffix(".onnx").is_file())
    if not models:
        sys.exit(f"no */model.xml with model.onnx beside it under {a.runs_dir}")
    work = Path(tempfile.mkdtemp(prefix="profile-agreement-"))
    rows = []
    for xml in models:
        got = {k: [] for k in ("ov_ours", "ov_inner", "ov_vendor", "ort_ours", "ort_vendor", "ort_kernels")}
        for _ in range(a.rounds):
            p50, inner = ours("openvino", xml, a.threads, a.runs, work)
            got["ov_ours"].append(p50)
            got["ov_inner"].append(inner)
            got["ov_vendor"].append(benchmark_app(xml, a.threads, a.seconds))
            got["ort_ours"].append(ours("onnxruntime", xml.with_suffix(".onnx"), a.threads, a.runs, work)[0])
            run_ms, kernel_ms = ort_profiler(xml.with_suffix(".onnx"), a.threads, a.runs, work)
            got["ort_vendor"].append(run_ms)
            got["ort_kernels"].append(kernel_ms)
        rows.append((xml.parent.name, got))
        print(f"{xml.parent.name}: {json.dumps(got)}", file=sys.stderr)
    print(f"\nthreads {a.threads}, {a.rounds} interleaved rounds; p50/median in ms; ratio = ours / vendor "
          f"(median over rounds, min..max)\n")
    print("| model | OV ours p50 | benchmark_app median | ratio | ours − vendor µs "
          "| OV request.latency in our calls | ratio to benchmark_app | ORT ours p50 "
          "| ORT profiler model_run median | ratio | ORT profiler kernel sum / run | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, g in rows:
        cells = [name]
        for b, vendor in (("ov", "ov_vendor"), ("ort", "ort_vendor"), ("ort", "ort_kernels")):
            r = [o / v for o, v in zip(g[f"{b}_ours"], g[vendor])]
            if vendor != "ort_kernels":
                cells.append(f"{statistics.median(g[f'{b}_ours']):.4f}")
            spread = f"{statistics.median(r):.3f} ({min(r):.3f}..{max(r):.3f})"
            cells += [f"{statistics.median(g[vendor]):.4f}", spread]
            if vendor == "ov_vendor":  # a constant gap across model sizes is a fixed per-call cost
                cells.append(f"{1000 * statistics.median(o - v for o, v in zip(g['ov_ours'], g[vendor])):.0f}")
                ri = [i / v for i, v in zip(g["ov_inner"], g[vendor])]
                spread = f"{statistics.median(ri):.3f} ({min(ri):.3f}..{max(ri):.3f})"
                cells += [f"{statistics.median(g['ov_inner']):.4f}", spread]
        print("| " + " | ".join(cells) + " |")
    cmd = benchmark_app_cmd(Path("MODEL.xml"), a.threads, a.seconds)
    print("\nbenchmark_app command (per model): " + " ".join(cmd))


if __name__ == "__main__":
    main()
