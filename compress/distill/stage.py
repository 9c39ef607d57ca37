"""The distill stage: the student learns from the teacher through the one training loop."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from compress.distill.objectives import CE, KL, LogitTerm
from compress.train import TrainConfig, fit


def kd_default() -> list:
    """Hinton KD at T=4 with a little label CE: the classic recipe (Hinton et al. 2015)."""
    return [KL(weight=0.9, temperature=4.0), CE(weight=0.1)]


class DistillConfig(TrainConfig):
    """Knowledge distillation of the student from the teacher."""
    kind: Literal["distill"] = "distill"
    loss: list[LogitTerm] = Field(default_factory=kd_default, description="logit terms, each {kind, weight, ...}: ce, kl, reverse_kl, js, mse_logits, cakld, taid, dist, dkd")


def run(model: nn.Module, ctx, cfg: DistillConfig) -> nn.Module:
    ctx.history = fit(model, ctx.data, cfg, ctx.train_env("distill"))
    return model
