"""Data-free calibration images (ZeroQ, Cai et al. 2020): start from random pixels and
optimize them so the BatchNorm layers of a trained model see batch statistics equal to the
running statistics they learned on the real data. The result stands in for the calibration
subset when the real data may not be used.

Pixels are parametrized as sigmoid(z) in [0, 1] and stored as uint8 like every other split, so
the images go through the dataset's own normalization and are valid inputs to any runtime.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from calib.datasets import Split
from compress.errors import UserError
from compress.hooks import OutputCapture


class SynthesisConfig(BaseModel):
    """How data-free calibration images are synthesized (data.calibration: synthetic)."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: Literal["teacher", "student"] = Field("teacher")
    """whose BatchNorm statistics the images fit: the teacher, or the float model entering the quantize stage (ZeroQ's
    own setting; far cheaper when the teacher is large)"""
    steps: int = Field(200, ge=1, description="Adam steps per batch of synthesized images (ZeroQ used 500 on ImageNet)")
    lr: float = Field(0.1, gt=0, description="Adam learning rate on the pixel logits")
    batch_size: int = Field(128, ge=2)
    """images optimized together: the BN batch statistics are taken over this batch"""


@dataclass
class SyntheticSplit(Split):
    """A split of synthesized images, labelled with the model's own predictions."""
    synthetic: bool = True
    key: str = ""  # identity of the synthesis (model, settings, seed): keys caches
    bn_distance: tuple = ()  # (before, after) mean BN-statistics distance per batch


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None]


class BNStats:
    """Forward hooks that collect, for one forward pass, the distance between each BN layer's
    input batch statistics and its running statistics (ZeroQ's loss)."""

    def __init__(self, model: nn.Module):
        self.layers = bn_layers(model)
        if not self.layers:
            raise UserError("data.calibration: synthetic needs a model with BatchNorm layers "
                            "(their running statistics are what the images are fitted to)")
        self.terms: list[torch.Tensor] = []
        self.capture = OutputCapture(None, modules=[(str(i), m) for i, m in enumerate(self.layers)], fn=self._hook)

    def _hook(self, _name, m, inputs, _out):
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.terms.append(torch.norm(mean - m.running_mean) +
                          torch.norm(var.clamp_min(0).sqrt() - (m.running_var + m.eps).sqrt()))

    def take(self) -> torch.Tensor:
        out, self.terms = torch.stack(self.terms).mean(), []
        return out

    def close(self) -> None:
        self.capture.close()


def bn_distance(model: nn.Module, x: torch.Tensor) -> float:
    """Mean over BN layers of ||mu_batch - mu_run|| + ||sigma_batch - sigma_run||."""
    stats = BNStats(model)
    try:
        with torch.no_grad():
            model.eval()(x)
        return float(stats.take())
    finally:
        stats.close()


def synthesize(model: nn.Module, n: int, input_shape, normalize: Callable[[torch.Tensor], torch.Tensor],
               cfg: SynthesisConfig, seed: int, log: Callable[[str], None] = print) -> SyntheticSplit:
    """n uint8 images (N, C, H, W) whose BN statistics match the model's running statistics."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    stats = BNStats(model)
    images, labels, before, after = [], [], [], []
    try:
        for start in range(0, n, cfg.batch_size):
            b = min(cfg.batch_size, n - start)
            # a batch of one has no batch statistics to match; pad it with a second image
            z = torch.randn(max(b, 2), *input_shape, generator=g).requires_grad_(True)
            opt = torch.optim.Adam([z], lr=cfg.lr)
            for step in range(cfg.steps):
                model(normalize(torch.sigmoid(z)))  # float in [0, 1]: see Dataset.normalize
                loss = stats.take()
                if step == 0:
                    before.append(float(loss.detach()))
                opt.zero_grad()
                loss.backward()
                opt.step()
            u8 = (torch.sigmoid(z.detach()) * 255).round().to(torch.uint8)
            with torch.no_grad():
                logits = model(normalize(u8))
                after.append(float(stats.take()))
            images.append(u8[:b])
            labels.append(logits.argmax(1)[:b])
            log(f"  synthetic calibration: images {start + b}/{n}, BN distance "
                f"{before[-1]:.3f} -> {after[-1]:.3f}")
    finally:
        stats.close()
        for p in model.parameters():
            p.requires_grad_(True)
    return SyntheticSplit(torch.cat(images), torch.cat(labels),
                          bn_distance=(sum(before) / len(before), sum(after) / len(after)))


def load_or_synthesize(path: Optional[Path], key_parts: list, model: nn.Module, n: int, input_shape,
                       normalize, cfg: SynthesisConfig, seed: int, log=print) -> SyntheticSplit:
    """synthesize(), cached as safetensors under `path` (a folder) by a hash of what made it."""
    key = hashlib.sha256(repr([*key_parts, n, list(input_shape), cfg.model_dump(), seed]).encode()
                         ).hexdigest()[:16]
    f = path / f"synthetic-calib-{key}.safetensors" if path is not None else None
    from compress.checkpoint import load_sealed_tensors, save_sealed_tensors
    t = load_sealed_tensors(f, log, "synthetic calibration") if f is not None and f.is_file() else None
    if t is not None:
        log(f"  synthetic calibration: {len(t['labels'])} images from {f.name}")
        return SyntheticSplit(t["images"], t["labels"], key=key,
                              bn_distance=tuple(t["bn_distance"].tolist()))
    split = synthesize(model, n, input_shape, normalize, cfg, seed, log)
    split.key = key
    if f is not None:
        save_sealed_tensors(f, {"images": split.images, "labels": split.labels,
                                "bn_distance": torch.tensor(split.bn_distance)})
    return split
