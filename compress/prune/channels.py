"""Channel (and attention-head) pruning with torch-pruning.

Importance criteria (torch-pruning): l1 / l2 magnitude, bn_scale (network slimming),
taylor (first order, on the stage's own KD objective), hessian (OBD, per-sample squared
gradients of the same objective), lamp, and random as a control.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from compress.classifier import find_classifier
from compress.distill.objectives import Objective
from compress.errors import UserError
from compress.names import resolve
from compress.prune.config import PruneConfig

GRADIENT_CRITERIA = {"taylor", "hessian"}


def check(model: nn.Module, cfg: PruneConfig, where: str, input_shape=(1, 28, 28)) -> None:
    """Run at preflight, before any training: names must exist in the student. (The
    latency target's backend is checked by the stage, through ctx.latency.)"""
    from compress.prune import blocks, sparse
    resolve(model, ignored(model, cfg, input_shape)["names"], f"{where}.ignored")
    resolve(model, list(cfg.layer_ratios), f"{where}.layer_ratios")
    resolve(model, cfg.block_candidates, f"{where}.block_candidates")
    if cfg.semi_structured:
        sparse.select(model, cfg.semi_structured)
    if cfg.ratio > 0 or cfg.target is not None:
        trial_prune(model, cfg, where, input_shape)
    if cfg.remove_blocks:
        found = blocks.candidates(model, torch.zeros(1, *input_shape), cfg.block_candidates)
        if cfg.remove_blocks > len(found):
            raise UserError(f"{where}.remove_blocks={cfg.remove_blocks}, but the model has only "
                            f"{len(found)} removable blocks ({', '.join(found) or 'none'})")


def trial_prune(model: nn.Module, cfg: PruneConfig, where: str, input_shape) -> None:
    """A trial of the stage's pruning on a copy of the student (one step to the final ratio,
    L2 magnitude: no data), then a forward, so a model torch-pruning cannot prune fails here,
    before training, in one line. Measured on torchvision/timm (benchmarks/RESULTS.md):
    ShuffleNetV2's channel shuffle raises ZeroDivisionError while the pruner is built
    (torch-pruning 1.6.1's index mapping, open upstream as VainF/Torch-Pruning#14); MixNet's
    mixed convs keep their split sizes and fail in the pruned forward; EfficientViT and EdgeNeXt
    fail in the step itself."""
    import traceback
    x = torch.zeros(2, *input_shape)
    doing = "build the pruner for this student"
    try:
        trial = copy.deepcopy(model).eval()
        pruner = make_pruner(trial, cfg.model_copy(update={"steps": 1}), x[:1], importance("l2"))
        doing = "prune this student"
        pruner.step()
        sync_heads(trial, pruner)
        doing = "run this student once pruned"
        with torch.no_grad():
            trial(x)
    except UserError:
        raise
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"{where}: torch-pruning cannot {doing}, tried on a copy at ratio {cfg.ratio} "
                        f"({type(e).__name__}: {msg} in {Path(frame.filename).name}:{frame.lineno} {frame.name}); "
                        f"channel pruning cannot run on it: remove the prune stage (the other stages do not "
                        f"need it)") from e


def ignored(model: nn.Module, cfg: PruneConfig, input_shape) -> dict:
    """{names, source}: the user's list, or the module producing the logits (found, not
    assumed: heads are called fc, classifier, head, ...); recorded in the stage's metrics."""
    if cfg.ignored is not None:
        return {"names": list(cfg.ignored), "source": "config"}
    name, how = find_classifier(model, tuple(input_shape))
    return {"names": [name] if name else [], "source": f"classifier ({how})" if name else "no classifier found"}


