"""The regression gate of `compress bench`: each metric with its direction, compared with a
baseline (or a rolling window of history) of the same device, regressing only when it is
worse beyond a tolerance AND outside the noise.

Why this test. Latency is measured in k interleaved rounds (every artifact's round 1, then
every artifact's round 2, ...), so a slow minute on a shared runner lands on all artifacts
instead of one; each round gives one median. The k current round values are compared with
the baseline's stored round values by the Hodges-Lehmann estimate of their ratio (the median
of all k x m pairwise ratios) and its distribution-free confidence interval from the exact
Mann-Whitney U distribution (Moses' interval; Hollander & Wolfe, Nonparametric Statistical
Methods, ch. 4.3). Chosen over a bootstrap CI of the ratio of medians because a bootstrap
of 5 values is too narrow (it cannot see beyond the 5 values it has, so it under-covers and
cries wolf), and over a bare Mann-Whitney p-value because the gate's message must carry an
interval. It needs no scipy (the U distribution is a short dynamic program) and makes no
normality assumption (latency is right-skewed). With k = m = 5 the smallest two-sided
p-value is 2/252, so 95% intervals exist from k = 4 on.

The tolerance stays necessary even with the interval: between two CI jobs the machine itself
changes (another tenant, turbo state), which within-run rounds cannot see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

ALPHA = 0.05  # two-sided: a regression is called when the whole 95% interval is on the worse side


@dataclass(frozen=True)
class Metric:
    unit: str
    lower_is_better: bool
    tolerance: float  # relative for "rounds" and size, absolute for accuracy/agreement
    rounds: bool = False  # compared as distributions of per-round values


# Absolute timings (gated with --gate absolute|both: a dedicated device): 10% p50, 25% p90
# (the 10th-largest of 100 runs: one preemption moves it; it cancels least against the teacher
# too: a 1.19x relative p90 came out significant in a repeat with nothing changed), 10% throughput.
# Relative timings, `*_vs_teacher` (the default gate): each round's value divided by the
# teacher's on the same backend in the same round, so load from other tenants cancels. Measured
# with 10 benches of an unchanged run against a baseline on a shared 2-core box: while its load
# rose from ~2 to ~6.5 the absolute p50/p90/throughput flagged 3/8/7 of the 10 benches, the
# relative ones 0/0/2 at 10% tolerance and 0/0/1 at 25% (throughput's mode uses every core, so
# it cancels least); under a steady load the absolute gate flagged 2 of 10, the relative 0 of 10
# (a fixed 10% threshold without the interval, as github-action-benchmark does: 8 of 10).
# 0.005 accuracy: the deploy parity gate's max_acc_drop (half a point, past test-split noise).
METRICS = {
    "latency_p50_ms": Metric("ms", True, 0.10, rounds=True),
    "latency_p90_ms": Metric("ms", True, 0.25, rounds=True),
    "throughput": Metric("items/s", False, 0.10, rounds=True),
    "latency_p50_vs_teacher": Metric("x teacher", True, 0.10, rounds=True),
    "latency_p90_vs_teacher": Metric("x teacher", True, 0.25, rounds=True),
    "throughput_vs_teacher": Metric("x teacher", False, 0.25, rounds=True),
    "accuracy": Metric("fraction", False, 0.005),
    "agreement": Metric("fraction", False, 0.005),
    "size_bytes": Metric("bytes", True, 0.01),
}
ABSOLUTE = ("latency_p50_ms", "latency_p90_ms", "throughput")
RELATIVE = tuple(f"{m.removesuffix('_ms')}_vs_teacher" for m in ABSOLUTE)
GATES = {"relative": set(METRICS) - set(ABSOLUTE), "absolute": set(METRICS) - set(RELATIVE), "both": set(METRICS)}


@lru_cache(maxsize=64)
def _u_cdf(n: int, m: int) -> tuple:
    """P(U <= u), u = 0..n*m, of the Mann-Whitney U statistic under the null, exactly:
    f(i, j)[u] = f(i-1, j)[u-j] + f(i, j-1)[u] counts orderings (float: C(100, 50) > 2^63)."""
    prev = [np.ones(1) for _ in range(m + 1)]  # i = 0
    for i in range(1, n + 1):
        cur = [np.ones(1)]
        for j in range(1, m + 1):
            a = np.zeros(i * j + 1)
            a[j:j + len(prev[j])] += prev[j]
            a[:len(cur[j - 1])] += cur[j - 1]
            cur.append(a)
        prev = cur
    counts = prev[m]
    return tuple(np.cumsum(counts) / counts.sum())


def ratio_interval(current, baseline, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(Hodges-Lehmann ratio current/baseline, interval low, interval high); the interval is
    (0, inf) when too few values exist for one at this level."""
    cur, base = np.log(np.asarray(current, float)), np.log(np.asarray(baseline, float))
    d = np.sort((cur[:, None] - base[None, :]).ravel())
    est = math.exp(float(np.median(d)))
    cdf = _u_cdf(len(cur), len(base))
    c = sum(1 for p in cdf if p <= alpha / 2)  # P(U <= c-1) <= alpha/2
    if c == 0:
        return est, 0.0, math.inf
    return est, math.exp(float(d[c - 1])), math.exp(float(d[len(d) - c]))


