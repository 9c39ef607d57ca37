"""The one training loop. Teacher training, distillation, pruning recovery and
quantization-aware distillation all call `fit` with their own `TrainConfig` and a `TrainEnv`
(what the run provides: device, seed, teacher, cache, logging; RunContext.train_env builds
it); what differs is the objective: weighted logit terms (compress.distill.objectives) plus
optional feature terms (compress.distill.features), with teacher outputs live or cached.

The loop is a DataLoader (compress.loader; the sampler is swappable) feeding `TrainStep`;
everything that is not training is a callback (compress.callbacks).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from calib.datasets import Dataset, Split
from compress import batchnorm, distributed, train_state
from compress.callbacks import EpochLog, Evaluate, History, LoopState, ProgressBar, SamplerEpoch, StepResult, notify
from compress.distill.cache import PAD, shift_flip
from compress.distill.features import FeatureTerm
from compress.distill.objectives import CE, NEEDS_TEACHER, LogitTerm, Objective
from compress.distill.teacher import TeacherSource, feature_distiller, teacher_source
from compress.errors import UserError
from compress.loader import SamplerFactory, SeededPermutation, calls, eval_loader, train_loader
from compress.tasks import Task, get_task


class TrainConfig(BaseModel):
    """Fields shared by every stage that trains; stage configs extend it."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    epochs: float = Field(1, ge=0, description="passes over the training split (fractions allowed, e.g. 0.5)")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd (momentum, nesterov)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate; cosine decay to 0 over the stage")
    weight_decay: float = Field(5e-4, ge=0, description="decoupled (adamw) or L2 (sgd) weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd momentum")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up before the cosine decay")
    loss: list[LogitTerm] = Field(default_factory=lambda: [CE()])
    """logit terms, each {kind, weight, ...}: ce, mse, l1 (labels); kl, reverse_kl, js, mse_logits, l1_logits, cakld,
    taid, dist, dkd (teacher); which apply depends on the task (compress/tasks.py)"""
    features: list[FeatureTerm] = Field(default_factory=list)
    """feature terms {student, teacher, kind: hint|attention|normalized, weight} by module name"""
    cache: Literal["none", "full", "topk", "sampled", "augmented"] = "none"
    """teacher-output cache: none | full (fp16 logits) | topk | sampled (k classes, unbiased weights) |
    augmented (cache_views random shift/flip views per image with the teacher's targets on each; one per epoch)"""
    cache_k: int = Field(8, ge=1, description="classes kept per example by the topk / sampled caches")
    cache_views: int = Field(8, ge=1, description="augmented: views stored per image (R); epoch e replays view "
                                                  "(e + index) mod R; building costs R teacher passes")
    cache_targets: Literal["full", "topk", "sampled"] = "topk"
    """augmented: what each view keeps: full (fp16 logits), topk or sampled (cache_k classes)"""
    ensemble: Literal["probs", "logits"] = "probs"
    """how several teachers combine: average softmax probabilities (MEAL V2) or logits"""
    augment: bool = Field(True, description="random 2-px shift crops + horizontal flips")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="autocast dtype; auto = bf16 where the CPU/GPU has native bf16")
    channels_last: bool = Field(True, description="NHWC memory format while training (faster with bf16 on CPU)")
    bn_refresh: Literal["auto", "always", "never"] = "auto"
    """re-estimate BatchNorm running statistics on 32 fixed training batches after each epoch; auto: only
    where a BatchNorm's momentum is below 0.1 (torchvision MobileNetV3: 0.01), whose statistics lag the weights"""

    @model_validator(mode="after")
    def _cache_rules(self):
        if self.cache == "none" or not self.needs_teacher:
            return self
        if self.augment and self.cache != "augmented":
            raise ValueError(f"cache: {self.cache} holds teacher outputs of the un-augmented images; with "
                             f"augment: true they would be stale. Set cache: augmented (stored augmented views), "
                             f"augment: false, or cache: none")
        if not self.augment and self.cache == "augmented":
            raise ValueError("cache: augmented replays stored augmented views; with augment: false use cache: "
                             "full, topk or sampled")
        if self.features:
            raise ValueError(f"cache: {self.cache} skips the teacher's forward pass, which the "
                             f"feature terms need. Set cache: none")
        augmented = self.cache == "augmented"
        form, key = (self.cache_targets, "cache_targets") if augmented else (self.cache, "cache")
        if form in ("topk", "sampled"):
            what = f"cache: {self.cache}" + (f" with cache_targets: {form}" if augmented else "")
            kinds = {t.kind for t in self.loss} - {"ce", "kl"}
            if kinds:
                raise ValueError(f"{what} keeps {self.cache_k} probabilities per example; "
                                 f"{sorted(kinds)} need full logits (use {key}: full)")
            if len({t.temperature for t in self.loss if t.kind == "kl"}) > 1:
                raise ValueError(f"{what} is built at one temperature; the kl terms use several")
        return self

    @property
    def replays_views(self) -> bool:
        """The augmented cache makes the student's augmented input (else augment_batch draws it)."""
        return self.cache == "augmented" and self.needs_teacher

    @property
    def needs_teacher(self) -> bool:
        return bool(self.features) or any(t.kind in NEEDS_TEACHER for t in self.loss)

    def kd_temperature(self) -> float:
        return next((t.temperature for t in self.loss if t.kind == "kl"), 1.0)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # Measured on this project's CPU (AVX512-BF16): 2.7x faster steps than fp32.
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = PAD) -> torch.Tensor:
    n = x.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    return shift_flip(x, dy, dx, flip, pad)


