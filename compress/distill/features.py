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
    """Zagoruyko & Komodakis 2017: channel-pooled squared activations, L2-normalized. A
    [B, C, H, W] map pools over C (dim 1); a [B, N, C] token map pools over C too (the last
    dim), so the map is one value per token, as it is one value per pixel for convs."""
    pooled = f.pow(2).mean(-1 if f.dim() == 3 else 1)
    return F.normalize(pooled.flatten(1), dim=1)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape[1:])


def pair_adapter(where: str, term: FeatureTerm, s: torch.Tensor, t: torch.Tensor) -> nn.Module | None:
    """The adapter mapping the student feature to the teacher's width (None for attention, and
    for normalized when the shapes already match),
    or one UserError naming both sides. What must agree depends on the layout:
    [B, C, H, W] conv maps: H, W (a 1x1 conv over C); [B, N, C] tokens: N (a Linear over C,
    never over N); [B, C] vectors: nothing (a Linear over C)."""
    def fail(why: str) -> UserError:
        return UserError(f"{where}: student {term.student} output {_shape(s)} cannot be matched to "
                         f"teacher {term.teacher} output {_shape(t)}: {why}")
    for role, name, out in (("student", term.student, s), ("teacher", term.teacher, t)):
        if out is None:
            raise UserError(f"{where}.{role}: module {name!r} did not run in the forward pass")
        if not isinstance(out, torch.Tensor):
            raise UserError(f"{where}.{role}: module {name!r} returns {type(out).__name__}, not a tensor; "
                            f"name a module that outputs one tensor")
    if s.dim() != t.dim() or s.dim() not in (2, 3, 4):
        raise fail("ranks differ or are not 2 ([B, C]), 3 ([B, N, C] tokens) or 4 ([B, C, H, W]); "
                   "pick layers of the same kind")
    if s.dim() == 4 and s.shape[2:] != t.shape[2:]:
        raise fail("spatial sizes (H, W) must agree; pick layers at the same resolution")
    if s.dim() == 3 and s.shape[1] != t.shape[1]:
        raise fail(f"token counts differ ({s.shape[1]} vs {t.shape[1]}: another patch size, image "
                   f"size or class token); pick layers with the same number of tokens")
    if term.kind == "attention":
        if s.dim() == 2:
            raise fail("attention transfer needs a spatial or token map, not a [B, C] vector; "
                       "use kind hint or normalized")
        return None
    if term.kind == "normalized" and s.shape[1:] == t.shape[1:]:
        # LAPTOP-Diff compares the pruned student's block outputs with the teacher's directly:
        # a random adapter would make identical features cost ~1 and push the student away
        return None
    cs, ct = s.shape[1 if s.dim() == 4 else -1], t.shape[1 if t.dim() == 4 else -1]
    return nn.Conv2d(cs, ct, 1, bias=False) if s.dim() == 4 else nn.Linear(cs, ct, bias=False)


class FeatureDistiller(nn.Module):
    """Owns the hooks and adapters of one training run; call close() to remove the hooks."""

    def __init__(self, terms: list[FeatureTerm], student: nn.Module, teacher: nn.Module,
                 example: torch.Tensor, where: str = "features"):
        super().__init__()
        self.terms = terms
        pairs = []
        for i, t in enumerate(terms):
            pairs.append((f"s{i}", resolve(student, [t.student], f"{where}.{i}.student")[0]))
            pairs.append((f"t{i}", resolve(teacher, [t.teacher], f"{where}.{i}.teacher")[0]))
        # one capture for both models: the student's outputs keep their graph (the loss
        # backpropagates through them); the teacher's are detached when read
        self.capture = OutputCapture(None, modules=pairs)
        self.captured = self.capture.outputs
        self.adapters = nn.ModuleDict()
        was_training = student.training
        try:
            with torch.no_grad():
                student.eval()(example)
                teacher.eval()(example)
            for i, t in enumerate(terms):
                adapter = pair_adapter(f"{where}.{i}", t, self.captured.get(f"s{i}"), self.captured.get(f"t{i}"))
                if adapter is not None:
                    self.adapters[str(i)] = adapter
        except Exception:
            self.capture.close()  # a failed check leaves no hooks behind on the caller's models
            raise
        finally:
            student.train(was_training)
        self.captured.clear()

    def losses(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, t in enumerate(self.terms):
            s = self.captured[f"s{i}"].float()
            tt = self.captured[f"t{i}"].detach().float()
            if t.kind == "attention":
                # mean over batch AND positions, as the official code (attention-transfer's at_loss,
                # mdistiller AT.py): a sum over positions would scale the weight with H*W
                loss = (attention_map(s) - attention_map(tt)).pow(2).mean()
            else:
                if str(i) in self.adapters:
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
