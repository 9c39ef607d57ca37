"""Whom QAT distills from (QuantizeConfig.teacher): the run's teacher, the float model that
entered the quantize stage (self-distillation, as BitDistiller: Du et al. 2024, arXiv:2402.10631,
github.com/DD-DuDa/BitDistiller), or both as one weighted ensemble.

The self-teacher is the stage's frozen float copy, taken before BatchNorm is merged and the
graph quantized: exactly the model the stage received. Its teacher-output cache is keyed by its
weights, so two different float models (another student, another prune result) never share a
cache, and a rerun on the same float model reuses it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
from torch import nn

from compress.distill.ensemble import Ensemble
from compress.errors import UserError
from compress.quantize.config import QuantizeConfig
from compress.stage import RunContext


def weights_key(model: nn.Module) -> str:
    """Identity of a float model's weights and buffers (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes of any dtype (bf16 has no numpy)
    return "float-" + h.hexdigest()[:16]


def qat_teacher(float_model: nn.Module, ctx: RunContext, cfg: QuantizeConfig) -> tuple[Optional[nn.Module], str]:
    """(teacher module, its cache key) for the stage's QAT. The float model comes first in a
    mix, so feature terms hook it (compress/preflight.py checks their names on the student)."""
    w = cfg.teacher_weights()
    if "self" not in w:
        return ctx.teacher, ctx.teacher_key
    float_model.eval().requires_grad_(False)  # frozen: its parameters never reach the optimizer
    own = weights_key(float_model)
    if "configured" not in w:
        return float_model, own
    if ctx.teacher is None:
        raise UserError(f"{ctx.where}.teacher: {cfg.teacher} mixes in the run's teacher, but this run has none")
    members, weights = [float_model], [w["self"]]
    if isinstance(ctx.teacher, Ensemble):  # flattened: each member's share of the configured weight
        members += list(ctx.teacher.members)
        weights += [w["configured"] * float(m) for m in ctx.teacher.weights]
    else:
        members.append(ctx.teacher)
        weights.append(w["configured"])
    mix = json.dumps([own, ctx.teacher_key, sorted(w.items())])
    return Ensemble(members, weights), "mix-" + hashlib.sha256(mix.encode()).hexdigest()[:16]


def describe(cfg: QuantizeConfig) -> str:
    """One log line's worth: whom QAT distills from."""
    w = cfg.teacher_weights()
    names = {"self": "self (the float model that entered the stage)", "configured": "the run's teacher"}
    if len(w) == 1:
        return names[next(iter(w))]
    total = sum(w.values())
    return " + ".join(f"{w[k] / total:.2f} x {names[k]}" for k in w)
