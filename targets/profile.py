"""The one timing harness for every backend: warm-up until the timings settle, batch-1
latency percentiles with a confidence interval, throughput at a larger batch in the
backend's throughput mode, and what the process looked like while it ran (threads, CPUs
it may run on, peak resident memory). Any Runner (a callable on a float32 batch) is timed
the same way, so numbers across backends are comparable.

A Runner may offer `run_many(batches)`: run all batches with the backend's own
parallelism (OpenVINO: THROUGHPUT hint + AsyncInferQueue); without it the throughput
runs are sequential calls.
"""
from __future__ import annotations

import os
import resource
import time
from typing import Callable

import numpy as np

WINDOW = 20  # warm-up runs per window: enough for a median and a CV, small enough to stop early


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
            "cv": _cv(ms), "min": float(ms.min()), "warmup": wu,
            "inner_p50": float(np.median(inner)) if isinstance(inner, list) and inner else None}


def throughput(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, warmup: int, runs: int) -> dict:
    many = getattr(run, "run_many", None)
    if many is not None:
        many([x] * max(1, warmup // 4))
        t = time.perf_counter()
        mode = many([x] * runs) or {}
    else:
        for _ in range(max(1, warmup // 4)):
            run(x)
        t = time.perf_counter()
        for _ in range(runs):
            run(x)
        mode = {"mode": "sequential"}
    elapsed = time.perf_counter() - t
    return {"batch": int(x.shape[0]), "runs": runs, "items_per_s": float(x.shape[0] * runs / elapsed),
            **mode}


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
            batch: int = 1, max_warmup: int = 1000, settle_tolerance: float = 0.05) -> dict:
    """sample: a few real, preprocessed inputs; batches are tiled from them so timing
    runs on realistic values (some kernels are data dependent)."""
    reps = int(np.ceil(max(throughput_batch, batch) / len(sample)))
    tiled = np.concatenate([sample] * reps)
    info = getattr(run, "info", {}) or {}
    res = {"latency_ms": latency(run, tiled[:batch], warmup, runs, max_warmup, settle_tolerance),
           "throughput": throughput(run, tiled[:throughput_batch], warmup, throughput_runs)}
    res["latency_ms"]["threads"] = info.get("threads")
    res["system"] = {"threads": info.get("threads"), "pinning": info.get("pinning"), **process_stats()}
    return res
