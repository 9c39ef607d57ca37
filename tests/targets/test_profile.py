import time

import numpy as np
import pytest

from targets.profile import profile


class SleepRunner:
    """A fake backend: a fixed sleep per call plus a per-item cost."""

    def __init__(self, base_s=0.002, per_item_s=0.0001):
        self.base_s, self.per_item_s, self.calls = base_s, per_item_s, 0

    def __call__(self, x):
        self.calls += 1
        time.sleep(self.base_s + self.per_item_s * len(x))
        return np.zeros((len(x), 10), np.float32)


def test_harness_statistics_on_a_known_runner():
    r = SleepRunner()
    res = profile(r, np.zeros((8, 1, 4, 4), np.float32), warmup=5, runs=100,
                  throughput_batch=32, throughput_runs=10)
    lat = res["latency_ms"]
    # sleep never returns early; scheduler noise only adds (so only lower bounds on time: a
    # loaded machine may be arbitrarily slow)
    assert 2.1 <= lat["p50"] and lat["p50"] <= lat["p90"] <= lat["p99"]
    assert lat["batch"] == 1 and lat["runs"] == 100
    ideal = 32 / (0.002 + 0.0001 * 32)
    thr = res["throughput"]
    assert thr["batch"] == 32 and 0 < thr["items_per_s"] <= 1.01 * ideal
    assert r.calls >= 5 + 100 + 10


class ColdStartRunner(SleepRunner):
    """Slow for its first `cold` calls (caches, JIT, lazy allocation), then steady."""

    def __init__(self, cold=45, cold_s=0.03, **kw):
        super().__init__(**kw)
        self.cold, self.cold_s = cold, cold_s

    def __call__(self, x):
        if self.calls < self.cold:
            time.sleep(self.cold_s)
        return super().__call__(x)


def test_warm_up_runs_until_timings_settle():
    r = ColdStartRunner(per_item_s=0.0)
    res = profile(r, np.zeros((1, 1, 4, 4), np.float32), warmup=5, runs=100,
                  throughput_batch=1, throughput_runs=1, max_warmup=400, settle_tolerance=0.2)
    wu = res["latency_ms"]["warmup"]
    # the cold calls are all spent in warm-up, none in the timed runs
    assert wu["settled"] and 45 <= wu["runs"] <= 400
    assert res["latency_ms"]["p99"] < 25  # a cold call (32 ms) would show in p99


def test_warm_up_is_capped_and_says_so():
    class Noisy(SleepRunner):  # alternating 1 ms / 4 ms windows never settle at 1%
        def __call__(self, x):
            self.calls += 1
            time.sleep(0.001 if (self.calls // 20) % 2 else 0.004)
            return np.zeros((len(x), 10), np.float32)
    res = profile(Noisy(), np.zeros((1, 1, 4, 4), np.float32), warmup=0, runs=100,
                  throughput_batch=1, throughput_runs=1, max_warmup=100, settle_tolerance=0.01)
    wu = res["latency_ms"]["warmup"]
    assert not wu["settled"] and wu["runs"] <= 100


def test_mean_confidence_interval_and_process_stats():
    res = profile(SleepRunner(), np.zeros((4, 1, 4, 4), np.float32), warmup=5, runs=100,
                  throughput_batch=4, throughput_runs=2)
    lat = res["latency_ms"]
    assert 2.1 <= lat["mean"] and 0 < lat["ci95"] < lat["mean"]
    assert lat["ci95"] == pytest.approx(1.96 * lat["std"] / 10, rel=1e-6)
    sysinfo = res["system"]
    assert sysinfo["peak_rss_mb"] > 10 and sysinfo["cpus_allowed"]


def test_throughput_uses_the_backends_own_mode():
    """A runner with run_many (like OpenVINO's async queue) is timed through it."""
    class Parallel(SleepRunner):
        def run_many(self, batches):
            from concurrent.futures import ThreadPoolExecutor
            batches = list(batches)
            self.many.append([len(b) for b in batches])
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(self, batches))
            return {"mode": "fake async", "infer_requests": 4}
    runner = Parallel()
    runner.many = []
    res = profile(runner, np.zeros((4, 1, 4, 4), np.float32), warmup=4, runs=100,
                  throughput_batch=8, throughput_runs=16)
    thr = res["throughput"]
    # structural, not timed (a loaded machine decides speeds): the throughput pass went
    # through run_many with its batches, and the backend's own mode is reported
    assert thr["mode"] == "fake async" and thr["infer_requests"] == 4
    assert runner.many and all(set(sizes) == {8} for sizes in runner.many)
    assert sum(len(s) for s in runner.many) >= 16 and thr["items_per_s"] > 0


def test_runtime_own_timer_is_summarised_over_the_timed_runs_only():
    class Timed(SleepRunner):  # reports 1.5 ms "inside the runtime" per call
        inner_ms: list

        def __call__(self, x):
            self.inner_ms.append(1.5)
            return super().__call__(x)
    r = Timed()
    r.inner_ms = [99.0] * 7  # left from before profiling: must not count
    res = profile(r, np.zeros((1, 1, 4, 4), np.float32), warmup=3, runs=100, throughput_batch=1,
                  throughput_runs=1)
    assert res["latency_ms"]["inner_p50"] == 1.5 and len(r.inner_ms) >= 100
    assert profile(SleepRunner(), np.zeros((1, 1, 4, 4), np.float32), warmup=0, runs=100,
                   throughput_batch=1, throughput_runs=1)["latency_ms"]["inner_p50"] is None


def test_throughput_is_the_median_of_rounds_so_one_slow_round_does_not_set_it(monkeypatch):
    import targets.profile as prof
    monkeypatch.setattr(prof, "THROUGHPUT_SECONDS", 10.0)  # bounded by rounds here
    calls = []

    def run(x):  # the first timed round is 10x slower (a machine busy elsewhere), the rest steady
        calls.append(1)
        time.sleep(0.02 if len(calls) <= 1 + 4 else 0.002)  # warm-up: 1 call (warmup 4 // 4)
        return x
    out = prof.throughput(run, np.zeros((8, 1), np.float32), warmup=4, runs=4, search=False)
    assert out["rounds"] == prof.THROUGHPUT_ROUNDS
    lo, hi = out["rounds_items_per_s"]
    assert hi > 5 * lo  # the slow round was measured...
    assert out["items_per_s"] > 0.5 * hi  # ...and the median of rounds is the steady rate, not that round
