"""ONNX Runtime throughput: the session as configured (one caller, all intra-op threads on each
batch), or, chosen by measurement, one intra-op thread per session run and as many Python
threads calling run() at once as the session had intra-op threads: ORT's analog of OpenVINO's
streams (ORT sessions are thread-safe for run(); the call releases the GIL).

Measured on the int8 teacher at batch 64, 2 threads, 5 interleaved rounds (benchmarks/RESULTS.md,
issue 16): one caller reached 0.60x OpenVINO's throughput, this search's choice (two
single-threaded callers) 0.85x.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

ROUNDS = 2  # interleaved, as targets/ov_throughput.py
MIN_S = 0.15


def run(session, name: str, batches: list, callers: int, pool) -> float:
    """Seconds to run all batches, split over `callers` threads."""
    t = time.perf_counter()
    if callers == 1:
        for b in batches:
            session.run(None, {name: b})
    else:
        list(pool.map(lambda part: [session.run(None, {name: b}) for b in part],
                      [batches[i::callers] for i in range(callers)]))
    return time.perf_counter() - t


class Search:
    """candidates: {(callers, intra-op threads per run): session}."""

    def __init__(self, candidates: dict, name: str):
        self.candidates, self.name = candidates, name
        self.pool = ThreadPoolExecutor(max(c for c, _ in candidates))
        self.best, self.table = None, []

    def choose(self, x) -> None:
        first = next(iter(self.candidates))
        per = max(run(self.candidates[first], self.name, [x] * 2, first[0], self.pool) / 2, 1e-4)
        n = int(min(16, max(2, -(-MIN_S // per))))
        rates: dict = {c: [] for c in self.candidates}
        for r in range(ROUNDS):
            for c in list(self.candidates)[:: 1 if r % 2 == 0 else -1]:
                run(self.candidates[c], self.name, [x] * c[0], c[0], self.pool)  # warm every caller
                rates[c].append(n * len(x) / run(self.candidates[c], self.name, [x] * n, c[0], self.pool))
        self.table = [{"callers": c[0], "intra_op_threads": c[1], "items_per_s": statistics.median(v)}
                      for c, v in rates.items()]
        self.best = max(rates, key=lambda c: statistics.median(rates[c]))

    def __call__(self, batches: list) -> dict:
        if self.best is None:
            self.choose(batches[0])
        run(self.candidates[self.best], self.name, batches, self.best[0], self.pool)
        return {"mode": "onnxruntime: callers x intra-op threads chosen by measurement", "callers": self.best[0],
                "intra_op_threads": self.best[1], "search": self.table}
