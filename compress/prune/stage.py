"""The prune stage, jointly with distillation: optional block removal (LAPTOP-Diff), then
N channel-pruning steps (ratio fixed, or searched for a latency budget on a backend),
optional 2:4 sparsity on the last step, each step followed by KD recovery through the
one training loop, from the run's teacher or a frozen copy of the unpruned model (CoFi)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib

import torch
from torch import nn

from compress import distributed
from compress.models import count_params
from compress.prune import blocks, budget, channels, sparse
from compress.prune.channels import GRADIENT_CRITERIA, importance, make_pruner, score_gradients, sync_heads
from compress.prune.config import PruneConfig
from compress.stage import RunContext, StageResult
from compress.train import fit


def _weights_key(model: nn.Module) -> str:
    """Keys a teacher-output cache by the unpruned weights themselves."""
    return "unpruned-" + hashlib.sha256(b"".join(
        v.detach().cpu().numpy().tobytes() for v in model.state_dict().values())).hexdigest()[:16]


class PruneStage:
    """Channels and heads (torch-pruning), whole blocks, 2:4 sparsity; KD recovery after each step."""
    config = PruneConfig
    calibrates = False

    def check(self, model: nn.Module, ctx: RunContext, cfg: PruneConfig) -> None:
        channels.check(model, cfg, ctx.where, ctx.data.input_shape)
        if cfg.target is not None:  # a latency search needs its runtime: say so before training
            ctx.latency.check(cfg.target.backend, f"{ctx.where}.target.backend")

    def run(self, model: nn.Module, ctx: RunContext, cfg: PruneConfig) -> StageResult:
        before = count_params(model)
        metrics: dict = {}
        heads = channels.head_counts(model)
        # a frozen copy only when something reads it: a teacher (CoFi) or the latency reference
        need_copy = cfg.recovery_teacher == "unpruned" or cfg.target is not None
        unpruned = copy.deepcopy(model).eval() if need_copy else None
        structure = ctx.structure
        if cfg.remove_blocks:
            structure = self._remove_blocks(model, ctx, cfg, metrics)
        ratio = cfg.ratio
        if cfg.target is not None:
            # timings differ between processes: rank 0 measures, every rank gets its choice
            ratio, metrics["latency_search"] = distributed.on_main(lambda: budget.search(model, unpruned, ctx, cfg))
        cfg = cfg.model_copy(update={"ratio": ratio})
        ctx = dataclasses.replace(ctx, structure=structure)
        history, structure = self._steps(model, unpruned, ctx, cfg, metrics)
        ctx.log(f"  pruned {before:,} -> {count_params(model):,} params (ratio {ratio:g}, round_to {cfg.round_to})")
        if cfg.target is not None:
            final = distributed.on_main(lambda: budget.measure_final(unpruned, model, ctx, cfg))
            metrics["latency_search"]["final"] = final
            ctx.log(f"  achieved latency ratio {final['latency_ratio']:.2f}x of the unpruned model "
                    f"on {cfg.target.backend}")
        metrics.update(params_before=before, importance=cfg.importance, steps=cfg.steps, ratio=ratio,
                       ignored=channels.ignored(model, cfg, ctx.data.input_shape),
                       **channels.heads_report(heads, model))
        return StageResult(model, structure.with_shapes(model), history, metrics)

    @staticmethod
    def _remove_blocks(model: nn.Module, ctx: RunContext, cfg: PruneConfig, metrics: dict):
        removed, scores = distributed.on_main(lambda: blocks.remove(model, ctx, cfg))
        if not distributed.is_main():  # rank 0's choice, applied here
            blocks.apply(model, removed)
        metrics.update(block_distortion=scores, removed_blocks=removed)
        ctx.log(f"  removed blocks {', '.join(removed)} (output distortion "
                f"{', '.join(f'{scores[n]:.3g}' for n in removed)})")
        return ctx.structure.model_copy(update={"removed_blocks": ctx.structure.removed_blocks + removed})

    @staticmethod
    def _steps(model: nn.Module, unpruned, ctx: RunContext, cfg: PruneConfig, metrics: dict):
        """cfg.steps rounds of (prune, [2:4 on the last], recover) -> (history, the structure
        the model ends with, shapes not yet recorded)."""
        teacher = unpruned if cfg.recovery_teacher == "unpruned" else ctx.teacher
        key = _weights_key(unpruned) if cfg.recovery_teacher == "unpruned" else None
        sparse_names = sparse.select(model, cfg.semi_structured) if cfg.semi_structured else []
        imp = distributed.broadcast_importance(importance(cfg.importance))  # rank 0's scores everywhere
        pruner = make_pruner(model, cfg, torch.zeros(1, *ctx.data.input_shape), imp) if cfg.ratio > 0 else None
        per_step = cfg.epochs / cfg.steps
        history = []
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
                # after the last width change: channel pruning would cut through 2:4 groups;
                # the recovery below keeps the masks (train_env reads ctx.structure.sparsity)
                sparse.apply(model, sparse_names)
                pattern = {n: sparse.PATTERN for n in sparse_names}
                ctx = dataclasses.replace(ctx, structure=ctx.structure.model_copy(update={"sparsity": pattern}))
                metrics["sparsity"] = pattern
                ctx.log(f"  2:4 sparsity on {len(sparse_names)} layers")
            if per_step > 0:
                env = ctx.train_env("prune", teacher=teacher, teacher_key=key or ctx.teacher_key)
                rows = fit(model, ctx.data, cfg.model_copy(update={"epochs": per_step}), env)
                history += [{**r, "prune_step": step + 1} for r in rows]
        return history, ctx.structure
