"""Scoring a brevitas fake-quant model at the cost of its float twin.

A brevitas model in eval mode quantizes every weight again at each call and builds a
QuantTensor around every activation. brevitas' own `quant_inference_mode` quantizes the
weights once and runs each quantizer as a plain quantize-dequantize with cached scales. On
the Fashion-MNIST teacher (W8A8 PTQ, 2048 test images, 2 threads) that took 5.6 s instead of
9.3 s with logits equal to the last bit (benchmarks/ptq_time.py measures the whole stage).

The mode changes the model's proxies and brevitas restores only its own defaults on exit,
so it runs on a copy: the model that trains, exports or is checkpointed never enters it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# how close the cached path's logits must be to the model's own on the probe batch; outside
# it the model itself is used (the reference every backend is held to)
RTOL, ATOL = 1e-5, 1e-5


def is_quantized(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("brevitas") for m in model.modules())


@torch.no_grad()
def inference_twin(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """`model`, or for a brevitas model a copy in quant_inference_mode whose outputs on
    `probe` match the model's. Any failure of the cached path falls back to `model`: it is
    only an optimization of the same computation."""
    if not is_quantized(model):
        return model
    from brevitas.export.inference.manager import quant_inference_mode
    try:
        twin = copy.deepcopy(model).eval()
        quant_inference_mode(twin, cache_quant_weight=True).__enter__()  # left on: the copy is thrown away
        twin(probe)  # the first call fills the caches; the cached path runs from the second on
        same = torch.allclose(twin(probe).float(), model(probe).float(), rtol=RTOL, atol=ATOL)
    except Exception:  # noqa: BLE001 - brevitas has no handler for every proxy; the model itself is exact
        return model
    return twin if same else model
