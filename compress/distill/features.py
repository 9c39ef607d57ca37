"""Feature distillation: intermediate tensors captured by forward hooks on modules named by
their qualified names, on student and teacher; adapters map student features to the
teacher's width, train with the student, and are never part of the exported model."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compress.errors import UserError
from compress.hooks import OutputCapture
from compress.names import resolve


class FeatureTerm(BaseModel):
    """One feature-matching term between a student module and a teacher module."""
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="qualified name of the student module whose output is matched")
    teacher: str = Field(description="qualified name of the teacher module whose output is the target")
    kind: Literal["hint", "attention", "normalized"] = Field(
        "hint", description="hint (FitNet MSE via adapter), attention (attention transfer), normalized (LAPTOP-Diff)")
    weight: float = Field(1.0, ge=0, description="weight of this term in the total loss")


def check_names(model: nn.Module, names: list[str], where: str) -> None:
    """Fail with the closest existing names (run at config validation)."""
    resolve(model, names, where)


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: channel-pooled squared activations, L2-normalized."""
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def _adapter(cs: int, ct: int, ndim: int) -> nn.Module:
    return nn.Conv2d(cs, ct, 1, bias=False) if ndim == 4 else nn.Linear(cs, ct, bias=False)


class FeatureDistiller(nn.Module):
    """Owns the hooks and adapters of one training run; call close() to remove the hooks."""

    def __init__(self, terms: list[FeatureTerm], student: nn.Module, teacher: nn.Module,
                 example: torch.Tensor):
        super().__init__()
        self.terms = terms
        pairs = []
        for i, t in enumerate(terms):
            pairs.append((f"s{i}", resolve(student, [t.student], f"features.{i}.student")[0]))
            pairs.append((f"t{i}", resolve(teacher, [t.teacher], f"features.{i}.teacher")[0]))
        # one capture for both models: the student's outputs keep their graph (the loss
        # backpropagates through them); the teacher's are detached when read
        self.capture = OutputCapture(None, modules=pairs)
        self.captured = self.capture.outputs
        was_training = student.training
        with torch.no_grad():
            student.eval()(example)
            teacher.eval()(example)
        student.train(was_training)
        self.adapters = nn.ModuleDict()
        for i, t in enumerate(terms):
            s, tt = self.captured[f"s{i}"], self.captured[f"t{i}"]
            if s.dim() != tt.dim() or s.shape[2:] != tt.shape[2:]:
                raise UserError(
                    f"features.{i}: student {t.student} output {tuple(s.shape[1:])} cannot be "
                    f"matched to teacher {t.teacher} output {tuple(tt.shape[1:])}: spatial "
                    f"sizes (and rank) must agree; pick layers at the same resolution")
            if t.kind != "attention":
                self.adapters[str(i)] = _adapter(s.shape[1], tt.shape[1], s.dim())
        self.captured.clear()

    def losses(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, t in enumerate(self.terms):
            s = self.captured[f"s{i}"].float()
            tt = self.captured[f"t{i}"].detach().float()
            if t.kind == "attention":
                loss = (attention_map(s) - attention_map(tt)).pow(2).sum(1).mean()
            else:
                s = self.adapters[str(i)](s.to(self.adapters[str(i)].weight.dtype)).float()
                if t.kind == "hint":
                    loss = F.mse_loss(s, tt)
                else:  # LAPTOP-Diff: squared error over the teacher feature's squared norm
                    dims = tuple(range(1, s.dim()))
                    loss = ((s - tt).pow(2).sum(dims) / (tt.pow(2).sum(dims) + 1e-8)).mean()
            out[f"feat{i}_{t.kind}"] = loss
        self.captured.clear()
        return out

    def close(self) -> None:
        self.capture.close()
