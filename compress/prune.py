"""The prune stage: structured channel pruning with torch-pruning, jointly with
distillation: N pruning steps, each followed by KD recovery through the one training loop.

Importance criteria (torch-pruning): l1 / l2 magnitude, bn_scale (network slimming),
taylor (first order, on the stage's own KD objective), hessian (OBD, per-sample squared
gradients of the same objective), lamp, and random as a control.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.distill.objectives import LogitTerm, Objective
from compress.distill.stage import kd_default
from compress.errors import UserError
from compress.train import TrainConfig, batches, fit

Criterion = Literal["l1", "l2", "bn_scale", "taylor", "hessian", "lamp", "random"]
GRADIENT_CRITERIA = {"taylor", "hessian"}


class PruneConfig(TrainConfig):
    """Structured (channel) pruning by torch-pruning, with KD recovery after each step."""
    kind: Literal["prune"] = "prune"
    ratio: float = Field(0.5, ge=0, lt=1, description="fraction of channels removed from each prunable layer group (the final ratio when steps > 1)")
    importance: Criterion = Field("l2", description="channel importance: l1 | l2 | bn_scale | taylor | hessian | lamp | random")
    steps: int = Field(1, ge=1, description="pruning steps; the ratio grows linearly and the recovery epochs are split between steps")
    global_pruning: bool = Field(False, description="rank channels across layers (global) instead of within each layer (uniform)")
    layer_ratios: dict[str, float] = Field(default_factory=dict, description="per-layer ratio by qualified module name (overrides ratio)")
    max_layer_ratio: float = Field(0.9, gt=0, le=1, description="no layer loses more than this fraction, so none collapses under global ranking")
    ignored: list[str] = Field(default_factory=lambda: ["fc"], description="qualified module names never pruned (the classifier by default)")
    keep_ignored_inputs: bool = Field(True, description="ignored layers keep their input channels too (Torch-Pruning #341: by default only outputs are kept); false lets e.g. the classifier's inputs shrink")
    # int8 kernels (VNNI/AMX on CPU, tensor cores on GPU) work on blocks of 8 or more
    # channels: a count off that grid pads to the next multiple and wastes the difference.
    round_to: int = Field(8, ge=1, description="kept channel counts are multiples of this (int8 kernels want multiples of 8)")
    importance_batches: int = Field(4, ge=1, description="calibration batches whose gradients score channels (taylor, hessian)")
    recovery_teacher: Literal["configured", "unpruned"] = Field(
        "configured", description="KD recovery from the run's teacher, or from a frozen copy of the model before pruning (CoFi)")
    epochs: float = Field(2, ge=0, description="KD recovery epochs after pruning (in total, over all steps)")
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
    resolve_modules(model, list(cfg.layer_ratios), f"{where}.layer_ratios")


def _importance(name: str):
    import torch_pruning as tp

    class Hessian(tp.importance.GroupHessianImportance):
        # torch-pruning 1.6.1 keys its running sums by parameter but tests membership by
        # name, so every sample overwrites the last: accumulate by parameter here.
        def accumulate_grad(self, model):
            for p in model.parameters():
                if p.grad is not None:
                    g2 = p.grad.detach().pow(2)
                    self._accu_grad[p] = self._accu_grad[p] + g2 if p in self._accu_grad else g2
                    self._counter[p] = self._counter.get(p, 0) + 1

    table = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.GroupTaylorImportance,
        "hessian": Hessian,
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "random": tp.importance.RandomImportance,
    }
    return table[name]()


def score_gradients(model: nn.Module, imp, ctx, cfg: PruneConfig, teacher) -> None:
    """Gradients of the stage's objective on calibration data, for taylor / hessian."""
    objective = Objective(cfg.loss)
    model.eval()  # keep BatchNorm statistics fixed while scoring
    model.zero_grad()
    if cfg.importance == "hessian":
        imp.zero_grad()
    for i, (xb, yb, _) in enumerate(batches(ctx.calib, ctx.batch_size)):
        if i >= cfg.importance_batches:
            break
        x = ctx.data.normalize(xb)
        with torch.no_grad():
            t = teacher(x).float() if (teacher is not None and objective.needs_teacher) else None
        out = model(x)
        if cfg.importance == "taylor":
            objective(out, t, yb, 0.0)[0].backward()
            continue
        for j in range(len(yb)):  # OBD: per-sample squared gradients
            model.zero_grad()
            tj = None if t is None else t[j:j + 1]
            objective(out[j:j + 1], tj, yb[j:j + 1], 0.0)[0].backward(retain_graph=j < len(yb) - 1)
            imp.accumulate_grad(model)


