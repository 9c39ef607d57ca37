"""The quantize stage: prepare (brevitas graph quantization) -> calibrate -> QAT with KD.

Weights per output channel at the configured bits (int8 storage, b-bit range), activations
int8/uint8 per tensor or float (weight-only), biases int32 (so runtimes can fuse Conv+bias
into one integer kernel). BatchNorm is merged into the convolutions first, as every integer
runtime does at deployment anyway.
"""
from __future__ import annotations

import copy
import dataclasses
import time

from torch import nn

from compress.quantize.calibrate import equalize_activations, layer_sqnr, pass_calibration_data
from compress.quantize.config import QuantizeConfig, format_name, settings
from compress.quantize.graph import (
    check_layer_names,
    check_traceable,
    compute_layers,
    preprocess,
    quantize_graph,
    resolve_bits,
    weight_counts,
)
from compress.quantize.self_teacher import describe, qat_teacher
from compress.stage import RunContext, StageResult
from compress.structure import QuantSettings
from compress.tasks import get_task
from compress.train import fit, predict


def check(model: nn.Module, cfg: QuantizeConfig, where: str) -> None:
    """Before any work: the model traces (graph quantization needs torch.fx), and every
    per-layer name is a compute layer of it."""
    check_traceable(model, where)
    check_layer_names(model, list(cfg.layer_bits), f"{where}.layer_bits")


def _bits(graph: nn.Module, names: list[str], qs: dict, ctx: RunContext, cfg: QuantizeConfig, metrics: dict):
    """Each compute layer's weight bits: configured, or chosen by measured sensitivity."""
    bits = resolve_bits(names, cfg)
    weights = weight_counts(graph, names)
    if cfg.mixed_precision:
        from compress.quantize.sensitivity import mixed_precision
        fixed = set(cfg.layer_bits)
        fixed |= {names[0]} if cfg.first_layer_bits is not None else set()
        fixed |= {names[-1]} if cfg.last_layer_bits is not None else set()
        bits, mp_metrics = mixed_precision(graph, qs, bits, fixed, weights, ctx, cfg)
        metrics.update(mp_metrics)
        mp = mp_metrics["mixed_precision"]
        ctx.log(f"  mixed precision: {len(mp['lowered'])} layers to {cfg.mixed_precision.low_bits} bits, "
                f"average {mp['avg_bits']:.2f} bits (target {mp['target_avg_bits']:.2f})")
    metrics["weight_bits"] = bits
    metrics["avg_weight_bits"] = sum(weights[n] * bits[n] for n in names) / max(1, sum(weights.values()))
    return bits


def _ptq_accuracy(qmodel: nn.Module, ctx: RunContext, metrics: dict):
    """PTQ accuracy of the calibrated fake-quant model on the full test split; returns the
    logits. Most of a PTQ-only stage's time on a large net (a 10k-image fake-quant pass: 47%
    of it on the Fashion-MNIST teacher, benchmarks/ptq_time.py), so they are handed to the
    pipeline when no QAT follows, which would otherwise score the same model a second time."""
    t0 = time.perf_counter()
    logits = predict(qmodel, ctx.data.test, ctx.data)
    metrics.update(ptq_accuracy=get_task(ctx.task).score(logits, ctx.data.test.labels),
                   ptq_accuracy_on=f"test split ({len(logits)} examples), torch fake-quant",
                   ptq_score_seconds=round(time.perf_counter() - t0, 2))
    return logits


def _calibrate(graph: nn.Module, qs: dict, ctx: RunContext, cfg: QuantizeConfig, metrics: dict) -> nn.Module:
    """Quantize the graph, calibrate its ranges (and biases), measure PTQ accuracy (logits
    kept in metrics["_ptq_logits"] until run() hands them on)."""
    qmodel = quantize_graph(graph, qs)
    pass_calibration_data(qmodel, ctx, cfg.calib_batches, "calibrate")
    if cfg.bias_correction:
        pass_calibration_data(qmodel, ctx, cfg.calib_batches, "bias_correction")
    metrics["_ptq_logits"] = _ptq_accuracy(qmodel, ctx, metrics)
    ptq_acc = metrics["ptq_accuracy"]
    synthetic = getattr(ctx.calib, "synthetic", False)
    metrics.update(calibration="synthetic" if synthetic else "real")
    ctx.log(f"  {metrics['format']}: calibrated on {min(len(ctx.calib), cfg.calib_batches * ctx.batch_size)} "
            f"{'synthetic ' if synthetic else ''}images: PTQ accuracy {ptq_acc:.4f}")
    return qmodel


