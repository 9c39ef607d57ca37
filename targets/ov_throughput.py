"""OpenVINO throughput settings chosen by measurement: streams x infer requests x the batch of
each request, a small grid timed in two interleaved rounds on the caller's own batches, the
fastest kept. The THROUGHPUT hint's own choice (streams and requests the plugin calls optimal)
is one of the candidates, so the search never keeps a setting measured slower than it.

A request batch smaller than the caller's splits each batch into equal requests: the same
items, more of them in flight (what a server with per-image requests would do).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

ROUNDS = 2  # interleaved: a config timed while another process ran is timed again later
MIN_S = 0.15  # per config and round: long enough to see every request finish a few times


def grid(threads: int, batch: int, dynamic_batch: bool, hint: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(streams, infer requests, request batch): streams 1..threads (powers of 2 and threads
    itself), one or two requests per stream, the whole batch or quarters of it; the hint's first."""
    streams = sorted({s for s in (1, 2, 4, 8, 16) if s <= threads} | {threads, hint[0]})
    sub = sorted({batch, batch // 4} - {0}, reverse=True) if dynamic_batch else [batch]
    out = [(s, s * k, b) for s in streams for k in (1, 2) for b in sub]
    return list(dict.fromkeys([(hint[0], hint[1], batch)] + out))


def split(batches: list, request_batch: int) -> list:
    return [b[i:i + request_batch] for b in batches for i in range(0, len(b), request_batch)]


class Queues:
    """One compiled model per stream count, one AsyncInferQueue per (streams, requests)."""

    def __init__(self, ov, core, model, device: str, props: dict, dtype):
        self.ov, self.core, self.model, self.device, self.props, self.dtype = ov, core, model, device, props, dtype
        self.compiled, self.queues = {}, {}

    def hint(self) -> tuple[int, int]:
        c = self.core.compile_model(self.model, self.device, {**self.props, "PERFORMANCE_HINT": "THROUGHPUT"})
        hint = int(c.get_property("NUM_STREAMS")), int(c.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.compiled[hint[0]] = c
        return hint

    def queue(self, streams: int, nireq: int):
        if streams not in self.compiled:
            self.compiled[streams] = self.core.compile_model(
                self.model, self.device, {**self.props, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams})
        if (streams, nireq) not in self.queues:
            self.queues[(streams, nireq)] = self.ov.AsyncInferQueue(self.compiled[streams], nireq)
        return self.queues[(streams, nireq)]

    def run(self, cfg: tuple[int, int, int], batches: list) -> float:
        """Seconds to run all `batches` (split into cfg's request batch) on cfg's queue."""
        q = self.queue(cfg[0], cfg[1])
        parts = [np.ascontiguousarray(b, self.dtype) for b in split(batches, cfg[2])]
        t = time.perf_counter()
        for p in parts:
            q.start_async({0: p})
        q.wait_all()
        return time.perf_counter() - t


def search(queues: Queues, x: np.ndarray, threads: int, dynamic_batch: bool) -> tuple[tuple, list[dict], tuple]:
    """-> (best (streams, requests, request batch), the table measured, the hint's choice)."""
    hint = queues.hint()
    cfgs = grid(threads, len(x), dynamic_batch, hint)
    per_batch = max(queues.run(cfgs[0], [x] * 2) / 2, 1e-4)  # warm the hint's queue; time one batch
    n = int(min(16, max(2, np.ceil(MIN_S / per_batch))))
    rates: dict = {c: [] for c in cfgs}
    for r in range(ROUNDS):
        for c in cfgs if r % 2 == 0 else cfgs[::-1]:
            queues.run(c, [x])  # warm this queue's requests
            rates[c].append(n * len(x) / queues.run(c, [x] * n))
    table = [{"streams": c[0], "infer_requests": c[1], "request_batch": c[2],
              "items_per_s": statistics.median(v)} for c, v in rates.items()]
    best = max(rates, key=lambda c: statistics.median(rates[c]))
    return best, table, hint