@dataclass
class TrainEnv:
    """What the run gives a stage's training, besides the model, the data and the TrainConfig."""
    batch_size: int
    desc: str = "train"
    """names the run in the progress bar and the log lines"""
    teacher: Optional[nn.Module] = None
    """the teacher (or an Ensemble of teachers) the objective's teacher terms distill from"""
    teacher_key: str = "teacher"
    """identity hash of the teacher(s): part of the teacher-output cache's file name"""
    cache_dir: Optional[Path] = None
    """where the teacher-output cache lives (the run's cache/); the working directory if None"""
    data_key: str = "data"
    """identity of the training data: part of the cache's file name"""
    seed: int = 0
    """seeds torch (feature adapters' init) and the generator of shuffling and augmentation"""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    log: Callable[[str], None] = print
    eval_split: Optional[Split] = None
    """evaluated after every epoch (val_accuracy in the history rows) when given"""
    sampler: SamplerFactory = SeededPermutation
    """(number of training examples, the seeded generator) -> the Sampler of an epoch's order;
    torch's DistributedSampler fits here (its set_epoch is called at each epoch)"""
    task: Optional[Task] = None
    """the run's task (compress/tasks.py): supervised loss and metrics; None: classification"""
    callbacks: list = field(default_factory=list)
    """the run's callbacks (e.g. compress.prune.sparse.MaskKeeper): after the history row is
    made, before the progress bar, evaluation and log line"""


@torch.no_grad()
def predict(model: nn.Module, split: Split, data: Dataset, batch_size: int = 512,
            device: torch.device = torch.device("cpu")) -> np.ndarray:
    """fp32 logits of a torch model on a split (the reference every backend is held to);
    a brevitas model through its cached-quantizer twin (compress/quantize/inference.py)."""
    from compress.quantize.inference import inference_twin
    model.eval()
    outs, run = [], None
    for x, _, _ in eval_loader(split, batch_size):
        for part in calls(data.normalize(x).to(device)):
            if run is None:
                run = inference_twin(model, part)
            outs.append(run(part).float().cpu())
    return torch.cat(outs).numpy()


def accuracy(logits: np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    return float((logits.argmax(1) == np.asarray(labels)).mean())


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


@dataclass
class TrainStep:
    """One optimizer step on one batch: forward under autocast, the teacher's outputs (live
    or cached), the objective, backward, the optimizer step at the scheduled lr."""
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    teacher: Optional[TeacherSource]
    normalize: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    fmt: torch.memory_format
    amp: Optional[torch.dtype]
    lr: Callable[[int], float]
    total: int
    shared: list = field(default_factory=list)
    """trained parameters outside `model` (feature adapters): their gradients are averaged
    over the ranks by hand, as DDP averages the model's"""

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], step: int) -> StepResult:
        xb, yb, idx = batch
        x = self.normalize(xb).to(self.device).contiguous(memory_format=self.fmt)
        y = yb.to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.model(x)
            t_out = None if self.teacher is None else self.teacher(x, idx)
            loss, parts = self.objective(out.float(), t_out, y, step / self.total)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_grads(self.shared)
        self.optimizer.step()
        return StepResult(loss.detach(), parts, out.detach(), y)


def run_loop(state: LoopState, loader: Iterable, step: Callable[..., StepResult], callbacks: list) -> None:
    """Epochs over `loader` until `state.total` optimizer steps; the rest is callbacks."""
    try:
        notify(callbacks, "on_train_start", state)
        while state.step < state.total:
            state.model.train()
            notify(callbacks, "on_epoch_start", state)
            for batch in itertools.islice(loader, state.total - state.step):
                state.result = step(batch, state.step)
                state.step += 1
                notify(callbacks, "on_step_end", state)
            notify(callbacks, "on_epoch_end", state)
            state.epoch += 1
    finally:
        notify(callbacks, "on_train_end", state)


