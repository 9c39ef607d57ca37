"""What the training loop calls besides the step: everything that is not training (2:4 mask
keeping, teacher outputs' setup, progress, history rows, evaluation, the epoch log line).

A callback is any object with some of the hooks of `Callback`; `notify` skips the hooks an
object does not define, so none needs a base class. Callbacks run in list order; `fit` puts
History first, then the run's own (mask keeping), then the ones that report on the model."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from torch import nn

HOOKS = ("on_train_start", "on_epoch_start", "on_step_end", "on_epoch_end", "on_train_end")


@dataclass
class StepResult:
    """What one optimizer step computed (detached): the reporting callbacks read it."""
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # each loss term by name
    out: torch.Tensor  # the student's outputs on the batch
    y: torch.Tensor


@dataclass
class LoopState:
    model: nn.Module
    total: int  # optimizer steps of the whole run
    steps_per_epoch: int
    step: int = 0  # optimizer steps done
    epoch: int = 0  # index of the current epoch, from 0
    result: Optional[StepResult] = None  # the last step's
    row: dict = field(default_factory=dict)  # the ended epoch's row; on_epoch_end callbacks add to it

    @property
    def n_epochs(self) -> int:
        return math.ceil(self.total / self.steps_per_epoch)


class Callback(Protocol):
    """The hooks, each called with the loop's state; define only those you need."""

    def on_train_start(self, state: LoopState) -> None: ...
    def on_epoch_start(self, state: LoopState) -> None: ...
    def on_step_end(self, state: LoopState) -> None: ...
    def on_epoch_end(self, state: LoopState) -> None: ...
    def on_train_end(self, state: LoopState) -> None: ...  # also after an exception


def notify(callbacks: list, hook: str, state: LoopState) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(state)


class History:
    """One row per epoch: the mean of the loss and of each term, the task's training metric
    (train_accuracy for classification; compress/tasks.py), seconds."""

    def __init__(self, task=None):
        from compress.tasks import get_task
        self.rows: list[dict] = []
        self.task = get_task(task)

    def on_epoch_start(self, state: LoopState) -> None:
        self.sums: dict[str, float] = {"loss": 0.0}
        self.n = self.correct = self.seen = 0
        self.t0 = time.time()

    def train_value(self) -> float:
        return self.task.train_value(self.correct, self.seen)

    def on_step_end(self, state: LoopState) -> None:
        r = state.result
        self.n += 1
        self.sums["loss"] += float(r.loss)
        for k, v in r.parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        num, den = self.task.train_stat(r.out, r.y)
        self.correct += num
        self.seen += den

    def _reduce(self) -> None:
        """Under torchrun: the epoch's sums over every rank's shard (a no-op in one process)."""
        from compress import distributed
        if not distributed.active():
            return
        # every rank made the same self.n steps (equal shards): the loss sums' mean over the
        # ranks, divided by n, is the mean over every batch; n stays the optimizer's steps
        tot = distributed.all_reduce_sums({**{f"sum/{k}": v for k, v in self.sums.items()},
                                           "correct": self.correct, "seen": self.seen})
        self.sums = {k: tot[f"sum/{k}"] / distributed.world_size() for k in self.sums}
        self.correct, self.seen = tot["correct"], tot["seen"]

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.n) for k, v in self.sums.items()}

    def on_epoch_end(self, state: LoopState) -> None:
        self._reduce()
        state.row = {"epoch": state.epoch + 1, "steps": self.n, **self.means(),
                     self.task.train_key: self.train_value(), "seconds": time.time() - self.t0}
        self.rows.append(state.row)


class Evaluate:
    """Adds `key` (val_<the task's primary metric>) to each epoch's row (`score` puts the
    model in eval mode)."""

    def __init__(self, score: Callable[[nn.Module], float], key: str = "val_accuracy"):
        self.score, self.key = score, key

    def on_epoch_end(self, state: LoopState) -> None:
        from compress import distributed  # every rank holds the same model: rank 0 scores it
        state.row[self.key] = distributed.on_main(lambda: self.score(state.model))


class EpochLog:
    """One line per epoch (CI logs get these and no progress bar)."""

    def __init__(self, desc: str, history: History, log: Callable[[str], None], val_key: str = "val_accuracy"):
        self.desc, self.history, self.log, self.val_key = desc, history, log, val_key

    def on_epoch_end(self, state: LoopState) -> None:
        row, task = state.row, self.history.task
        terms = ", ".join(f"{k} {v:.4f}" for k, v in self.history.means().items() if k != "loss")
        # rich redirects stdout while the bar is live, so plain logging stays readable
        self.log(f"  {self.desc} epoch {row['epoch']}: loss {row['loss']:.4f} ({terms}) "
                 f"{task.train_label} {row[task.train_key]:.4f}"
                 + (f" {task.val_label} {row[self.val_key]:.4f}" if self.val_key in row else "")
                 + f" [{row['seconds']:.0f}s]")


class ProgressBar:
    """A rich progress bar on a terminal; silent otherwise."""

    def __init__(self, desc: str, history: History):
        self.desc, self.history, self.bar = desc, history, None

    def on_train_start(self, state: LoopState) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        console = Console(stderr=True)
        self.bar = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            console=console, transient=True, disable=not console.is_terminal or not _main())
        self.bar.start()
        self.task = self.bar.add_task(self.desc, total=state.total, info="")

    def on_step_end(self, state: LoopState) -> None:
        h = self.history
        self.bar.update(self.task, advance=1, info=f"epoch {state.epoch + 1}/{state.n_epochs} loss "
                        f"{h.sums['loss'] / h.n:.4f} {h.task.train_label.removeprefix('train ')} {h.train_value():.4f}")

    def on_train_end(self, state: LoopState) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _main() -> bool:
    from compress import distributed
    return distributed.is_main()


class SamplerEpoch:
    """Tells a sampler with `set_epoch` (torch's DistributedSampler) which epoch starts, so
    each epoch gets its own shuffle."""

    def __init__(self, sampler):
        self.sampler = sampler

    def on_epoch_start(self, state: LoopState) -> None:
        self.sampler.set_epoch(state.epoch)
