"""Mixed precision by measured sensitivity (HAWQ-style budget, measured rather than estimated):
lower one layer at a time to the low bit width, measure how much the stage's objective grows
on calibration data, then lower the layers that cost least per weight bit saved until the
budget is met."""
from __future__ import annotations

import copy

import torch
from torch import nn

from compress.distill.objectives import Objective
from compress.quantize.calibrate import pass_calibration_data
from compress.quantize.graph import quantize_graph


@torch.no_grad()
def objective_on_calib(qmodel: nn.Module, ctx, terms, n_batches: int, teacher_out: list) -> float:
    """Mean of the configured objective (teacher terms against the teacher's logits, ce against
    labels) over the first n calibration batches."""
    objective = Objective(terms, task=ctx.task)
    qmodel.eval()
    total, seen = 0.0, 0
    for i, (x, y) in enumerate(ctx.calib_batches(n_batches)):
        loss, _ = objective(qmodel(x).float(), teacher_out[i], y, 0.0)
        total, seen = total + float(loss), seen + 1
    return total / max(1, seen)


@torch.no_grad()
def teacher_logits(ctx, objective_terms, n_batches: int) -> list:
    needs = Objective(objective_terms).needs_teacher
    return [ctx.teacher.eval()(x).float() if needs else None for x, _ in ctx.calib_batches(n_batches)]


def measure(graph: nn.Module, qsettings: dict, base_bits: dict[str, int], candidates: list[str],
            low_bits: int, ctx, cfg, n_batches: int) -> tuple[float, dict[str, float]]:
    """(objective with base_bits, {layer: objective increase with only that layer at low_bits}).
    Every trial is a fresh quantization of the same float graph, calibrated on the same
    batches in the same order: no randomness, so the table is reproducible."""
    t_out = teacher_logits(ctx, cfg.loss, n_batches)

    def trial(bits: dict[str, int]) -> float:
        torch.manual_seed(ctx.seed)
        q = quantize_graph(copy.deepcopy(graph), {**qsettings, "layer_bits": bits})
        pass_calibration_data(q, ctx, cfg.calib_batches, "calibrate")
        return objective_on_calib(q, ctx, cfg.loss, n_batches, t_out)

    base = trial(base_bits)
    return base, {n: trial({**base_bits, n: low_bits}) - base for n in candidates}


def assign(weights: dict[str, int], bits: dict[str, int], delta: dict[str, float], low_bits: int,
           target_avg: float) -> list[str]:
    """Lower candidates in order of objective increase per weight bit saved (a greedy knapsack;
    ties by name, so the order is total) until the weight-count-weighted average meets the
    target. Returns the layers lowered, in order. May stop short of the target when every
    candidate is low already: the caller reports the average reached."""
    n_total = sum(weights.values())
    cost = sum(weights[n] * bits[n] for n in weights)
    lowered = []
    order = sorted(delta, key=lambda n: (delta[n] / (weights[n] * (bits[n] - low_bits)), n))
    for n in order:
        if cost / n_total <= target_avg + 1e-9:
            break
        cost -= weights[n] * (bits[n] - low_bits)
        bits[n] = low_bits
        lowered.append(n)
    return lowered


def mixed_precision(graph: nn.Module, qsettings: dict, bits: dict[str, int], fixed: set[str],
                    weights: dict[str, int], ctx, cfg) -> tuple[dict[str, int], dict]:
    """Pick bit widths for the layers not fixed by the config. Returns (bits, metrics).
    Under torchrun rank 0 measures and chooses; every rank gets its choice."""
    from compress import distributed
    return distributed.on_main(lambda: _choose(graph, qsettings, bits, fixed, weights, ctx, cfg))


def _choose(graph: nn.Module, qsettings: dict, bits: dict[str, int], fixed: set[str],
            weights: dict[str, int], ctx, cfg) -> tuple[dict[str, int], dict]:
    mp = cfg.mixed_precision
    target = mp.avg_bits if mp.avg_bits is not None else 8.0 * mp.weight_bytes / sum(weights.values())
    candidates = [n for n in bits if n not in fixed and bits[n] > mp.low_bits]
    base, delta = measure(graph, qsettings, bits, candidates, mp.low_bits, ctx, cfg, mp.batches)
    bits = dict(bits)
    lowered = assign(weights, bits, delta, mp.low_bits, target)
    avg = sum(weights[n] * bits[n] for n in weights) / sum(weights.values())
    table = [{"layer": n, "weights": weights[n], "objective_delta": delta.get(n),
              "bits": bits[n], "fixed": n in fixed} for n in bits]
    table.sort(key=lambda r: (r["objective_delta"] is None, -(r["objective_delta"] or 0.0), r["layer"]))
    metrics = {"sensitivity": table, "sensitivity_base_objective": base,
               "mixed_precision": {"target_avg_bits": target, "avg_bits": avg, "lowered": lowered,
                                   "weight_bytes": sum(weights[n] * bits[n] for n in weights) / 8,
                                   "met": avg <= target + 1e-9}}
    return bits, metrics