def _bn_refresh(model: nn.Module, data: Dataset, cfg: TrainConfig, env: TrainEnv) -> list:
    """After the masks are applied and before evaluation (compress/batchnorm.py says why)."""
    if cfg.bn_refresh == "never" or (cfg.bn_refresh == "auto" and not batchnorm.slow(model)):
        return []
    return [batchnorm.BatchNormRefresh(batchnorm.refresh_batches(
        data.train.images, data.normalize, env.batch_size, 32, env.seed), env.device)]


def _reporting(data: Dataset, env: TrainEnv, history: History) -> list:
    """Progress bar, per-epoch evaluation (the task's primary metric), the epoch log line:
    after the run's callbacks, so they report the model as those left it (2:4 masks applied)."""
    out: list = [ProgressBar(env.desc, history)]
    task, key = history.task, f"val_{history.task.primary}"
    if env.eval_split is not None:
        split = env.eval_split
        out.append(Evaluate(lambda m: task.score(predict(m, split, data, device=env.device), split.labels), key))
    return out + [EpochLog(env.desc, history, env.log, key)]


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, env: TrainEnv) -> list[dict]:
    """Train `model` in place; returns one row per epoch (each loss term, the task's train/val metric)."""
    if cfg.needs_teacher and env.teacher is None:
        raise UserError(f"{env.desc}: the loss uses a teacher ({[t.kind for t in cfg.loss]}, "
                        f"{len(cfg.features)} feature terms) but none is available")
    torch.manual_seed(env.seed)
    # shuffling, then each batch's augmentation; under torchrun each rank augments its own shard
    g = torch.Generator().manual_seed(env.seed + distributed.rank())
    batch_size, make_sampler = env.batch_size, env.sampler
    if distributed.active():  # each rank: its shard of the epoch, its share of the (global) batch
        batch_size, make_sampler = distributed.local_batch(batch_size, env.desc), distributed.sampler_factory(env.seed)
    sampler = train_state.ResumableSampler(make_sampler(len(data.train), g))  # its position goes into checkpoints
    live_augment = cfg.augment and not cfg.replays_views
    loader = train_loader(data.train, batch_size, sampler, partial(augment_batch, g=g) if live_augment else None)
    if len(loader) == 0:
        raise UserError(f"{env.desc}: batch_size={env.batch_size} exceeds the {len(data.train)} training examples")
    total = max(1, round(cfg.epochs * len(loader)))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    amp = autocast_dtype(cfg, env.device)
    teacher = teacher_source(cfg, env, data, fmt, amp)
    if cfg.replays_views:  # the augmented cache's stored views stand in for augment_batch
        loader = teacher.replayed(loader)
    features = feature_distiller(cfg, model, env.teacher, data, env.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if features is not None:  # adapters train with the student, and are dropped after
        params += list(features.adapters.parameters())
    objective = Objective(cfg.loss, features, env.task)
    step = TrainStep(model, objective, make_optimizer(params, cfg), teacher, data.normalize, env.device, fmt, amp,
                     partial(lr_at, total=total, warmup=round(cfg.warmup_epochs * len(loader)), peak=cfg.lr), total)
    history = History(get_task(env.task))
    # history first: it records each step as computed, and starts the epoch's row
    callbacks = [history, *env.callbacks, teacher, *([SamplerEpoch(sampler)] if hasattr(sampler, "set_epoch") else []),
                 *_bn_refresh(model, data, cfg, env), *_reporting(data, env, history)]
    callbacks += train_state.callbacks(step, g, sampler, history, callbacks)  # resume inside a stage
    state, t0 = LoopState(model, total, len(loader)), time.time()
    model.to(device=env.device, memory_format=fmt)
    step.model = distributed.wrap_ddp(model, env.device)  # the callbacks keep the bare model
    step.shared = list(features.adapters.parameters()) if features is not None else []
    try:
        run_loop(state, loader, step, callbacks)
        distributed.sync_from_main(model)  # BatchNorm statistics differ by rank after DDP: rank 0's
    finally:
        if features is not None:
            features.close()  # hooks must not outlive the stage (they would leak into export)
        model.to(memory_format=torch.contiguous_format)
    env.log(f"  {env.desc}: {state.step} steps in {time.time() - t0:.0f}s")
    return history.rows