def importance(name: str):
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
    objective = Objective(cfg.loss, task=ctx.task)
    model.eval()  # keep BatchNorm statistics fixed while scoring
    model.zero_grad()
    if cfg.importance == "hessian":
        imp.zero_grad()
    for x, yb in ctx.calib_batches(cfg.importance_batches):
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
    mods = resolve(model, ignored(model, cfg, example.shape[1:])["names"], "prune.ignored")
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
            feeds = getattr(dep.handler, "__name__", "") == "prune_out_channels"
            if isinstance(target, (nn.Conv2d, nn.Linear)) and feeds:
                out.append(target)
    return out


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm-style attention (and compress' explicit twin of nn.MultiheadAttention): a fused
    qkv Linear and the head count the forward reads."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)]


def head_counts(model: nn.Module) -> dict[str, int]:
    """Heads of every attention module by qualified name (nn.MultiheadAttention included):
    the prune stage reports them before and after."""
    return {n: m.num_heads for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) or m in attention_modules(model)}


def sync_heads(model: nn.Module, pruner) -> None:
    """torch-pruning shrinks qkv; the module's forward reshapes by num_heads/head_dim,
    which must follow (they are recorded in structure.json and rebuilt from there)."""
    for m in attention_modules(model):
        m.num_heads = pruner.num_heads.get(m.qkv, m.num_heads)
        m.head_dim = m.qkv.out_features // 3 // m.num_heads
        if isinstance(getattr(m, "attn_dim", None), int):  # timm >= 1.0 reshapes by attn_dim
            m.attn_dim = m.num_heads * m.head_dim


def _pruner_class():
    import torch_pruning as tp

    class Pruner(tp.pruner.MetaPruner):
        def _round_to(self, n_pruned, current_channels, round_to):
            # torch-pruning floors the kept count to the grid; below one grid step that is
            # zero channels, and it then skips the layer entirely (measured: ratio 0.8 left
            # ResNet-8-wide's 32-channel layers at 32 while 0.7 cut them to 8, so MACs rose
            # with the ratio). Keep at least one grid step instead.
            kept = (current_channels - n_pruned) // round_to * round_to
            kept = max(kept, min(round_to, current_channels))
            return max(current_channels - kept, 0)
    return Pruner


def heads_report(before: dict[str, int], model: nn.Module) -> dict:
    """Heads before and after pruning, in total and by attention module (the prune stage's
    metrics); {} for a model without attention."""
    if not before:
        return {}
    after = head_counts(model)
    return {"heads": {"before": sum(before.values()), "after": sum(after.values()),
                      "by_module": {n: [h, after.get(n, 0)] for n, h in before.items()}}}


def make_pruner(model: nn.Module, cfg: PruneConfig, example: torch.Tensor, imp=None):
    """The pruner over `model`. torch's transformer blocks are first rewritten in place into
    explicit attention (same numbers; recorded in structure.json by Structure.with_shapes):
    nn.MultiheadAttention ties its heads to the residual width, so torch-pruning could only
    narrow every head of it, never remove one."""
    from compress.quantize.attention import rewrite
    rewrite(model)
    modules = dict(model.named_modules())
    heads = {m.qkv: m.num_heads for m in attention_modules(model)}
    return _pruner_class()(
        model, example, importance=imp if imp is not None else importance(cfg.importance),
        pruning_ratio=cfg.ratio, global_pruning=cfg.global_pruning,
        pruning_ratio_dict={modules[n]: r for n, r in cfg.layer_ratios.items()} or None,
        max_pruning_ratio=cfg.max_layer_ratio, iterative_steps=cfg.steps,
        ignored_layers=protected_modules(model, cfg, example), round_to=cfg.round_to,
        num_heads=heads, prune_num_heads=bool(heads) and cfg.prune_heads,
        prune_head_dims=bool(heads) and not cfg.prune_heads,
        head_pruning_ratio=cfg.ratio if cfg.prune_heads else 0.0)


def prune_channels(model: nn.Module, cfg: PruneConfig, example: torch.Tensor) -> nn.Module:
    """One-shot pruning to cfg.ratio with a data-free criterion (tests, quick use)."""
    model.eval()
    pruner = make_pruner(model, cfg.model_copy(update={"steps": 1}), example)
    pruner.step()
    sync_heads(model, pruner)
    return model
