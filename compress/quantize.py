"""The quantize stage: prepare (brevitas graph quantization) -> calibrate -> QAT with KD.

Weights int8 per output channel, activations int8/uint8 per tensor, biases int32 (so
runtimes can fuse Conv+bias into one integer kernel). BatchNorm is merged into the
convolutions first, as every integer runtime does at deployment anyway.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.distill.objectives import LogitTerm
from compress.distill.stage import kd_default
from compress.train import TrainConfig, batches, fit


class QuantizeConfig(TrainConfig):
    """Quantization-aware distillation: brevitas PTQ calibration, then QAT epochs with KD."""
    kind: Literal["quantize"] = "quantize"
    weight_bits: Literal[8] = Field(8, description="weight bit width (per-channel, symmetric)")
    act_bits: Literal[8] = Field(8, description="activation bit width (per-tensor)")
    calib_batches: int = Field(8, ge=1, description="batches of the calibration subset used for activation ranges")
    equalize_iters: int = Field(0, ge=0, description="cross-layer weight equalization iterations before quantizing (data-free; 0 = off)")
    bias_correction: bool = Field(False, description="after calibration, correct each layer's bias for the mean shift quantization causes (brevitas bias_correction_mode)")
    epochs: float = Field(1, ge=0, description="QAT epochs with KD (0 = post-training quantization only)")
    lr: float = Field(2e-4, gt=0, description="QAT learning rate (small: the model is already trained)")
    weight_decay: float = Field(0.0, ge=0, description="none by default: decay would pull weights off their quantization grid")
    loss: list[LogitTerm] = Field(default_factory=kd_default, description="QAT objective: logit terms {kind, weight, ...} (cakld per BitDistiller)")
    precision: Literal["auto", "bf16", "fp32"] = Field("fp32", description="fake-quant QAT runs in fp32 (bf16 would blur the int8 grid)")
    channels_last: bool = Field(False, description="NHWC while training")


def settings(cfg: QuantizeConfig) -> dict:
    """What rebuilding the quantized structure needs (recorded in structure.json)."""
    return {"weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits,
            "weight_scaling": "per_channel", "bias": "int32", "merge_bn": True,
            "equalize_iters": cfg.equalize_iters}


def prepare(model: nn.Module, qsettings: dict) -> nn.Module:
    """Float model -> brevitas fake-quant graph model (structure only, no calibration)."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import COMPUTE_LAYER_MAP, preprocess_for_quantize, quantize
    from brevitas.quant import Int8WeightPerChannelFloat, Int32Bias

    layer_kwargs = {"weight_quant": Int8WeightPerChannelFloat, "bias_quant": Int32Bias,
                    "return_quant_tensor": True}
    compute_map = dict(COMPUTE_LAYER_MAP)
    compute_map[nn.Conv2d] = (qnn.QuantConv2d, layer_kwargs)
    compute_map[nn.Linear] = (qnn.QuantLinear, layer_kwargs)
    model = preprocess_for_quantize(model.eval(), merge_bn=qsettings.get("merge_bn", True),
                                    equalize_iters=qsettings.get("equalize_iters", 0))
    return quantize(model, compute_layer_map=compute_map)


def calib_inputs(ctx, n_batches: int):
    """Model inputs from the first n batches of the (stratified, seeded) calibration subset."""
    for i, (x, _, _) in enumerate(batches(ctx.calib, ctx.batch_size)):
        if i >= n_batches:
            return
        yield ctx.data.normalize(x)


@torch.no_grad()
def pass_calibration_data(model: nn.Module, ctx, n_batches: int, mode: str) -> None:
    """Run calibration batches under a brevitas mode: "calibrate" collects activation
    ranges; "bias_correction" corrects each layer's bias for the mean shift quantization
    causes."""
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
    model.eval()
    with {"calibrate": calibration_mode, "bias_correction": bias_correction_mode}[mode](model):
        for x in calib_inputs(ctx, n_batches):
            model(x)


@torch.no_grad()
def layer_sqnr(model: nn.Module, ctx, n_batches: int = 2) -> dict[str, float]:
    """SQNR (dB) of each quantized compute layer's output against the same network with
    quantization switched off (the BN-merged float model), on calibration data. The error
    is end to end up to that layer, as a deployment sees it."""
    from brevitas.graph.calibrate import quantization_status_manager
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)}
    sums = {n: [0.0, 0.0] for n in layers}
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, _i, out):
            captured[name] = (out.value if hasattr(out, "value") else out).detach().float()
        return fn
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    model.eval()
    try:
        for xin in calib_inputs(ctx, n_batches):
            model(xin)
            quant = dict(captured)
            with quantization_status_manager(model, disable_act_quant=True, disable_weight_quant=True,
                                             disable_bias_quant=True, is_training=False):
                model(xin)
            for n in layers:
                ref = captured[n]
                sums[n][0] += float(ref.pow(2).sum())
                sums[n][1] += float((quant[n] - ref).pow(2).sum())
    finally:
        for h in handles:
            h.remove()
    return {n: 10 * math.log10(s / max(e, 1e-20)) for n, (s, e) in sums.items()}


def rebuild_quantized(model: nn.Module, qsettings: dict, input_shape) -> nn.Module:
    model = prepare(model, qsettings)
    model.eval()
    with torch.no_grad():  # one pass initialises lazily-shaped quantizer state
        model(torch.zeros(1, *input_shape))
    return model


def run(model: nn.Module, ctx, cfg: QuantizeConfig) -> nn.Module:
    qs = settings(cfg)
    qmodel = prepare(model, qs)
    pass_calibration_data(qmodel, ctx, cfg.calib_batches, "calibrate")
    if cfg.bias_correction:
        pass_calibration_data(qmodel, ctx, cfg.calib_batches, "bias_correction")
    from compress.train import accuracy, predict
    ptq_acc = accuracy(predict(qmodel, ctx.data.test, ctx.data), ctx.data.test.labels)
    ctx.metrics["ptq_accuracy"] = ptq_acc
    ctx.log(f"  calibrated on {min(len(ctx.calib), cfg.calib_batches * ctx.batch_size)} "
            f"images: PTQ accuracy {ptq_acc:.4f}")
    if cfg.epochs > 0:
        ctx.history = fit(qmodel, ctx.data, cfg, **ctx.fit_kwargs("qat"))
    sqnr = layer_sqnr(qmodel, ctx)
    worst = sorted(sqnr.items(), key=lambda kv: kv[1])[:3]
    ctx.metrics["layer_sqnr_db"] = sqnr
    ctx.metrics["worst_layers"] = [n for n, _ in worst]
    ctx.log("  lowest per-layer SQNR: " + ", ".join(f"{n} {v:.1f} dB" for n, v in worst))
    ctx.structure["quantize"] = qs
    return qmodel.eval()
