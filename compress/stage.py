"""The Stage contract: what the pipeline gives a stage (a model, a RunContext, the stage's own
config) and what a stage gives back (a StageResult). A stage is any object with these
members; there is no base class to inherit (torchtune's recipe_interfaces is the model).
compress/stages.py holds the one table of kinds."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol

import torch
from pydantic import BaseModel
from torch import nn

from calib.datasets import Dataset, Split
from compress.structure import Structure

if TYPE_CHECKING:
    from compress.train import TrainEnv


@dataclass
class StageResult:
    """What a stage returns; the pipeline saves it (weights, structure.json, metrics.json)."""
    model: nn.Module
    structure: Structure
    """how to rebuild `model` from its factory"""
    history: list[dict] = field(default_factory=list)
    """one row per training epoch (losses, accuracies, seconds)"""
    metrics: dict[str, Any] = field(default_factory=dict)
    """the stage's own numbers, merged into its metrics.json row"""
    float_model: Optional[nn.Module] = None
    """the float model whose MACs stand for `model` when the op counter cannot see its layers
    (brevitas); None: `model` itself"""
    test_logits: Any = None
    """logits of `model` on the test split when the stage computed them anyway (a PTQ-only
    quantize stage): the pipeline scores the stage from them instead of a second pass"""


@dataclass
class RunContext:
    """What a stage may use. Stages never touch backends or the run layout: latency and model
    statistics come as services (compress.measure)."""
    data: Dataset
    calib: Split
    teacher: Optional[nn.Module]
    device: torch.device
    run_dir: Path
    log: Callable[[str], None]
    seed: int
    batch_size: int
    structure: Structure
    """the structure of the model entering the stage (read it; return a new one)"""
    latency: Any = None
    """compress.measure.LatencyService: check(backend, where), session(backend, threads, x)"""
    model_stats: Optional[Callable[..., dict]] = None
    """compress.measure.model_stats(model, float_model, input_shape) -> {params, macs}"""
    where: str = "stage"
    """the config path of the stage (stages.N), for error messages"""
    eval_each_epoch: bool = True
    teacher_key: str = "teacher"  # identity hash of the teacher(s): keys the output cache
    data_key: str = "data"
    task: Any = None
    """compress.tasks.Task: supervised loss, metrics (None: classification)"""

    def calib_batches(self, n: int):
        """(model input, labels) of the first n batches of the calibration subset, in a fixed
        order: what every calibration-time measurement (quantizer ranges, importance scores,
        block distortion, sensitivity) runs on."""
        from compress.loader import eval_loader
        for _, (x, y, _) in zip(range(n), eval_loader(self.calib, self.batch_size)):
            yield self.data.normalize(x), y

    def train_env(self, desc: str, **changes) -> "TrainEnv":
        """What every stage passes to the one training loop; `changes` replace fields."""
        from compress.prune.sparse import MaskKeeper
        from compress.train import TrainEnv
        sparse = self.structure.sparsity
        env = dict(desc=desc, teacher=self.teacher, teacher_key=self.teacher_key, cache_dir=self.run_dir / "cache",
                   data_key=self.data_key, seed=self.seed, device=self.device, log=self.log, task=self.task,
                   eval_split=self.data.test if self.eval_each_epoch else None,
                   # 2:4 layers keep their zeros through every later stage's training
                   callbacks=[MaskKeeper(list(sparse))] if sparse else [])
        return TrainEnv(self.batch_size, **{**env, **changes})


class Stage(Protocol):
    """One kind of stage. `config` is its pydantic config class, whose `kind` field is a
    Literal of the kind it is registered under."""
    config: ClassVar[type[BaseModel]]
    calibrates: ClassVar[bool]
    """True: the stage calibrates on ctx.calib, so its resume hash covers data.calibration,
    and with data.calibration: synthetic ctx.calib holds the synthesized images"""

    def check(self, model: nn.Module, ctx: RunContext, cfg: Any) -> None:
        """Everything that can fail before training (names, shapes, backends): raise a
        UserError naming ctx.where and the field."""

    def run(self, model: nn.Module, ctx: RunContext, cfg: Any) -> StageResult:
        """Transform `model` (a copy the stage owns) and return the result."""
