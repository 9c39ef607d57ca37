"""What torch's TorchScript ONNX exporter (the one both our exports use, compress/export.py)
rejects, found at preflight from the dry forward's shapes instead of at the export after
training.

Adaptive pooling exports only where every output size divides its input size, or pools to 1
(torch/onnx/symbolic_opset9.py `_adaptive_pool`: "output size that are not factor of input
size"). torchvision's VGG and AlexNet pool to 7x7 / 6x6: on 32x32 or 64x64 images their
features are 1x1 or 2x2, torch's forward upsamples, and the export of the trained student
failed (measured: alexnet and vgg11_bn at 64 px, benchmarks/RESULTS.md).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


@contextlib.contextmanager
def recorded_pools(model: nn.Module) -> Iterator[list[str]]:
    """While open, forwards of `model` append one line per adaptive pool the exporter rejects."""
    found: list[str] = []

    def hook(name: str):
        def check(module, args, out):
            sizes, outs = tuple(args[0].shape[2:]), tuple(out.shape[2:])
            if all(o == 1 for o in outs) or all(i % o == 0 for i, o in zip(sizes, outs)):
                return
            shown = "x".join(map(str, sizes)), "x".join(map(str, outs))
            found.append(f"`{name}` ({type(module).__name__}) pools {shown[0]} to {shown[1]}: ONNX export needs "
                         f"each output size to divide the input size (or 1); feed larger images or make the pool "
                         f"smaller")
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, ADAPTIVE)]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
