"""The distill stage: the student learns from the teacher through the one training loop."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from compress.train import TrainConfig, fit


class DistillConfig(TrainConfig):
    """Knowledge distillation of the student from the teacher (Hinton KD + CE)."""
    kind: Literal["distill"] = "distill"
    ce_weight: float = Field(0.1, ge=0, description="weight of cross-entropy with the labels")
    kd_weight: float = Field(0.9, ge=0, description="weight of Hinton KD from the teacher")


def run(model: nn.Module, ctx, cfg: DistillConfig) -> nn.Module:
    ctx.history = fit(model, ctx.data, cfg, batch_size=ctx.batch_size, teacher=ctx.teacher,
                      seed=ctx.seed, device=ctx.device, log=ctx.log, desc="distill",
                      eval_split=ctx.data.test if ctx.eval_each_epoch else None)
    return model
