"""The distill stage: the student learns from the teacher through the one training loop."""
from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from torch import nn

from compress.distill.objectives import LogitTerm, kd_default
from compress.stage import RunContext, StageResult
from compress.train import TrainConfig, fit


class DistillConfig(TrainConfig):
    """Knowledge distillation of the student from the teacher."""
    model_config = ConfigDict(use_attribute_docstrings=True)
    kind: Literal["distill"] = "distill"
    loss: list[LogitTerm] = Field(default_factory=kd_default)
    """logit terms, each {kind, weight, ...}: ce, mse, l1 (labels); kl, reverse_kl, js, mse_logits, l1_logits, cakld,
    taid, dist, dkd (teacher); which apply depends on the task (compress/tasks.py)"""


class DistillStage:
    """The student learns from the teacher; its structure does not change."""
    config = DistillConfig
    calibrates = False

    def check(self, model: nn.Module, ctx: RunContext, cfg: DistillConfig) -> None:
        """Nothing of its own: feature pairs (names, shapes, adapters) are checked for every stage
        that has them by compress/preflight.py, against the teacher and student it builds."""

    def run(self, model: nn.Module, ctx: RunContext, cfg: DistillConfig) -> StageResult:
        history = fit(model, ctx.data, cfg, ctx.train_env("distill"))
        return StageResult(model, ctx.structure, history)
