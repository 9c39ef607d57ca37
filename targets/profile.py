"""The one timing harness for every backend: warm-up until the timings settle, batch-1
latency percentiles with a confidence interval, throughput at a larger batch in the
backend's throughput mode, and what the process looked like while it ran (threads, CPUs
it may run on, peak resident memory). Any Runner (a callable on a float32 batch) is timed
the same way, so numbers across backends are comparable.

A Runner may offer `run_many(batches)`: run all batches with the backend's own
parallelism (OpenVINO: THROUGHPUT hint + AsyncInferQueue); without it the throughput
runs are sequential calls.

Three latency figures, each labelled in the result (targets/vendor.py says why they differ):
  latency_ms.p50 ...      Python-side: perf_counter around each call (what a Python caller waits);
  latency_ms.runtime      the runtime's own per-call timer, where the Runner offers
                          `runtime_latency(x, runs)` (OpenVINO, ONNX Runtime) or `inner_ms` (TensorRT);
  latency_ms.vendor       the vendor's tool on the same file and settings, where the Runner offers
                          `vendor_latency(shape, seconds)` (benchmark_app; onnxruntime_perf_test: named).
"""
from __future__ import annotations

import os
import resource
import time
from typing import Callable, Optional

import numpy as np

PYTHON_TIMER = "python time.perf_counter around each runner call (what a Python caller waits)"
VENDOR_SECONDS = 1.0  # benchmark_app -t: ~5k calls of a 0.1 ms model, ~750 of the 1.3 ms teacher
WINDOW = 20  # warm-up runs per window: enough for a median and a CV, small enough to stop early
# throughput is timed in rounds of `runs` batches until THROUGHPUT_SECONDS have passed or there
# are THROUGHPUT_ROUNDS, and the median round counts: one round of the demo's int8 student
# (30 batches, ~80 ms) measured 14-25k items/s on ORT in the same process minutes apart (its
# first round after the setting search ran at 19-20k, every later one at 23-24k), while the
# medians of ~10 rounds agreed within a few %; a teacher-sized round (~3 s) is one round
THROUGHPUT_SECONDS = 1.0
THROUGHPUT_ROUNDS = 10
# idle threads of a session that just ran spin before they sleep (ORT's intra-op workers,
# session.intra_op.allow_spinning on by default; OpenVINO's TBB workers briefly) and take the
# cores from what runs next. The demo's int8 student on ORT, two single-thread callers timed
# 0/5/20/50/100/300 ms after a 2-thread session's run (6 rounds, 2 vCPUs): 14.1k/12.9k/15.9k/
# 24.2k/24.7k/24.4k items/s; OpenVINO streams after a LATENCY request: 31.9k at 0 ms, 36.9k at 20.
SETTLE_S = 0.1


def mean_ms(run, x: np.ndarray, n: int) -> float:
    """Mean ms per call over n back-to-back calls (for comparing candidates interleaved)."""
    t = time.perf_counter()
    for _ in range(n):
        run(x)
    return (time.perf_counter() - t) / n * 1e3


def _timed(run, x) -> float:
    t = time.perf_counter()
    run(x)
    return time.perf_counter() - t


def _cv(a: np.ndarray) -> float:
    return float(a.std() / a.mean()) if a.mean() > 0 else 0.0


def warm_up(run: Callable, x: np.ndarray, least: int, cap: int, tolerance: float) -> dict:
    """At least `least` runs, then windows of WINDOW runs until two consecutive windows agree
    (median within `tolerance` relative, CV within `tolerance` absolute) or `cap` runs."""
    for _ in range(least):
        run(x)
    done, prev, settled, cv = least, None, False, None
    while done + WINDOW <= max(cap, least):
        w = np.array([_timed(run, x) for _ in range(WINDOW)])
        done += WINDOW
        med, cv = float(np.median(w)), _cv(w)
        if prev is not None and abs(med / prev[0] - 1) <= tolerance and abs(cv - prev[1]) <= tolerance:
            settled = True
            break
        prev = (med, cv)
    return {"runs": done, "settled": settled, "last_window_cv": cv}


def latency(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, warmup: int, runs: int,
            max_warmup: int = 1000, settle_tolerance: float = 0.05) -> dict:
    wu = warm_up(run, x, warmup, max_warmup, settle_tolerance)
    # the runtime's own per-call timer, where it has one (TensorRT: CUDA events; OpenVINO:
    # InferRequest.latency): the part of our wall time spent inside the runtime
    inner = getattr(run, "inner_ms", None)
    if isinstance(inner, list):
        inner.clear()
    ms = np.array([_timed(run, x) for _ in range(runs)]) * 1e3
    # normal approximation of the mean's 95% interval: fine for runs >= 100 (the config minimum)
    ci = float(1.96 * ms.std(ddof=1) / np.sqrt(runs)) if runs > 1 else float("nan")
    return {"batch": int(x.shape[0]), "runs": runs, "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "ci95": ci, "std": float(ms.std(ddof=1)) if runs > 1 else 0.0,
            "cv": _cv(ms), "min": float(ms.min()), "warmup": wu, "timer": PYTHON_TIMER,
            "inner_p50": float(np.median(inner)) if isinstance(inner, list) and inner else None}


