"""Prune to a latency budget measured on the deployment backend, not to a FLOP count
(pruned models are often no faster on the real runtime: Torch-Pruning #149, #382).

Bisection over the channel ratio: each candidate is pruned one-shot from a copy, exported,
compiled on the backend, and timed against the unpruned model in the same process,
interleaved in rounds, so the ratio survives the machine's noise. The smallest ratio whose
measured latency meets the budget wins; every candidate's numbers go to metrics.json."""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.prune.channels import GRADIENT_CRITERIA, prune_channels

ROUNDS = 5


def compile_float(model: nn.Module, work: Path, input_shape, target, cfg):
    from compress.export import export_float
    from targets.base import CompileOptions
    work.mkdir(parents=True, exist_ok=True)
    path = work / "model.onnx"
    export_float(model, path, input_shape, opset=17)
    path = target.prepare(path, work)
    return target.compile(path, CompileOptions(threads=cfg.threads, precision="fp32", work_dir=work))


def _input(ctx, batch: int) -> np.ndarray:
    """Real calibration images (some kernels' speed depends on values), tiled to the batch."""
    x = ctx.data.normalize(ctx.calib.images[:batch]).numpy()
    return np.ascontiguousarray(np.resize(x, (batch, *ctx.data.input_shape)).astype(np.float32))


def paired_p50(base, cand, x: np.ndarray, runs: int) -> tuple[float, float]:
    """Median over rounds of each model's p50, the two alternating within each round."""
    from targets.profile import latency
    per = max(5, runs // ROUNDS)
    b, c = [], []
    for _ in range(ROUNDS):
        # short warm-ups: both models were already warmed in earlier rounds
        b.append(latency(base, x, warmup=3, runs=per, max_warmup=40)["p50"])
        c.append(latency(cand, x, warmup=3, runs=per, max_warmup=40)["p50"])
    return float(np.median(b)), float(np.median(c))


def search(model: nn.Module, reference: nn.Module, ctx, cfg) -> tuple[float, dict]:
    """Channel ratio for `model` (blocks may already be removed) so that it meets the
    budget relative to `reference`, the model that entered the stage. Returns (chosen
    ratio, the search record)."""
    from compress.pipeline import model_stats
    from targets import base as targets
    t = cfg.target
    target = targets.get(t.backend)
    ok, why = target.available()
    if not ok:
        from compress.errors import UserError
        raise UserError(f"prune.target.backend={t.backend}: not available here ({why})")
    # data-free criteria only: gradient ones need recovery-time data and a teacher per candidate
    crit = cfg.importance if cfg.importance not in GRADIENT_CRITERIA else "l2"
    shape = ctx.data.input_shape
    x = _input(ctx, t.batch)
    work = Path(tempfile.mkdtemp(prefix="latency-search-"))
    try:
        base = compile_float(reference, work / "base", shape, target, t)
        b0, _ = paired_p50(base, base, x, t.runs)
        goal = t.latency_ms / b0 if t.latency_ms else 1.0 / t.speedup
        ctx.log(f"  latency search on {t.backend} b{t.batch}: unpruned p50 {b0:.3f} ms, "
                f"goal {goal:.2f}x of it")
        rows: list[dict] = []

        def measure(ratio: float) -> dict:
            cand = copy.deepcopy(model).eval()
            if ratio > 0:
                prune_channels(cand, cfg.model_copy(update={"ratio": ratio, "importance": crit}),
                               torch.zeros(1, *shape))
            runner = compile_float(cand, work / f"r{ratio:.4f}", shape, target, t)
            bm, cm = paired_p50(base, runner, x, t.runs)
            row = {"ratio": round(ratio, 4), **model_stats(cand, cand, ctx.data),
                   "p50_ms": cm, "unpruned_p50_ms": bm, "latency_ratio": cm / bm,
                   "met": cm / bm <= goal}
            ctx.log(f"    ratio {ratio:.3f}: {cm:.3f} ms vs {bm:.3f} ms unpruned "
                    f"= {cm / bm:.2f}x ({'meets' if row['met'] else 'misses'} {goal:.2f}x)")
            rows.append(row)
            return row

        lo, hi = 0.0, t.max_ratio
        best = measure(hi)
        changed = model_stats(model, model, ctx.data)["macs"] < model_stats(reference, reference, ctx.data)["macs"]
        if best["met"] and changed:
            # removed blocks may meet the budget alone: then no channel needs to go
            zero = measure(0.0)
            if zero["met"]:
                best, hi = zero, 0.0
        if best["met"] and hi > 0:
            for _ in range(t.iterations):
                mid = (lo + hi) / 2
                r = measure(mid)
                if r["met"]:
                    hi, best = mid, r
                else:
                    lo = mid
        else:
            ctx.log(f"  latency budget not reachable by max_ratio {t.max_ratio}: using it")
        record = {"backend": t.backend, "batch": t.batch, "threads": t.threads,
                  "unpruned_p50_ms": b0, "goal_ratio": goal, "budget_ms": t.latency_ms,
                  "speedup": t.speedup, "criterion": crit, "chosen_ratio": best["ratio"],
                  "met": best["met"], "candidates": rows}
        return best["ratio"], record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_final(unpruned: nn.Module, pruned: nn.Module, ctx, cfg) -> dict:
    """The recovered model's latency ratio, timed the same way (the achieved speedup)."""
    from targets import base as targets
    t = cfg.target
    target = targets.get(t.backend)
    shape = ctx.data.input_shape
    x = _input(ctx, t.batch)
    work = Path(tempfile.mkdtemp(prefix="latency-final-"))
    try:
        a = compile_float(unpruned, work / "base", shape, target, t)
        b = compile_float(pruned, work / "final", shape, target, t)
        bm, cm = paired_p50(a, b, x, t.runs)
        return {"p50_ms": cm, "unpruned_p50_ms": bm, "latency_ratio": cm / bm}
    finally:
        shutil.rmtree(work, ignore_errors=True)
