"""The teacher's side of a training step: where its outputs come from (a live forward pass,
or the teacher-output cache read by example index), how several teachers combine, and
which teacher module feature terms hook.

A teacher source is called as `source(x, idx)` with the step's (normalized) input and the
batch's example indices; a live one is also a callback that places the teacher on the
training device and memory format for the run and restores the format after."""
from __future__ import annotations

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


def teacher_source(cfg: TrainConfig, env: TrainEnv, data: Dataset,
                   fmt: torch.memory_format) -> Optional[TeacherSource]:
    """None when the objective needs no teacher; the cache is built (or read) here, once."""
    if not cfg.needs_teacher:
        return None
    teacher = env.teacher
    if cfg.cache == "none":
        return LiveTeacher(teacher, cfg, env.device, fmt)
    key = env.teacher_key
    if isinstance(teacher, Ensemble):  # the combined output depends on mode and T
        key = f"{env.teacher_key}-{cfg.ensemble}-T{cfg.kd_temperature():g}"
    teacher.to(env.device).eval()
    return build_or_load(cfg.cache, cfg.cache_k, cfg.kd_temperature(), lambda x: teacher_forward(teacher, x, cfg),
                         key, env.data_key, data, env.cache_dir or Path("."), env.seed, env.device, env.log)


def feature_distiller(cfg: TrainConfig, model: nn.Module, teacher: nn.Module, data: Dataset,
                      device: torch.device) -> Optional[FeatureDistiller]:
    """Hooks for the feature terms (an ensemble's first member is the one hooked)."""
    if not cfg.features:
        return None
    root = teacher.members[0] if isinstance(teacher, Ensemble) else teacher
    example = data.normalize(data.train.images[:2]).to(device)
    return FeatureDistiller(cfg.features, model, root, example).to(device)
