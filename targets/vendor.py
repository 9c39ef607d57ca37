"""Beside the harness's Python-side timing: each runtime's own per-call timer, and the vendor's
benchmark tool on the same file with the same threads, streams and hint. The report shows all
three, labelled, because below ~1 ms they differ: the harness times what a Python caller waits
(the call into the runtime and back, ~17 µs here), the runtime's timer only its own work.

OpenVINO's Python benchmark_app reads the same timer (InferRequest.latency) on back-to-back
requests whose input was set once; `ov_runtime_latency` does exactly that on our compiled
request, so the two differ only by the calling loop (benchmark_app/benchmark.py, openvino
2026.4: sync_inference / async_inference_only).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

OV_TIMER = ("openvino InferRequest.latency (C++ side), back-to-back start_async()+wait() on the request with "
            "its input set once: benchmark_app's method (-api async, one request)")
ORT_TIMER = ("onnxruntime profiler model_run events (C++ side) on a second session set up like this one; "
             "profiling instruments every node too, which adds time below ~1 ms per run")
WARMUP = 10  # calls before the runtime's own timer is read: the harness warmed this request already


def summary(ms: list[float], timer: str) -> dict:
    a = np.asarray(ms, float)
    return {"p50": float(np.median(a)), "mean": float(a.mean()), "min": float(a.min()), "runs": len(a),
            "timer": timer}


def ov_runtime_latency(request, tensor, runs: int) -> dict:
    """The request's own per-call time (ms): input set once, then requests back to back, each
    run on the plugin's stream thread as benchmark_app's (a sync infer() runs on the calling
    thread instead; one run at load 12, teacher, 2 threads: sync infer() 15.9 ms per call,
    start_async+wait 4.6-9.5 ms, benchmark_app 2.7 ms)."""
    request.set_input_tensor(tensor)
    ms = []
    for i in range(WARMUP + runs):
        request.start_async()
        request.wait()
        if i >= WARMUP:
            ms.append(request.latency)
    return summary(ms, OV_TIMER)


def benchmark_app_exe() -> list[str] | None:
    """The console script beside this interpreter (the venv's), else on PATH, else the module."""
    exe = shutil.which("benchmark_app", path=str(Path(sys.executable).parent)) or shutil.which("benchmark_app")
    if exe:
        return [exe]
    try:
        import openvino.tools.benchmark.main  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "openvino.tools.benchmark.main"]


def benchmark_app_cmd(exe: list[str], path: Path, props: dict, shape, seconds: float) -> list[str]:
    """props: what our compiled model runs with (threads, streams, pinning, precision), read back
    from the plugin; one request, as our latency runs use one. `-hint none`: benchmark_app takes
    -nthreads/-nstreams/-pin only without a hint (its UI rule); our hint's outcome is what they pin.
    A dynamic-batch model is fed the shape (-data_shape) and stays dynamic, as ours runs: -shape
    would reshape it to static first, which alone made the int8 student 18% faster (76 vs 92 µs
    at batch 1, 1 thread, measured here) and is not the model we time."""
    return exe + ["-m", str(path), "-d", props.get("device", "CPU"), "-hint", "none",
                  "-nthreads", str(props["threads"]), "-nstreams", str(props["streams"]), "-nireq", "1",
                  "-pin", "YES" if props["pinning"] else "NO", "-infer_precision", props["precision"],
                  "-shape" if props.get("static") else "-data_shape", f"[{','.join(map(str, shape))}]",
                  "-t", str(max(1, round(seconds)))]


def parse_median_ms(out: str, stat: str = "Median") -> float:
    m = re.search(stat + r":\s+([\d.]+)\s+(ms|us)", out)
    if not m:
        raise ValueError(f"no '{stat}:' line in benchmark_app's output")
    return float(m.group(1)) / (1000 if m.group(2) == "us" else 1)


def ov_vendor_latency(path: Path, props: dict, shape, seconds: float, run=subprocess.run) -> dict:
    """benchmark_app's median latency (ms) on `path` with our settings; where it cannot run, why."""
    exe = benchmark_app_exe()
    if exe is None:
        return {"tool": "benchmark_app", "p50": None, "status": "not installed (openvino.tools.benchmark missing)"}
    cmd = benchmark_app_cmd(exe, path, props, shape, seconds)
    try:
        out = run(cmd, capture_output=True, text=True, timeout=120 + seconds)
        if "Median:" not in out.stdout:
            err = (out.stderr.strip().splitlines() or ["no output"])[-1]
            return {"tool": "benchmark_app", "p50": None, "status": f"failed (exit {out.returncode}: {err[:200]})"}
        return {"tool": "benchmark_app", "p50": parse_median_ms(out.stdout), "status": "ok",
                "min": parse_median_ms(out.stdout, "Min"), "mean": parse_median_ms(out.stdout, "Average"),
                "timer": "benchmark_app Median latency (InferRequest.latency over its own loop)",
                "command": " ".join(["benchmark_app", *cmd[len(exe):]])}
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return {"tool": "benchmark_app", "p50": None, "status": f"failed ({type(e).__name__}: {str(e)[:200]})"}


def ort_runtime_latency(make_session: Callable, x: np.ndarray, runs: int) -> dict:
    """Median `model_run` of ORT's own profiler (ms) on make_session(prefix): a session with
    profiling on, its trace written under `prefix` (a temporary folder, removed)."""
    import json
    work = Path(tempfile.mkdtemp(prefix="compress-ort-profile-"))
    sess = make_session(str(work / "ort"))
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(WARMUP + runs):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    shutil.rmtree(work, ignore_errors=True)
    ms = [e["dur"] / 1000 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    return summary(ms[WARMUP:] or ms, ORT_TIMER)


def ort_vendor_latency() -> dict:
    """ORT's C++ benchmark tool is not in the Python wheel; where someone built it, it is named
    but not run: its output was not available here to test a parser against."""
    exe = shutil.which("onnxruntime_perf_test")
    status = (f"installed at {exe}; not run (no parser tested against its output)" if exe
              else "not installed (onnxruntime_perf_test is not shipped in the onnxruntime Python wheel)")
    return {"tool": "onnxruntime_perf_test", "p50": None, "status": status}
