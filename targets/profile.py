"""The one timing harness for every backend: warm-up, batch-1 latency percentiles,
throughput at a larger batch. Any Runner (a callable on a float32 batch) is timed the
same way, so numbers across backends are comparable."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def latency(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        run(x)
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        run(x)
        times[i] = time.perf_counter() - t
    ms = times * 1e3
    return {"batch": int(x.shape[0]), "runs": runs, "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "min": float(ms.min())}


def throughput(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, warmup: int, runs: int) -> dict:
    for _ in range(max(1, warmup // 4)):
        run(x)
    t = time.perf_counter()
    for _ in range(runs):
        run(x)
    elapsed = time.perf_counter() - t
    return {"batch": int(x.shape[0]), "runs": runs, "items_per_s": float(x.shape[0] * runs / elapsed)}


def profile(run: Callable[[np.ndarray], np.ndarray], sample: np.ndarray, *, warmup: int = 20,
            runs: int = 200, throughput_batch: int = 64, throughput_runs: int = 30,
            batch: int = 1) -> dict:
    """sample: a few real, preprocessed inputs; batches are tiled from them so timing
    runs on realistic values (some kernels are data dependent)."""
    reps = int(np.ceil(throughput_batch / len(sample)))
    big = np.concatenate([sample] * reps)[:throughput_batch]
    return {"latency_ms": latency(run, sample[:batch], warmup, runs),
            "throughput": throughput(run, big, warmup, throughput_runs)}