def _qat(qmodel: nn.Module, ctx: RunContext, cfg: QuantizeConfig) -> list[dict]:
    env = ctx.train_env("qat")
    data = ctx.data
    if getattr(ctx.calib, "synthetic", False):
        # data-free: distill on the synthesized images too, never the real training split
        data = dataclasses.replace(ctx.data, train=ctx.calib)
        env.data_key = f"{ctx.data_key}-synthetic-{ctx.calib.key}"
    return fit(qmodel, data, cfg, env)


def _with_teacher(ctx: RunContext, cfg: QuantizeConfig, float_model: nn.Module) -> RunContext:
    """The stage's context with the teacher its objective uses (QAT, mixed-precision sensitivity):
    the run's, the float model's own (teacher: self), or both; its cache key to match."""
    if cfg.teacher == "configured":
        return ctx
    teacher, key = qat_teacher(float_model, ctx, cfg)
    ctx.log(f"  QAT teacher: {describe(cfg)}")
    return dataclasses.replace(ctx, teacher=teacher, teacher_key=key)


class QuantizeStage:
    """brevitas fake-quant model from the float one, calibrated, then QAT with KD."""
    config = QuantizeConfig
    calibrates = True

    def check(self, model: nn.Module, ctx: RunContext, cfg: QuantizeConfig) -> None:
        check(model, cfg, ctx.where)

    def run(self, model: nn.Module, ctx: RunContext, cfg: QuantizeConfig) -> StageResult:
        qs = settings(cfg)
        names = compute_layers(model)
        # again: an earlier stage may have removed a named block (traceability was checked at
        # preflight, and preprocess below traces anyway)
        check_layer_names(model, list(cfg.layer_bits), f"{ctx.where}.layer_bits")
        # MACs are counted on the float model (the op counter does not see brevitas layers);
        # preprocess merges BatchNorm into `model` in place, so keep it as it came
        float_model = copy.deepcopy(model).eval()
        ctx = _with_teacher(ctx, cfg, float_model)
        metrics: dict = {} if cfg.teacher == "configured" else {"qat_teacher": cfg.teacher_weights()}
        graph = preprocess(model, qs)
        if cfg.act_equalization > 0:
            regions = metrics["act_equalization_regions"] = equalize_activations(
                graph, ctx, cfg.calib_batches, cfg.act_equalization)
            ctx.log(f"  activation equalization (alpha {cfg.act_equalization}) on {regions} regions")
        qs["layer_bits"] = _bits(graph, names, qs, ctx, cfg, metrics)
        metrics["format"] = format_name(qs)
        qmodel = _calibrate(graph, qs, ctx, cfg, metrics)
        history = _qat(qmodel, ctx, cfg) if cfg.epochs > 0 else []
        float_model.cpu()  # a self-teacher trains on ctx.device; MACs are counted on the CPU copy
        sqnr = layer_sqnr(qmodel, ctx)
        worst = sorted(sqnr.items(), key=lambda kv: kv[1])[:3]
        metrics.update(layer_sqnr_db=sqnr, worst_layers=[n for n, _ in worst])
        ctx.log("  lowest per-layer SQNR: " + ", ".join(f"{n} {v:.1f} dB" for n, v in worst))
        structure = ctx.structure.model_copy(update={"quantize": QuantSettings(**qs)})
        # PTQ only: the returned model is the one the PTQ accuracy pass scored (layer_sqnr
        # restores its quantizers), so the pipeline scores the stage from those logits
        logits = metrics.pop("_ptq_logits")
        return StageResult(qmodel.eval(), structure, history, metrics, float_model=float_model,
                           test_logits=logits if cfg.epochs == 0 else None)
