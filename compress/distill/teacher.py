"""The teacher's side of a training step: where its outputs come from (a live forward pass,
or the teacher-output cache read by example index), how several teachers combine, and
which teacher module feature terms hook.

A teacher source is called as `source(x, idx)` with the step's (normalized) input and the
batch's example indices; a live one is also a callback that places the teacher on the
training device and memory format for the run and restores the format after. An augmented
cache (compress.distill.cache.AugmentedCache) also makes the student's input: `fit` wraps its
loader with the cache's `replayed`, which swaps each batch for the epoch's stored views."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol, Union

import torch
from torch import nn

from compress.distill.cache import SparseTarget, build_or_load
from compress.distill.ensemble import Ensemble
from compress.distill.features import FeatureDistiller

if TYPE_CHECKING:
    from calib.datasets import Dataset
    from compress.train import TrainConfig, TrainEnv


class TeacherSource(Protocol):
    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> Union[torch.Tensor, SparseTarget]: ...


def teacher_forward(teacher: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    if isinstance(teacher, Ensemble):
        return teacher(x, cfg.ensemble, cfg.kd_temperature())
    return teacher(x)


class LiveTeacher:
    """The teacher's forward pass at every step (augmentation and feature terms need it)."""

    def __init__(self, teacher: nn.Module, cfg: TrainConfig, device: torch.device, fmt: torch.memory_format):
        self.teacher, self.cfg, self.device, self.fmt = teacher, cfg, device, fmt

    def on_train_start(self, state) -> None:
        self.teacher.to(device=self.device, memory_format=self.fmt).eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, idx: torch.Tensor):
        if isinstance(self.teacher, Ensemble) and self.cfg.ensemble == "probs":  # each term at its own T
            return self.teacher(x, "members", self.cfg.kd_temperature())
        return teacher_forward(self.teacher, x, self.cfg).float()

    def on_train_end(self, state) -> None:
        self.teacher.to(memory_format=torch.contiguous_format)


def teacher_source(cfg: TrainConfig, env: TrainEnv, data: Dataset, fmt: torch.memory_format,
                   amp: Optional[torch.dtype] = None) -> Optional[TeacherSource]:
    """None when the objective needs no teacher; the cache is built (or read) here, once.
    `amp`: the training autocast, under which an augmented cache's views are computed."""
    if not cfg.needs_teacher:
        return None
    teacher = env.teacher
    if cfg.cache == "none":
        return LiveTeacher(teacher, cfg, env.device, fmt)
    augmented = cfg.cache == "augmented"
    form = cfg.cache_targets if augmented else cfg.cache
    key, weights = env.teacher_key, None
    forward = partial(teacher_forward, teacher, cfg=cfg)
    if isinstance(teacher, Ensemble):
        if cfg.ensemble == "probs" and form == "full":  # every teacher's logits: terms average at their own T
            key, weights = f"{env.teacher_key}-members", teacher.weights
            forward = _members_forward(teacher)
        else:  # the combined output depends on mode and T (a sparse cache serves one kl term, at that T)
            key = f"{env.teacher_key}-{cfg.ensemble}-T{cfg.kd_temperature():g}"
    # the augmented cache stands in for the live teacher: computed as it would run (format, autocast)
    fmt = fmt if augmented else torch.contiguous_format
    teacher.to(env.device, memory_format=fmt).eval()
    try:
        return build_or_load(cfg.cache, cfg.cache_k, cfg.kd_temperature(), forward, key, env.data_key, data,
                             env.cache_dir or Path("."), env.seed, env.device, env.log, views=cfg.cache_views,
                             targets=cfg.cache_targets, weights=weights, amp=amp if augmented else None, fmt=fmt)
    finally:
        teacher.to(memory_format=torch.contiguous_format)


def _members_forward(teacher: Ensemble):
    """(N, M, C): the teachers' logits, examples first (the cache's layout)."""
    return lambda x: teacher(x, "members").logits.transpose(0, 1)


def feature_distiller(cfg: TrainConfig, model: nn.Module, teacher: nn.Module, data: Dataset,
                      device: torch.device) -> Optional[FeatureDistiller]:
    """Hooks for the feature terms (an ensemble's first member is the one hooked)."""
    if not cfg.features:
        return None
    root = teacher.members[0] if isinstance(teacher, Ensemble) else teacher
    example = data.normalize(data.train.images[:2]).to(device)
    return FeatureDistiller(cfg.features, model, root, example).to(device)