def runtime_side(run, x: np.ndarray, runs: int, lat: dict) -> Optional[dict]:
    """The runtime's own per-call figure: the Runner's own loop where it has one, else the
    per-call timer it recorded during our timed calls (inner_ms), else None."""
    own = getattr(run, "runtime_latency", None)
    if own is not None:
        return own(x, runs)
    if lat.get("inner_p50") is not None:
        timer = (getattr(run, "info", {}) or {}).get("runtime_timer", "the runtime's per-call timer in our calls")
        return {"p50": lat["inner_p50"], "runs": lat["runs"], "timer": timer}
    return None


def vendor_side(run, shape, seconds: float) -> Optional[dict]:
    tool = getattr(run, "vendor_latency", None)
    return tool(tuple(shape), seconds) if tool is not None and seconds > 0 else None


def throughput(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, warmup: int, runs: int,
               search: bool = True, max_rounds: int = 0) -> dict:
    """Items/s at x's batch: the median of rounds of `runs` batches. max_rounds: at most this
    many (0: THROUGHPUT_ROUNDS); `compress bench` passes 1, its own rounds interleave artifacts."""
    max_rounds = max_rounds or THROUGHPUT_ROUNDS
    many = getattr(run, "run_many", None) if search else None
    if many is not None:
        many([x] * max(1, warmup // 4))  # runs the runner's setting search, if it has one
    else:
        for _ in range(max(1, warmup // 4)):
            run(x)
    if (getattr(run, "info", None) or {}).get("threads") not in (1, None):  # its latency runs' workers
        time.sleep(SETTLE_S)  # stop spinning (one thread has none; None: TensorRT, no CPU pool)
    rates, mode, start = [], {"mode": "sequential"}, time.perf_counter()
    while not rates or (len(rates) < max_rounds and time.perf_counter() - start < THROUGHPUT_SECONDS):
        t = time.perf_counter()
        if many is not None:
            mode = many([x] * runs) or {}
        else:
            for _ in range(runs):
                run(x)
        rates.append(x.shape[0] * runs / (time.perf_counter() - t))
    return {"batch": int(x.shape[0]), "runs": runs, "items_per_s": float(np.median(rates)), "rounds": len(rates),
            "rounds_items_per_s": [round(min(rates), 1), round(max(rates), 1)], **mode}


def process_stats() -> dict:
    """CPUs this process may run on (taskset/cgroup pinning shows here) and its memory.
    ru_maxrss is the high-water mark of the whole process (KiB on Linux): it includes what
    was loaded before profiling (torch, the runtime itself)."""
    out = {"cpus_allowed": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        import psutil
        out["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    except ImportError:  # psutil is optional; getrusage covers the peak
        out["rss_mb"] = None
    return out


def profile(run: Callable[[np.ndarray], np.ndarray], sample: np.ndarray, *, warmup: int = 20,
            runs: int = 200, throughput_batch: int = 64, throughput_runs: int = 30,
            batch: int = 1, max_warmup: int = 1000, settle_tolerance: float = 0.05,
            vendor_seconds: float = VENDOR_SECONDS, throughput_search: bool = True) -> dict:
    """sample: a few real, preprocessed inputs; batches are tiled from them so timing
    runs on realistic values (some kernels are data dependent). vendor_seconds: how long the
    vendor's tool runs (0: not run)."""
    reps = int(np.ceil(max(throughput_batch, batch) / len(sample)))
    tiled = np.concatenate([sample] * reps)
    info = getattr(run, "info", {}) or {}
    lat = latency(run, tiled[:batch], warmup, runs, max_warmup, settle_tolerance)
    lat["threads"] = info.get("threads")
    lat["runtime"] = runtime_side(run, tiled[:batch], runs, lat)  # while the latency request is warm
    lat["vendor"] = vendor_side(run, tiled[:batch].shape, vendor_seconds)
    res = {"latency_ms": lat, "throughput": throughput(run, tiled[:throughput_batch], warmup, throughput_runs,
                                                                 throughput_search)}
    res["system"] = {"threads": info.get("threads"), "pinning": info.get("pinning"), **process_stats()}
    return res
