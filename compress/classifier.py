"""The module that produces a model's logits, and its first conv: found, not assumed by name.

The classifier is what timm's ``get_classifier()`` returns where a model has it; otherwise
the last Linear / 1x1 Conv whose output *is* the model's output (the same values, through
flatten, dropout in eval mode, identities and reshapes), found with forward hooks on a
seeded random batch. The same finds a regression head (a Linear with K outputs) and a
segmentation head (the final 1x1 conv, [B, C, H, W]); a segmentation head whose logits are
upsampled to the input's size after it (FCN-style) is found through the resize.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from compress.hooks import OutputCapture


def _name_of(model: nn.Module, module: nn.Module) -> Optional[str]:
    return next((n for n, m in model.named_modules() if m is module and n), None)


def _is_head(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))


def find_classifier(model: nn.Module, input_shape) -> tuple[Optional[str], str]:
    """(qualified name of the logits layer or None, how it was found)."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        name = _name_of(model, head) if isinstance(head, nn.Module) else None
        if name and _is_head(head):
            return name, "get_classifier()"
    return _traced(model, input_shape), "traced"


def _traced(model: nn.Module, input_shape) -> Optional[str]:
    pairs = [(n, m) for n, m in model.named_modules() if n and _is_head(m)]
    if not pairs:
        return None
    order: list[tuple[str, torch.Tensor]] = []
    was_training = model.training
    model.eval()
    # random, not zeros: a zero input can make unrelated layers' outputs coincide
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), OutputCapture(None, modules=pairs,
                                            fn=lambda n, m, i, o: order.append((n, o.detach()))):
            out = model(x)
    finally:
        model.train(was_training)
    out = out.value if hasattr(out, "value") else out
    if not isinstance(out, torch.Tensor):
        return None
    flat = out.reshape(-1)
    order = [(n, y.value if hasattr(y, "value") else y) for n, y in order]
    for name, y in reversed(order):
        if isinstance(y, torch.Tensor) and y.numel() == flat.numel() and torch.equal(y.reshape(-1), flat):
            return name
    return next((name for name, y in reversed(order) if _resized_to(y, out)), None)


def _resized_to(y, out: torch.Tensor) -> bool:
    """y [B, C, h, w] is `out` [B, C, H, W] up to a nearest or bilinear resize (FCN heads)."""
    if not (isinstance(y, torch.Tensor) and y.dim() == 4 and out.dim() == 4 and y.shape[:2] == out.shape[:2]):
        return False
    size = tuple(out.shape[2:])
    resized = [F.interpolate(y, size=size, mode="nearest")]
    resized += [F.interpolate(y, size=size, mode="bilinear", align_corners=a) for a in (False, True)]
    return any(torch.allclose(r, out, rtol=1e-4, atol=1e-5) for r in resized)


def first_conv(model: nn.Module) -> Optional[tuple[str, nn.Conv2d]]:
    """The first Conv2d in definition order: the stem of torchvision/timm-style CNNs."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
