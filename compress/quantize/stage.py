"""The quantize stage: prepare (brevitas graph quantization) -> calibrate -> QAT with KD.

Weights per output channel at the configured bits (int8 storage, b-bit range), activations
int8/uint8 per tensor or float (weight-only), biases int32 (so runtimes can fuse Conv+bias
into one integer kernel). BatchNorm is merged into the convolutions first, as every integer
runtime does at deployment anyway.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from compress.quantize.calibrate import equalize_activations, layer_sqnr, pass_calibration_data
from compress.quantize.config import QuantizeConfig, settings
from compress.quantize.graph import (check_layer_names, compute_layers, preprocess, quantize_graph,
                                     resolve_bits, weight_counts)
from compress.train import accuracy, fit, predict


def check(model: nn.Module, cfg: QuantizeConfig, where: str) -> None:
    """Before any work: every per-layer name must be a compute layer of the model."""
    check_layer_names(model, list(cfg.layer_bits), f"{where}.layer_bits")


def format_name(qs: dict) -> str:
    """W8A8, W4A8, W4A16 weight-only, W4/8A8 mixed."""
    bits = sorted(set(qs["layer_bits"].values())) or [qs["weight_bits"]]
    name = f"W{'/'.join(map(str, bits))}A{qs['act_bits']}"
    return name + (" weight-only" if qs["act_bits"] == 16 else "") + (" mixed" if len(bits) > 1 else "")


def run(model: nn.Module, ctx, cfg: QuantizeConfig) -> nn.Module:
    qs = settings(cfg)
    names = compute_layers(model)
    check(model, cfg, "quantize")
    graph = preprocess(model, qs)
    if cfg.act_equalization > 0:
        regions = equalize_activations(graph, ctx, cfg.calib_batches, cfg.act_equalization)
        ctx.metrics["act_equalization_regions"] = regions
        ctx.log(f"  activation equalization (alpha {cfg.act_equalization}) on {regions} regions")
    bits = resolve_bits(names, cfg)
    weights = weight_counts(graph, names)
    if cfg.mixed_precision:
        from compress.quantize.sensitivity import mixed_precision
        fixed = set(cfg.layer_bits)
        fixed |= {names[0]} if cfg.first_layer_bits is not None else set()
        fixed |= {names[-1]} if cfg.last_layer_bits is not None else set()
        bits, mp_metrics = mixed_precision(graph, qs, bits, fixed, weights, ctx, cfg)
        ctx.metrics.update(mp_metrics)
        mp = mp_metrics["mixed_precision"]
        ctx.log(f"  mixed precision: {len(mp['lowered'])} layers to {cfg.mixed_precision.low_bits} bits, "
                f"average {mp['avg_bits']:.2f} bits (target {mp['target_avg_bits']:.2f})")
    qs["layer_bits"] = bits
    ctx.metrics["weight_bits"] = bits
    ctx.metrics["avg_weight_bits"] = sum(weights[n] * bits[n] for n in names) / max(1, sum(weights.values()))
    ctx.metrics["format"] = format_name(qs)
    qmodel = quantize_graph(graph, qs)
    pass_calibration_data(qmodel, ctx, cfg.calib_batches, "calibrate")
    if cfg.bias_correction:
        pass_calibration_data(qmodel, ctx, cfg.calib_batches, "bias_correction")
    ptq_acc = accuracy(predict(qmodel, ctx.data.test, ctx.data), ctx.data.test.labels)
    ctx.metrics["ptq_accuracy"] = ptq_acc
    synthetic = getattr(ctx.calib, "synthetic", False)
    ctx.metrics["calibration"] = "synthetic" if synthetic else "real"
    ctx.log(f"  {ctx.metrics['format']}: calibrated on {min(len(ctx.calib), cfg.calib_batches * ctx.batch_size)} "
            f"{'synthetic ' if synthetic else ''}images: PTQ accuracy {ptq_acc:.4f}")
    if cfg.epochs > 0:
        env = ctx.train_env("qat")
        data = ctx.data
        if synthetic:
            # data-free: distill on the synthesized images too, never the real training split
            data = dataclasses.replace(ctx.data, train=ctx.calib)
            env.data_key = f"{ctx.data_key}-synthetic-{ctx.calib.key}"
        ctx.history = fit(qmodel, data, cfg, env)
    sqnr = layer_sqnr(qmodel, ctx)
    worst = sorted(sqnr.items(), key=lambda kv: kv[1])[:3]
    ctx.metrics["layer_sqnr_db"] = sqnr
    ctx.metrics["worst_layers"] = [n for n, _ in worst]
    ctx.log("  lowest per-layer SQNR: " + ", ".join(f"{n} {v:.1f} dB" for n, v in worst))
    ctx.structure["quantize"] = qs
    return qmodel.eval()
