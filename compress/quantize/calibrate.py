"""Everything that runs calibration data through a model: activation ranges, bias
correction, activation equalization, and per-layer SQNR against the float network."""
from __future__ import annotations

import math

import torch
from torch import nn

from compress.hooks import OutputCapture


def calib_inputs(ctx, n_batches: int):
    """Model inputs from the first n batches of the (stratified, seeded) calibration subset."""
    for x, _ in ctx.calib_batches(n_batches):
        yield x


@torch.no_grad()
def pass_calibration_data(model: nn.Module, ctx, n_batches: int, mode: str) -> None:
    """Run calibration batches under a brevitas mode: "calibrate" collects activation
    ranges; "bias_correction" corrects each layer's bias for the mean shift quantization
    causes."""
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode

    from compress.quantize.kth import fast_percentiles
    model.eval()
    # the percentile statistics' selection was 60% of the pass; the same values, faster (kth.py)
    with {"calibrate": calibration_mode, "bias_correction": bias_correction_mode}[mode](model), fast_percentiles():
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
    model.eval()
    with OutputCapture(None, modules=layers.items(), detach=True) as cap:
        for xin in calib_inputs(ctx, n_batches):
            model(xin)
            quant = dict(cap.outputs)
            with quantization_status_manager(model, disable_act_quant=True, disable_weight_quant=True,
                                             disable_bias_quant=True, is_training=False):
                model(xin)
            for n in layers:
                ref = cap.outputs[n].float()
                sums[n][0] += float(ref.pow(2).sum())
                sums[n][1] += float((quant[n].float() - ref).pow(2).sum())
    return {n: 10 * math.log10(s / max(e, 1e-20)) for n, (s, e) in sums.items()}


@torch.no_grad()
def equalize_activations(graph: nn.Module, ctx, n_batches: int, alpha: float) -> int:
    """SmoothQuant-style activation equalization on the float graph: per-channel scales that
    move activation outliers into the next layer's weights, from calibration statistics.
    add_mul_node=False keeps the scales folded into adjacent weights (no new modules), so
    the quantized structure and its rebuild do not change. Returns the regions equalized."""
    from brevitas.graph.equalize import activation_equalization_mode
    graph.eval()
    with activation_equalization_mode(graph, alpha, add_mul_node=False, layerwise=False) as eq:
        for x in calib_inputs(ctx, n_batches):
            graph(x)
    return len(eq.scale_factors or [])