@dataclass
class Verdict:
    metric: str
    current: Optional[float]
    baseline: Optional[float]
    regressed: bool
    interval: str  # what the decision was based on, for people
    reason: str = ""
    check: str = ""  # which check of the metric: "" (against the baseline), "floor", "parity"


def compare_rounds(name: str, cur: dict, base: dict, tolerance: Optional[float] = None) -> Verdict:
    m = METRICS[name]
    tol = m.tolerance if tolerance is None else tolerance
    ratio, lo, hi = ratio_interval(cur["rounds"], base["rounds"])
    if m.lower_is_better:
        worse = ratio > 1 + tol and lo > 1
    else:
        worse = ratio < 1 - tol and hi < 1
    interval = (f"ratio {ratio:.3f}, {100 * (1 - ALPHA):.0f}% CI [{lo:.3f}, {hi:.3f}] over "
                f"{len(cur['rounds'])} vs {len(base['rounds'])} rounds, tolerance {tol:.0%}")
    why = ""
    if not worse and (ratio > 1 + tol if m.lower_is_better else ratio < 1 - tol):
        why = "beyond the tolerance but within the noise"
    return Verdict(name, cur["value"], base["value"], worse, interval, why)


def compare_exact(name: str, cur: float, base: float, tolerance: Optional[float] = None) -> Verdict:
    """Metrics without run-to-run noise (accuracy on a fixed split, file size)."""
    m = METRICS[name]
    tol = m.tolerance if tolerance is None else tolerance
    if name == "size_bytes":
        limit = base * (1 + tol)
        return Verdict(name, cur, base, cur > limit, f"limit {limit:.0f} (+{tol:.0%})")
    limit = base - tol if not m.lower_is_better else base + tol
    worse = cur < limit if not m.lower_is_better else cur > limit
    return Verdict(name, cur, base, worse, f"limit {limit:.4f} (baseline {'+' if m.lower_is_better else '-'} {tol:g})")


def floor_verdict(accuracy: float, teacher: float, fraction: float) -> Verdict:
    """MLPerf's accuracy rule: at least `fraction` of the reference (FP32 teacher) accuracy,
    whatever the baseline says (a baseline that drifted down slowly passes every drop check)."""
    floor = fraction * teacher
    return Verdict("accuracy", accuracy, None, accuracy < floor,
                   f"floor {floor:.4f} = {fraction:g} x teacher {teacher:.4f}",
                   "below the accuracy floor" if accuracy < floor else "", check="floor")


def gate_case(cur: dict, base: Optional[dict], teacher_accuracy: Optional[float], floor: float,
              tolerances: dict, gated: Optional[set] = None) -> list[Verdict]:
    """Every gated metric of one (artifact, backend) case: cur/base are {metric: {value, rounds?}};
    gated: the metric names to compare (GATES[...]; default: all)."""
    out = []
    if teacher_accuracy is not None and cur.get("accuracy"):
        out.append(floor_verdict(cur["accuracy"]["value"], teacher_accuracy, floor))
    for name, m in METRICS.items():
        if gated is not None and name not in gated:
            continue
        c, b = cur.get(name), (base or {}).get(name)
        if not c or not b or c.get("value") is None or b.get("value") is None:
            continue
        if m.rounds and c.get("rounds") and b.get("rounds"):
            out.append(compare_rounds(name, c, b, tolerances.get(name)))
        elif not m.rounds:
            out.append(compare_exact(name, c["value"], b["value"], tolerances.get(name)))
    return out


def pooled(entries: list[dict]) -> dict:
    """Several earlier results of one case (a history window) as one baseline: each metric's
    round values pooled (the between-run spread is then part of the noise), value the median."""
    out: dict = {}
    for name in METRICS:
        vals = [e[name] for e in entries if e.get(name) and e[name].get("value") is not None]
        if not vals:
            continue
        rounds = [r for v in vals for r in v.get("rounds") or []]
        out[name] = {"value": float(np.median([v["value"] for v in vals])), **({"rounds": rounds} if rounds else {})}
    return out
