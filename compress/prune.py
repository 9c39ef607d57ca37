"""The prune stage: structured channel pruning with torch-pruning, then KD recovery."""
from __future__ import annotations

import difflib
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.distill.objectives import LogitTerm
from compress.distill.stage import kd_default
from compress.errors import UserError
from compress.train import TrainConfig, fit


class PruneConfig(TrainConfig):
    """Structured (channel) pruning by torch-pruning, followed by KD recovery epochs."""
    kind: Literal["prune"] = "prune"
    ratio: float = Field(0.5, ge=0, lt=1, description="fraction of channels removed from each prunable layer group")
    importance: Literal["l1", "l2"] = Field("l2", description="magnitude importance norm (torch-pruning MagnitudeImportance p)")
    ignored: list[str] = Field(default_factory=lambda: ["fc"], description="qualified module names never pruned (the classifier by default)")
    # int8 kernels (VNNI/AMX on CPU, tensor cores on GPU) work on blocks of 8 or more
    # channels: a count off that grid pads to the next multiple and wastes the difference.
    round_to: int = Field(8, ge=1, description="kept channel counts are multiples of this (int8 kernels want multiples of 8)")
    global_pruning: bool = Field(False, description="rank channels across layers instead of per layer")
    epochs: float = Field(2, ge=0, description="KD recovery epochs after pruning")
    loss: list[LogitTerm] = Field(default_factory=kd_default, description="recovery objective: logit terms {kind, weight, ...}")


def resolve_modules(model: nn.Module, names: list[str], field: str) -> list[nn.Module]:
    """Qualified names -> modules, failing with the closest existing names."""
    modules = dict(model.named_modules())
    out = []
    for n in names:
        if n not in modules:
            close = difflib.get_close_matches(n, [k for k in modules if k], n=3)
            raise UserError(f"{field}: no module named {n!r} in the model"
                             + (f" (closest: {', '.join(close)})" if close else ""))
        out.append(modules[n])
    return out


def check(model: nn.Module, cfg: PruneConfig, where: str) -> None:
    """Run at preflight, before any training: names must exist in the student."""
    resolve_modules(model, cfg.ignored, f"{where}.ignored")


def prune_channels(model: nn.Module, cfg: PruneConfig, example: torch.Tensor) -> nn.Module:
    import torch_pruning as tp
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, example,
        importance=tp.importance.MagnitudeImportance(p=1 if cfg.importance == "l1" else 2),
        pruning_ratio=cfg.ratio, global_pruning=cfg.global_pruning,
        ignored_layers=resolve_modules(model, cfg.ignored, "prune.ignored"),
        round_to=cfg.round_to)
    pruner.step()
    return model


def run(model: nn.Module, ctx, cfg: PruneConfig) -> nn.Module:
    from compress.models import count_params
    before = count_params(model)
    example = torch.zeros(1, *ctx.data.input_shape)
    prune_channels(model, cfg, example)
    after = count_params(model)
    ctx.log(f"  pruned {before:,} -> {after:,} params (ratio {cfg.ratio}, round_to {cfg.round_to})")
    ctx.metrics["params_before"] = before
    if cfg.epochs > 0:
        ctx.history = fit(model, ctx.data, cfg, **ctx.fit_kwargs("prune"))
    return model
