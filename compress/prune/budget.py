"""Prune to a latency budget measured on the deployment backend, not to a FLOP count
(pruned models are often no faster on the real runtime: Torch-Pruning #149, #382).

Bisection over the channel ratio: each candidate is pruned one-shot from a copy, exported,
compiled on the backend, and timed against the unpruned model in the same process,
interleaved in rounds, so the ratio survives the machine's noise. The smallest ratio whose
measured latency meets the budget wins; every candidate's numbers go to metrics.json.
Export, compile and timing are ctx.latency's (compress.measure): nothing here knows a backend."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from compress.prune.channels import GRADIENT_CRITERIA, prune_channels


def _input(ctx, batch: int) -> np.ndarray:
    """Real calibration images (some kernels' speed depends on values), tiled to the batch."""
    x = ctx.data.normalize(ctx.calib.images[:batch]).numpy()
    return np.ascontiguousarray(np.resize(x, (batch, *ctx.data.input_shape)).astype(np.float32))


def _macs(ctx, model: nn.Module) -> int:
    return ctx.model_stats(model, model, ctx.data.input_shape)["macs"]


def _bisect(measure, t, best: dict) -> dict:
    """The smallest ratio in (0, max_ratio] that meets the goal, in t.iterations steps."""
    lo, hi = 0.0, t.max_ratio
    for _ in range(t.iterations):
        mid = (lo + hi) / 2
        r = measure(mid)
        if r["met"]:
            hi, best = mid, r
        else:
            lo = mid
    return best


def search(model: nn.Module, reference: nn.Module, ctx, cfg) -> tuple[float, dict]:
    """Channel ratio for `model` (blocks may already be removed) so that it meets the
    budget relative to `reference`, the model that entered the stage. Returns (chosen
    ratio, the search record)."""
    t = cfg.target
    # data-free criteria only: gradient ones need recovery-time data and a teacher per candidate
    crit = cfg.importance if cfg.importance not in GRADIENT_CRITERIA else "l2"
    with ctx.latency.session(t.backend, t.threads, _input(ctx, t.batch)) as s:
        base = s.compile(reference)
        b0, _ = s.paired_p50(base, base, t.runs)
        goal = t.latency_ms / b0 if t.latency_ms else 1.0 / t.speedup
        ctx.log(f"  latency search on {t.backend} b{t.batch}: unpruned p50 {b0:.3f} ms, "
                f"goal {goal:.2f}x of it")
        rows: list[dict] = []

        def measure(ratio: float) -> dict:
            cand = copy.deepcopy(model).eval()
            if ratio > 0:
                prune_channels(cand, cfg.model_copy(update={"ratio": ratio, "importance": crit}),
                               torch.zeros(1, *ctx.data.input_shape))
            bm, cm = s.paired_p50(base, s.compile(cand), t.runs)
            row = {"ratio": round(ratio, 4), **ctx.model_stats(cand, cand, ctx.data.input_shape),
                   "p50_ms": cm, "unpruned_p50_ms": bm, "latency_ratio": cm / bm, "met": cm / bm <= goal}
            ctx.log(f"    ratio {ratio:.3f}: {cm:.3f} ms vs {bm:.3f} ms unpruned "
                    f"= {cm / bm:.2f}x ({'meets' if row['met'] else 'misses'} {goal:.2f}x)")
            rows.append(row)
            return row

        best = measure(t.max_ratio)
        if best["met"] and _macs(ctx, model) < _macs(ctx, reference):
            # removed blocks may meet the budget alone: then no channel needs to go
            zero = measure(0.0)
            best = zero if zero["met"] else best
        if best["met"] and best["ratio"] > 0:
            best = _bisect(measure, t, best)
        elif not best["met"]:
            ctx.log(f"  latency budget not reachable by max_ratio {t.max_ratio}: using it")
    record = {"backend": t.backend, "batch": t.batch, "threads": t.threads,
              "unpruned_p50_ms": b0, "goal_ratio": goal, "budget_ms": t.latency_ms,
              "speedup": t.speedup, "criterion": crit, "chosen_ratio": best["ratio"],
              "met": best["met"], "candidates": rows}
    return best["ratio"], record


def measure_final(unpruned: nn.Module, pruned: nn.Module, ctx, cfg) -> dict:
    """The recovered model's latency ratio, timed the same way (the achieved speedup)."""
    t = cfg.target
    with ctx.latency.session(t.backend, t.threads, _input(ctx, t.batch)) as s:
        bm, cm = s.paired_p50(s.compile(unpruned), s.compile(pruned), t.runs)
    return {"p50_ms": cm, "unpruned_p50_ms": bm, "latency_ratio": cm / bm}
