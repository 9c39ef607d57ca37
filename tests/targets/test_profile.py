import time

import numpy as np

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
    # sleep never returns early; scheduler noise only adds
    assert 2.1 <= lat["p50"] < 6 and lat["p50"] <= lat["p90"] <= lat["p99"]
    assert lat["batch"] == 1 and lat["runs"] == 100
    ideal = 32 / (0.002 + 0.0001 * 32)
    thr = res["throughput"]
    assert thr["batch"] == 32 and 0.4 * ideal < thr["items_per_s"] <= 1.01 * ideal
    assert r.calls >= 5 + 100 + 10
