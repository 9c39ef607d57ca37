"""The prune stage, jointly with distillation: optional block removal (LAPTOP-Diff), then
N channel-pruning steps (ratio fixed, or searched for a latency budget on a backend),
optional 2:4 sparsity on the last step, each step followed by KD recovery through the
one training loop, from the run's teacher or a frozen copy of the unpruned model (CoFi)."""
from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from compress.prune import blocks, budget, sparse
from compress.prune.channels import GRADIENT_CRITERIA, importance, make_pruner, score_gradients, sync_heads
from compress.prune.config import PruneConfig
from compress.train import fit


def run(model: nn.Module, ctx, cfg: PruneConfig) -> nn.Module:
    from compress.models import count_params
    before = count_params(model)
    example = torch.zeros(1, *ctx.data.input_shape)
    # a frozen copy only when something reads it: a teacher (CoFi) or the latency reference
    need_copy = cfg.recovery_teacher == "unpruned" or cfg.target is not None
    unpruned = copy.deepcopy(model).eval() if need_copy else None
    teacher = unpruned if cfg.recovery_teacher == "unpruned" else ctx.teacher
    if cfg.remove_blocks:
        removed, scores = blocks.remove(model, ctx, cfg)
        ctx.structure["removed_blocks"] = ctx.structure.get("removed_blocks", []) + removed
        ctx.metrics.update(block_distortion=scores, removed_blocks=removed)
        ctx.log(f"  removed blocks {', '.join(removed)} (output distortion "
                f"{', '.join(f'{scores[n]:.3g}' for n in removed)})")
    ratio = cfg.ratio
    if cfg.target is not None:
        ratio, ctx.metrics["latency_search"] = budget.search(model, unpruned, ctx, cfg)
    cfg = cfg.model_copy(update={"ratio": ratio})
    sparse_names = sparse.select(model, cfg.semi_structured) if cfg.semi_structured else []
    imp = importance(cfg.importance)
    pruner = make_pruner(model, cfg, example, imp) if ratio > 0 else None
    per_step = cfg.epochs / cfg.steps
    history = []
    key = None
    if cfg.recovery_teacher == "unpruned":  # key a cache by the unpruned weights themselves
        key = "unpruned-" + hashlib.sha256(b"".join(
            v.detach().cpu().numpy().tobytes() for v in unpruned.state_dict().values())).hexdigest()[:16]
    for step in range(cfg.steps):
        if pruner is not None:
            if cfg.importance in GRADIENT_CRITERIA:
                score_gradients(model, imp, ctx, cfg, teacher)
            model.eval()
            pruner.step()
            sync_heads(model, pruner)
            model.zero_grad(set_to_none=True)
            ctx.log(f"  prune step {step + 1}/{cfg.steps} ({cfg.importance}): {count_params(model):,} params")
        if step == cfg.steps - 1 and sparse_names:
            # after the last width change: channel pruning would cut through 2:4 groups
            sparse.apply(model, sparse_names)
            ctx.structure["sparsity"] = {n: sparse.PATTERN for n in sparse_names}
            ctx.metrics["sparsity"] = ctx.structure["sparsity"]
            ctx.log(f"  2:4 sparsity on {len(sparse_names)} layers")
        if per_step > 0:
            env = ctx.train_env("prune", teacher=teacher, teacher_key=key or ctx.teacher_key)
            rows = fit(model, ctx.data, cfg.model_copy(update={"epochs": per_step}), env)
            history += [{**r, "prune_step": step + 1} for r in rows]
    after = count_params(model)
    ctx.log(f"  pruned {before:,} -> {after:,} params (ratio {ratio:g}, round_to {cfg.round_to})")
    if cfg.target is not None:
        final = budget.measure_final(unpruned, model, ctx, cfg)
        ctx.metrics["latency_search"]["final"] = final
        ctx.log(f"  achieved latency ratio {final['latency_ratio']:.2f}x of the unpruned model "
                f"on {cfg.target.backend}")
    ctx.metrics.update(params_before=before, importance=cfg.importance, steps=cfg.steps, ratio=ratio)
    ctx.history = history
    return model
