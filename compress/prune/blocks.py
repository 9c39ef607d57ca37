"""Block (layer) pruning after LAPTOP-Diff (Zhang et al. 2024): score each removable block
by the output distortion its removal alone causes on calibration data (one shot, no
training), remove the least harmful ones, and let KD recovery (ideally with normalized
feature distillation from the unpruned model) close the gap.

A block is removable when its output has the shape of its input, so an identity can
take its place: a residual block without a stride or width change."""
from __future__ import annotations

import torch
from torch import nn

from compress.checkpoint import set_module
from compress.errors import UserError
from compress.hooks import OutputCapture
from compress.names import unknown_name


def _has_weights(m: nn.Module) -> bool:
    return any(isinstance(x, (nn.Conv2d, nn.Linear)) for x in m.modules())


def shape_preserving(model: nn.Module, example: torch.Tensor) -> dict[str, bool]:
    """For every named module: does its (first) output have the shape of its input?"""
    seen: dict[str, bool] = {}

    def same(name, _m, inp, out):
        if inp and isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
            seen.setdefault(name, tuple(inp[0].shape) == tuple(out.shape))
    with OutputCapture(None, modules=[(n, m) for n, m in model.named_modules() if n], fn=same), torch.no_grad():
        model.eval()(example)
    return seen


def candidates(model: nn.Module, example: torch.Tensor, names: list[str]) -> list[str]:
    """The configured candidates (checked), or every shape-preserving block with weights
    that sits in an nn.Sequential (how networks hold their repeated blocks)."""
    same = shape_preserving(model, example)
    modules = dict(model.named_modules())
    if names:
        for n in names:
            if n not in modules:
                raise unknown_name("prune.block_candidates", n, modules)
            if not same.get(n):
                raise UserError(f"prune.block_candidates: {n!r} changes the shape of its input, "
                                f"so no identity can replace it")
        return list(names)
    out = []
    for parent, seq in model.named_modules():
        if isinstance(seq, nn.Sequential):
            for child, m in seq.named_children():
                name = f"{parent}.{child}" if parent else child
                if _has_weights(m) and same.get(name) and list(m.children()):
                    out.append(name)
    return out


def distortion(model: nn.Module, names: list[str], xs: list[torch.Tensor]) -> dict[str, float]:
    """Mean squared change of the logits when only `name` is replaced by an identity,
    relative to the logits' mean square (so scores compare across models)."""
    modules = dict(model.named_modules())
    model.eval()
    with torch.no_grad():
        ref = [model(x) for x in xs]
        scale = float(torch.cat(ref).pow(2).mean())
        scores = {}
        for n in names:
            original = modules[n]
            set_module(model, n, nn.Identity())
            try:
                err = sum(float((model(x) - r).pow(2).mean()) for x, r in zip(xs, ref)) / len(xs)
            finally:
                set_module(model, n, original)
            scores[n] = err / max(scale, 1e-12)
    return scores


def remove(model: nn.Module, ctx, cfg) -> tuple[list[str], dict[str, float]]:
    example = torch.zeros(1, *ctx.data.input_shape)
    names = candidates(model, example, cfg.block_candidates)
    if cfg.remove_blocks > len(names):
        raise UserError(f"prune.remove_blocks={cfg.remove_blocks}, but the model has only "
                        f"{len(names)} removable blocks ({', '.join(names) or 'none'})")
    xs = [x for x, _ in ctx.calib_batches(cfg.block_batches)]
    scores = distortion(model, names, xs)
    # LAPTOP-Diff: the one-shot scores are close to additive, so the k smallest are removed
    removed = sorted(names, key=scores.get)[:cfg.remove_blocks]
    apply(model, removed)
    return removed, scores


def apply(model: nn.Module, removed: list[str]) -> None:
    """Replace the named blocks by identities (under torchrun: rank 0's choice on the others)."""
    for n in removed:
        set_module(model, n, nn.Identity())