def protected_modules(model: nn.Module, cfg: PruneConfig, example: torch.Tensor) -> list[nn.Module]:
    """The ignored modules and, with keep_ignored_inputs, every layer whose output channels
    feed them (through residual adds too): torch-pruning's ignored_layers alone keeps only
    an ignored layer's outputs and still shrinks its inputs."""
    import torch_pruning as tp
    mods = resolve_modules(model, cfg.ignored, "prune.ignored")
    if not cfg.keep_ignored_inputs:
        return mods
    dg = tp.DependencyGraph().build_dependency(model, example)
    out = list(mods)
    for m in mods:
        fn = {nn.Conv2d: tp.prune_conv_in_channels, nn.Linear: tp.prune_linear_in_channels}.get(type(m))
        if fn is None:
            continue
        for dep, _ in dg.get_pruning_group(m, fn, idxs=[0]):
            target = dep.target.module
            if isinstance(target, (nn.Conv2d, nn.Linear)) and getattr(dep.handler, "__name__", "") == "prune_out_channels":
                out.append(target)
    return out


def make_pruner(model: nn.Module, cfg: PruneConfig, example: torch.Tensor, imp=None):
    import torch_pruning as tp
    modules = dict(model.named_modules())
    return tp.pruner.MetaPruner(
        model, example, importance=imp if imp is not None else _importance(cfg.importance),
        pruning_ratio=cfg.ratio, global_pruning=cfg.global_pruning,
        pruning_ratio_dict={modules[n]: r for n, r in cfg.layer_ratios.items()} or None,
        max_pruning_ratio=cfg.max_layer_ratio, iterative_steps=cfg.steps,
        ignored_layers=protected_modules(model, cfg, example), round_to=cfg.round_to)


def prune_channels(model: nn.Module, cfg: PruneConfig, example: torch.Tensor) -> nn.Module:
    """One-shot pruning to cfg.ratio with a data-free criterion (tests, quick use)."""
    model.eval()
    pruner = make_pruner(model, cfg.model_copy(update={"steps": 1}), example)
    pruner.step()
    return model


def run(model: nn.Module, ctx, cfg: PruneConfig) -> nn.Module:
    from compress.models import count_params
    before = count_params(model)
    example = torch.zeros(1, *ctx.data.input_shape)
    teacher = ctx.teacher
    if cfg.recovery_teacher == "unpruned":
        teacher = copy.deepcopy(model).eval()
    imp = _importance(cfg.importance)
    pruner = make_pruner(model, cfg, example, imp)
    per_step = cfg.epochs / cfg.steps
    history, kw = [], ctx.fit_kwargs("prune")
    kw["teacher"] = teacher
    if cfg.recovery_teacher == "unpruned":  # key a cache by the unpruned weights themselves
        digest = hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes()
                                         for v in teacher.state_dict().values())).hexdigest()[:16]
        kw["teacher_key"] = f"unpruned-{digest}"
    for step in range(cfg.steps):
        if cfg.importance in GRADIENT_CRITERIA:
            score_gradients(model, imp, ctx, cfg, teacher)
        model.eval()
        pruner.step()
        model.zero_grad(set_to_none=True)
        ctx.log(f"  prune step {step + 1}/{cfg.steps} ({cfg.importance}): {count_params(model):,} params")
        if per_step > 0:
            rows = fit(model, ctx.data, cfg.model_copy(update={"epochs": per_step}), **kw)
            history += [{**r, "prune_step": step + 1} for r in rows]
    after = count_params(model)
    ctx.log(f"  pruned {before:,} -> {after:,} params (ratio {cfg.ratio}, round_to {cfg.round_to})")
    ctx.metrics.update(params_before=before, importance=cfg.importance, steps=cfg.steps)
    ctx.history = history
    return model
