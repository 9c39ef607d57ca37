"""The module that produces a model's logits, and its first conv: found, not assumed by name.

The classifier is what timm's ``get_classifier()`` returns where a model has it; otherwise
the last Linear / 1x1 Conv whose output *is* the model's output (the same values, through
flatten, dropout in eval mode, identities and reshapes), found with forward hooks on a
seeded random batch.
"""
from __future__ import annotations

from typing import Optional

import torch
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
    for name, y in reversed(order):
        y = y.value if hasattr(y, "value") else y
        if isinstance(y, torch.Tensor) and y.numel() == flat.numel() and torch.equal(y.reshape(-1), flat):
            return name
    return None


def first_conv(model: nn.Module) -> Optional[tuple[str, nn.Conv2d]]:
    """The first Conv2d in definition order: the stem of torchvision/timm-style CNNs."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
