"""Work-arounds for brevitas' QCDQ export, each scoped to one export call."""
from __future__ import annotations

import contextlib

import torch

# int32 bias magnitudes beyond which brevitas' float32 round trip is no longer exact (2^23:
# float32's mantissa) are still recovered to float32 precision; beyond int32 they are an error
_INT32 = 2 ** 31 - 1


@contextlib.contextmanager
def exact_int32_biases():
    """brevitas exports a layer's int32 bias as round(b_q / s) where s = s_in * s_w and b_q is
    the fake-quantized float32 bias, and refuses it ("QuantTensor not valid") when
    |b_q / s - round(b_q / s)| >= 0.2 (brevitas/quant_tensor/base_quant_tensor.py, TOLERANCE).
    float32 keeps 24 bits, so that fails once |b / s| passes about 2^21: a layer whose weights
    are almost zero next to its bias. timm's ResNets start every block's last BatchNorm at
    gamma = 0 (zero_init_last); after a short distillation the merged conv2 weights are ~1e-7,
    s ~ 6e-10, and b / s ~ 3.7e6 (measured, timm resnet18). That value is a valid int32: here
    it is rounded in float64 and range-checked instead of refused. 8-bit tensors (weights,
    activations) keep brevitas' own check."""
    from brevitas.quant_tensor.int_quant_tensor import IntQuantTensor
    original = IntQuantTensor.int

    def int32_bias(self, float_datatype=False):
        if float_datatype or self.bit_width < 32 or self.is_valid:
            return original(self, float_datatype)
        n = torch.round(self.value.double() / self.scale.double() + self.zero_point.double())
        if n.abs().max() > _INT32:
            raise RuntimeError(f"int32 bias out of range: |bias / scale| reaches {n.abs().max().item():.3g}")
        return n.to(torch.int32)

    IntQuantTensor.int = int32_bias
    try:
        yield
    finally:
        IntQuantTensor.int = original
