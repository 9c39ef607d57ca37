"""Data-free calibration images (ZeroQ, Cai et al., CVPR 2020): start from noise and optimize
the pixels so that a trained model's BatchNorm layers see the statistics they learned on the
real data. The result stands in for the calibration subset when the real data may not be used.

The default objective is ZeroQ's eq. 2, min_x sum_{i=0..L} ||mu~_i - mu_i||^2 + ||sigma~_i - sigma_i||^2
(i = 0 is the input), exactly as the authors' code computes it: amirgholami/ZeroQ
classification/distill_data.py (getDistilData, own_loss) and classification/utils/data_utils.py
(UniformDataset), commit 9715739b8731a44d064901b50260aeebbe9a10bc. Per BN layer and per image:
the mean and std (unbiased variance, + 1e-6) of each channel over its positions, against the running
mean and sqrt(running_var + 1e-6); squared L2 norms, averaged over images, summed over layers; the
input (already normalized) against mean 0 and std 1 per image and channel. Adam (lr 0.5) on the
normalized pixels themselves, from ZeroQ's near-zero uniform noise, with ReduceLROnPlateau
(patience 100, min_lr 1e-4). Departures, each forced by what we store or hook:
- the statistics are taken at each BN layer's input; ZeroQ hooks the output of the i-th Conv2d and
  pairs it with the i-th BatchNorm2d, which is the same thing when every BN follows its conv;
- BN layers whose input has one value per channel per image (BatchNorm1d on (N, C)) have no
  per-image statistics and are skipped (ZeroQ counts BatchNorm2d only);
- the images are stored as uint8 like every other split, so the pixels are kept in the valid range
  after every Adam step (projected) and rounded at the end. Unconstrained, as in ZeroQ, 27% of the
  pixels left the range on the Fashion-MNIST student, and clamping them afterwards took the objective
  from 0.21 to 3.69 (real images score 3.8); projected, the stored images keep 0.15.

`ce_weight` adds DeepInversion's class-conditional cross-entropy (Yin et al., CVPR 2020) against
targets assigned round-robin over the classes, so that every class appears. `objective: batch` is
the form used before issue 15 (statistics of the whole batch, unsquared norms averaged over layers,
no input term, pixels as sigmoid(z)), kept to compare: flat +-1 images score 0 under it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from calib.datasets import Split
from compress.errors import UserError
from compress.hooks import OutputCapture

ZEROQ_EPS = 1e-6  # distill_data.py: `eps = 1e-6` in both sqrt(running_var + eps) and sqrt(var + eps), not the BN's eps
# data_utils.py: (randint(high=255) - 127.5) / 5418.75; 5418.75 is the variance of U(-128, 127), so the std is 0.0136
ZEROQ_INIT_DIV = 5418.75


class SynthesisConfig(BaseModel):
    """How data-free calibration images are synthesized (data.calibration: synthetic)."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: Literal["teacher", "student"] = Field("teacher")
    """whose BatchNorm statistics the images fit: the teacher, or the float model entering the quantize stage (ZeroQ's
    own setting; far cheaper when the teacher is large)"""
    objective: Literal["zeroq", "batch"] = Field("zeroq")
    """zeroq: ZeroQ's loss as in the authors' code (each image's per-channel statistics, squared norms summed over BN
    layers, plus the input's mean 0 / std 1); batch: the pre-issue-15 batch-statistics form, kept to compare"""
    steps: int = Field(200, ge=1, description="Adam steps per batch of synthesized images (ZeroQ used 500 on ImageNet)")
    lr: Optional[float] = Field(None, gt=0)
    """Adam learning rate; unset: 0.5 for zeroq (ZeroQ's, on the normalized pixels), 0.1 for batch (sigmoid logits)"""
    batch_size: int = Field(128, ge=2)
    """images optimized together (zeroq's loss is per image: this sets memory and speed only)"""
    ce_weight: Optional[float] = Field(None, ge=0)
    """DeepInversion's class-conditional term: weight of the cross-entropy of the model's logits against targets
    assigned round-robin over the classes (image j is pushed toward class j mod C), so every class appears.
    Unset: 1 where the model's output is (N, classes), 0 otherwise (segmentation maps). 0 is ZeroQ's own form,
    which calibrated 10 points below real images on the demo's student (77% of its images one class)"""

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (0.5 if self.objective == "zeroq" else 0.1)


@dataclass
class SyntheticSplit(Split):
    """A split of synthesized images, labelled with the model's own predictions."""
    synthetic: bool = True
    key: str = ""  # identity of the synthesis (model, settings, seed): keys caches
    bn_distance: tuple = ()  # (before, after) mean BN-statistics objective per batch


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None]


def image_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, ...) -> each image's per-channel mean and sqrt(unbiased var + 1e-6), both (N, C), as ZeroQ."""
    flat = x.flatten(2)
    return flat.mean(2), (flat.var(2) + ZEROQ_EPS).sqrt()


