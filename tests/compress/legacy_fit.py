"""A frozen copy of compress/train.py's `fit` as it was before the DataLoader/callback
rewrite (issue 10, commit 2a7d85a): verbatim except for the imports, plus that commit's
compress.prune.sparse.MaskKeeper at the end. It is the reference the new loop must reproduce
bit for bit (tests/compress/test_train_equivalence.py). Do not edit it; if the loop's numbers
are meant to change, delete this file and the equivalence test."""
# ruff: noqa
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calib.datasets import Dataset, Split
from compress.distill.features import FeatureDistiller
from compress.distill.objectives import Objective
from compress.errors import UserError
from compress.train import TrainConfig


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # Measured on this project's CPU (AVX512-BF16): 2.7x faster steps than fp32.
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
    out = torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def batches(split: Split, batch_size: int, g: Optional[torch.Generator] = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels, example indices); shuffled when a generator is given,
    drop_last only when shuffling."""
    n = len(split)
    if g is None:
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(n, i + batch_size))
            yield split.images[i:i + batch_size], split.labels[i:i + batch_size], idx
        return
    order = torch.randperm(n, generator=g)
    for i in range(0, n - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        yield split.images[idx], split.labels[idx], idx


@torch.no_grad()
def predict(model: nn.Module, split: Split, data: Dataset, batch_size: int = 512,
            device: torch.device = torch.device("cpu")) -> np.ndarray:
    """fp32 logits of a torch model on a split (the reference every backend is held to)."""
    model.eval()
    outs = [model(data.normalize(x).to(device)).float().cpu()
            for x, _, _ in batches(split, batch_size)]
    return torch.cat(outs).numpy()


def accuracy(logits: np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    return float((logits.argmax(1) == np.asarray(labels)).mean())


def _progress():
    """A rich progress bar on a terminal; silent otherwise (CI logs get one line per epoch)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    console = Console(stderr=True)
    return Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def teacher_forward(teacher: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    from compress.distill.ensemble import Ensemble
    if isinstance(teacher, Ensemble):
        return teacher(x, cfg.ensemble, cfg.kd_temperature())
    return teacher(x)


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, *, batch_size: int,
        teacher: Optional[nn.Module] = None, teacher_key: str = "teacher",
        cache_dir: Optional[Path] = None, data_key: str = "data", seed: int = 0,
        device: torch.device = torch.device("cpu"), log: Callable[[str], None] = print,
        desc: str = "train", after_step: Optional[Callable[[nn.Module], None]] = None,
        eval_split: Optional[Split] = None, sparsity: Optional[dict] = None) -> list[dict]:
    """Train `model` in place; returns one row per epoch (each loss term, train/val accuracy)."""
    if cfg.needs_teacher and teacher is None:
        raise UserError(f"{desc}: the loss uses a teacher ({[t.kind for t in cfg.loss]}, "
                        f"{len(cfg.features)} feature terms) but none is available")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(data.train) // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{desc}: batch_size={batch_size} exceeds the {len(data.train)} "
                        f"training examples")
    total = max(1, round(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    cache = None
    if cfg.needs_teacher and cfg.cache != "none":
        from compress.distill.cache import build_or_load
        from compress.distill.ensemble import Ensemble
        key = teacher_key
        if isinstance(teacher, Ensemble):  # the combined output depends on mode and T
            key = f"{teacher_key}-{cfg.ensemble}-T{cfg.kd_temperature():g}"
        teacher.to(device).eval()
        cache = build_or_load(cfg.cache, cfg.cache_k, cfg.kd_temperature(),
                              lambda x: teacher_forward(teacher, x, cfg), key, data_key, data,
                              cache_dir or Path("."), seed, device, log)
    features = None
    if cfg.features:
        from compress.distill.ensemble import Ensemble
        root = teacher.members[0] if isinstance(teacher, Ensemble) else teacher
        example = data.normalize(data.train.images[:2]).to(device)
        features = FeatureDistiller(cfg.features, model, root, example).to(device)
    objective = Objective(cfg.loss, features)
    if sparsity:  # 2:4 layers keep their zeros through every later stage's training
        keep, user_step = MaskKeeper(model, list(sparsity)), after_step
        after_step = (lambda m: (keep(m), user_step(m))) if user_step else keep
    params = [p for p in model.parameters() if p.requires_grad]
    if features is not None:  # adapters train with the student, and are dropped after
        params += list(features.adapters.parameters())
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, nesterov=True)
    amp = autocast_dtype(cfg, device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    live_teacher = teacher if (cfg.needs_teacher and cache is None) else None
    if live_teacher is not None:
        live_teacher.to(device=device, memory_format=fmt).eval()
    history: list[dict] = []
    step, epoch = 0, 0
    t0 = time.time()
    n_epochs = math.ceil(total / steps_per_epoch)
    try:
        with _progress() as bar:
            task = bar.add_task(desc, total=total, info="")
            while step < total:
                model.train()
                sums: dict[str, float] = {"loss": 0.0}
                correct = seen = n = 0
                te = time.time()
                for xb, yb, idx in batches(data.train, batch_size, g):
                    if step >= total:
                        break
                    if cfg.augment:
                        xb = augment_batch(xb, g)
                    x = data.normalize(xb).to(device).contiguous(memory_format=fmt)
                    y = yb.to(device)
                    for group in opt.param_groups:
                        group["lr"] = _lr_at(step, total, warmup, cfg.lr)
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        out = model(x)
                        t_out = None
                        if cache is not None:
                            t_out = cache.lookup(idx)
                        elif live_teacher is not None:
                            with torch.no_grad():
                                t_out = teacher_forward(live_teacher, x, cfg).float()
                        loss, parts = objective(out.float(), t_out, y, step / total)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if after_step is not None:
                        after_step(model)
                    step += 1
                    n += 1
                    sums["loss"] += float(loss.detach())
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    correct += int((out.argmax(1) == y).sum())
                    seen += len(y)
                    bar.update(task, advance=1, info=f"epoch {epoch + 1}/{n_epochs} loss "
                               f"{sums['loss'] / n:.4f} acc {correct / seen:.4f}")
                row = {"epoch": epoch + 1, "steps": n, **{k: v / max(1, n) for k, v in sums.items()},
                       "train_accuracy": correct / max(1, seen), "seconds": time.time() - te}
                if eval_split is not None:
                    row["val_accuracy"] = accuracy(predict(model, eval_split, data, device=device),
                                                   eval_split.labels)
                terms = ", ".join(f"{k} {v / max(1, n):.4f}" for k, v in sums.items() if k != "loss")
                # rich redirects stdout while the bar is live, so plain logging stays readable
                log(f"  {desc} epoch {row['epoch']}: loss {row['loss']:.4f} ({terms}) "
                    f"train acc {row['train_accuracy']:.4f}"
                    + (f" val acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else "")
                    + f" [{row['seconds']:.0f}s]")
                history.append(row)
                epoch += 1
    finally:
        if features is not None:
            features.close()  # hooks must not outlive the stage (they would leak into export)
        model.to(memory_format=torch.contiguous_format)
        if live_teacher is not None:
            live_teacher.to(memory_format=torch.contiguous_format)
    log(f"  {desc}: {step} steps in {time.time() - t0:.0f}s")
    return history


class MaskKeeper:
    """Fixed masks (the current zeros of each sparse layer), re-applied after every
    optimizer step. Looked up by qualified name, which brevitas' graph quantization keeps."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UserError(f"structure: sparse layers {missing} are not in the model")
        self.masks = {n: (modules[n].weight != 0) for n in names}
        self.modules = {n: modules[n] for n in names}

    def __call__(self, model: nn.Module) -> None:
        with torch.no_grad():
            for n, m in self.modules.items():
                mask = self.masks[n]
                if mask.device != m.weight.device or mask.dtype != m.weight.dtype:
                    # once, after fit moves the model: not a conversion every step
                    mask = self.masks[n] = mask.to(m.weight.device, m.weight.dtype)
                m.weight.mul_(mask)