def zeroq_term(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """ZeroQ's own_loss for means + stds: squared L2 distances, summed over channels, averaged over images."""
    m, s = image_stats(x)
    return ((m - mean).pow(2).sum() + (s - std).pow(2).sum()) / x.shape[0]


class BNStats:
    """Forward hooks that collect, for one forward pass, each BN layer's statistics distance
    (`objective`: zeroq or batch, see the module docstring); `take()` combines them."""

    def __init__(self, model: nn.Module, objective: str = "zeroq"):
        self.layers, self.objective = bn_layers(model), objective
        if not self.layers:
            raise UserError("data.calibration: synthetic needs a model with BatchNorm layers "
                            "(their running statistics are what the images are fitted to)")
        self.terms: list[torch.Tensor] = []
        self.capture = OutputCapture(None, modules=[(str(i), m) for i, m in enumerate(self.layers)], fn=self._hook)

    def _hook(self, _name, m, inputs, _out):
        x = inputs[0]
        if self.objective == "zeroq":
            if x.dim() > 2 and x[0, 0].numel() > 1:  # per-image statistics need positions to average over
                self.terms.append(zeroq_term(x, m.running_mean, (m.running_var + ZEROQ_EPS).sqrt()))
            return
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.terms.append(torch.norm(mean - m.running_mean) +
                          torch.norm(var.clamp_min(0).sqrt() - (m.running_var + m.eps).sqrt()))

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The objective for the forward pass just run on the normalized input `x`."""
        if self.objective == "zeroq":  # summed over layers, plus the input term (i = 0: mean 0, std 1)
            out = torch.stack(self.terms).sum() + zeroq_term(x, torch.zeros(()), torch.ones(()))
        else:
            out = torch.stack(self.terms).mean()
        self.terms = []
        return out

    def close(self) -> None:
        self.capture.close()


def bn_distance(model: nn.Module, x: torch.Tensor, objective: str = "zeroq") -> float:
    """The BN-statistics objective (no cross-entropy term) of the normalized batch `x`."""
    stats = BNStats(model, objective)
    try:
        with torch.no_grad():
            model.eval()(x)
        return float(stats.take(x))
    finally:
        stats.close()


def round_robin(start: int, n: int, num_classes: int) -> torch.Tensor:
    """DeepInversion's targets, assigned so that every class appears: image j -> class j mod C."""
    return torch.arange(start, start + n) % num_classes


def _pixel_range(normalize: Callable, input_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized values of pixels 0 and 1: the dataset's normalization is affine per channel."""
    return normalize(torch.zeros(1, *input_shape)), normalize(torch.ones(1, *input_shape))


def _optimize(model, stats: BNStats, b: int, input_shape, normalize, cfg: SynthesisConfig, g, targets):
    """One batch of synthesized images -> (uint8 images, objective at the first step)."""
    if cfg.objective == "zeroq":  # the normalized pixels themselves, from ZeroQ's near-zero uniform noise
        p = ((torch.randint(high=255, size=(b, *input_shape), generator=g).float() - 127.5) / ZEROQ_INIT_DIV)
        as_input = lambda p: p  # noqa: E731
    else:  # a batch of one has no batch statistics to match; pad it with a second image
        p = torch.randn(max(b, 2), *input_shape, generator=g)
        as_input = lambda p: normalize(torch.sigmoid(p))  # noqa: E731  float in [0, 1]: see Dataset.normalize
    p.requires_grad_(True)
    lo, hi = _pixel_range(normalize, input_shape)
    opt = torch.optim.Adam([p], lr=cfg.learning_rate())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=100)  # distill_data.py's
    first = None
    for _ in range(cfg.steps):
        x = as_input(p)
        logits = model(x)
        loss = stats.take(x)
        first = float(loss.detach()) if first is None else first
        if targets is not None:
            loss = loss + cfg.ce_weight * F.cross_entropy(logits[:b], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cfg.objective == "zeroq":
            sched.step(float(loss.detach()))
            with torch.no_grad():
                p.copy_(torch.maximum(torch.minimum(p, hi), lo))  # only valid pixels can be stored
    with torch.no_grad():
        pixels = (p - lo) / (hi - lo) if cfg.objective == "zeroq" else torch.sigmoid(p)
    return (pixels * 255).round().to(torch.uint8), first


def _class_term(model: nn.Module, input_shape, normalize, cfg: SynthesisConfig):
    """The config with ce_weight resolved, and the number of classes the term spreads over."""
    if cfg.ce_weight == 0:
        return cfg, None
    with torch.no_grad():
        out = model(normalize(torch.zeros(1, *input_shape)))
    if out.dim() != 2:
        if cfg.ce_weight is not None:
            raise ValueError(f"data.synthesis.ce_weight: the model's output is {tuple(out.shape)}, not (N, classes); "
                             f"set ce_weight: 0")
        return cfg.model_copy(update={"ce_weight": 0.0}), None
    return cfg.model_copy(update={"ce_weight": 1.0 if cfg.ce_weight is None else cfg.ce_weight}), out.shape[1]


def synthesize(model: nn.Module, n: int, input_shape, normalize: Callable[[torch.Tensor], torch.Tensor],
               cfg: SynthesisConfig, seed: int, log: Callable[[str], None] = print) -> SyntheticSplit:
    """n uint8 images (N, C, H, W) whose BN statistics match the model's running statistics."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    stats = BNStats(model, cfg.objective)
    images, labels, before, after = [], [], [], []
    cfg, num_classes = _class_term(model, input_shape, normalize, cfg)
    stats.terms = []
    try:
        for start in range(0, n, cfg.batch_size):
            b = min(cfg.batch_size, n - start)
            targets = round_robin(start, b, num_classes) if cfg.ce_weight else None
            u8, first = _optimize(model, stats, b, input_shape, normalize, cfg, g, targets)
            before.append(first)
            with torch.no_grad():
                x = normalize(u8)
                logits = model(x)
                after.append(float(stats.take(x)))
            images.append(u8[:b])
            labels.append(logits.argmax(1)[:b])
            log(f"  synthetic calibration: images {start + b}/{n}, BN distance ({cfg.objective}) "
                f"{before[-1]:.3f} -> {after[-1]:.3f}, classes predicted {torch.cat(labels).unique().numel()}")
    finally:
        stats.close()
        for p in model.parameters():
            p.requires_grad_(True)
    lo, hi = _pixel_range(normalize, input_shape)
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
