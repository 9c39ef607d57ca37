"""Resume inside a training stage: checkpoints of the whole training state, and SIGINT/SIGTERM.

The pipeline opens `stage_checkpoints(stage dir, config hash)` around a stage; every `fit` inside
it then gets a `TrainCheckpoint` callback (the k-th fit of the stage writes <stage dir>/.resume/
fit-k.pt). A checkpoint holds everything the next step depends on, so a resumed run continues
bit for bit: model, optimizer, the objective's state (TAID's t, CAKLD's gamma), feature adapters,
the 2:4 masks, the generator of shuffling and augmentation, torch/numpy/python RNGs, the history
rows, and the rest of the epoch's example order (`ResumableSampler`). The learning rate is a pure
function of the step (train.lr_at) and bf16 autocast needs no grad scaler, so neither is stored.
Quantization-aware training adds its quantizers' state outside state_dict and loads without
re-creating them (compress/quantize/resume.py says what and why). Under torchrun each rank
writes its own part (`TrainCheckpoint`); a SIGINT/SIGTERM (torchrun forwards it to every rank)
stops all ranks after the same step.
A fit that finished keeps its last checkpoint: a stage with several fits (pruning recovery
rounds) replays the finished ones from their final state. Files are torch.save'd tensors and
plain containers, loaded with weights_only=True; a checkpoint that cannot be read or does not fit
is ignored with one line saying why.
"""
from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

from compress import distributed
from compress.checkpoint import atomic_write, load_into, write_json

FORMAT = 1
RESUME_DIR = ".resume"


class ResumableSampler(Sampler[int]):
    """Wraps the loop's sampler: remembers the epoch's order and how much of it was handed out,
    and after a resume hands out the saved rest of the interrupted epoch instead of drawing."""

    def __init__(self, inner):
        self.inner, self.order, self.used, self.pending = inner, [], 0, None

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):  # set_epoch of a DistributedSampler, if the inner one has it
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __iter__(self):
        # listing the order at once draws what the inner sampler draws at its first index
        self.order, self.pending = (self.pending, None) if self.pending is not None else (list(self.inner), None)
        self.used = 0
        for i in self.order:
            self.used += 1
            yield i

    def rest(self) -> list[int]:
        return self.order[self.used:]


class _Scope:
    """What the pipeline opened: the stage's checkpoint folder, its hash, how many fits began."""

    def __init__(self, folder: Path, h: str, name: str, log: Callable[[str], None], every_steps: int = 0):
        self.folder, self.h, self.name, self.log, self.every_steps = folder, h, name, log, every_steps
        self.fits = 0
        self.signal: Optional[int] = None  # set by the handler, acted on after the current step
        self.training = False


_scope: Optional[_Scope] = None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      *np_state[2:]],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# each rank's own part: TAID's t follows that rank's loss; the generator, RNGs, the rest of the
# epoch's order and the partial sums are its shard's. The rest (model, optimizer, adapters, masks,
# history rows, quantizers) is the same on every rank, and rank 0 writes it
OWN = ("objective", "generator", "rng", "order", "sums")


class TrainCheckpoint:
    """The callback: restores in on_train_start, writes at every epoch's end (and every
    `every_steps` steps, and when a signal asks the run to stop). Under torchrun every rank r > 0
    writes its own part to fit-k.rank<r>.step<s>.pt, then rank 0 writes fit-k.pt, which commits
    step s; older parts go after that."""

    def __init__(self, scope: _Scope, index: int, step, generator: torch.Generator, sampler: ResumableSampler,
                 history, callbacks: list):
        from compress.quantize import resume as qat
        self.scope, self.step, self.g, self.sampler, self.history = scope, step, generator, sampler, history
        self.index, self.path = index, scope.folder / f"fit-{index}.pt"
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.keepers = [c for c in callbacks if hasattr(c, "masks") and hasattr(c, "modules")]  # MaskKeeper
        self.qat = qat if qat.is_quantized(step.model) else None  # brevitas: state outside state_dict
        self.sums: Optional[dict] = None

    def _adapters(self):
        f = self.step.objective.features
        return None if f is None else f.adapters

    def _head(self, loop, ended: bool) -> dict:
        return {"format": FORMAT, "hash": self.scope.h, "step": loop.step, "epoch": loop.epoch + ended,
                "total": loop.total, "steps_per_epoch": loop.steps_per_epoch, "world": self.world}

    def _own(self, ended: bool) -> dict:
        """`ended`: at an epoch's end (the next starts afresh); else inside one, whose rest of the
        example order and partial sums are kept."""
        h, mid = self.history, None if ended else self.sampler.rest()
        return {"objective": self.step.objective.states, "generator": self.g.get_state(), "rng": _rng_state(),
                "order": None if mid is None else torch.tensor(mid, dtype=torch.int64),
                "sums": None if mid is None else {"sums": h.sums, "n": h.n, "correct": h.correct, "seen": h.seen}}

    def _quant(self, model) -> Optional[dict]:
        return None if self.qat is None else {"runtime": self.qat.runtime_state(model),
                                              "signature": self.qat.signature(model)}

    def state(self, loop, ended: bool) -> dict:
        """fit-k.pt: the whole state in one process; under torchrun the shared part and rank 0's own."""
        adapters = self._adapters()
        return {**self._head(loop, ended), "model": loop.model.state_dict(),
                "optimizer": self.step.optimizer.state_dict(),
                "adapters": None if adapters is None else adapters.state_dict(),
                "masks": [k.masks for k in self.keepers], "rows": self.history.rows, "quant": self._quant(loop.model),
                **self._own(ended)}

    def _part(self, step: int) -> Path:
        return self.scope.folder / f"fit-{self.index}.rank{self.rank}.step{step}.pt"

    def save(self, loop, ended: bool = False) -> None:
        if self.world > 1 and self.rank > 0:
            part = {**self._head(loop, ended), **self._own(ended)}
            atomic_write(self._part(loop.step), lambda p: torch.save(part, p))
        distributed.barrier()  # every rank's part is on disk before rank 0 commits the step
        if self.rank == 0:
            state = self.state(loop, ended)
            atomic_write(self.path, lambda p: torch.save(state, p))
        distributed.barrier()  # committed: a rank's older parts can go
        if self.rank > 0:
            for old in self.scope.folder.glob(f"fit-{self.index}.rank{self.rank}.step*.pt"):
                if old != self._part(loop.step):
                    old.unlink(missing_ok=True)

    def _read(self, path: Path, loop) -> Optional[dict]:
        if not path.is_file():
            return None
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or hand-edited: never trusted, never a traceback
            self.scope.log(f"[{self.scope.name}] ignoring {path.name}: unreadable ({type(e).__name__})")
            return None
        fits = (isinstance(ck, dict) and ck.get("format") == FORMAT and ck.get("hash") == self.scope.h
                and ck.get("total") == loop.total and ck.get("steps_per_epoch") == loop.steps_per_epoch)
        if not fits:
            self.scope.log(f"[{self.scope.name}] ignoring {path.name}: made by other settings")
        return ck if fits else None

    def _other_world(self, ck: dict) -> Optional[dict]:
        """Written by another number of processes: the shards differ, so only an epoch's end (the
        next epoch's order is drawn afresh) can be resumed; each rank keeps the generator and RNGs
        the fit seeded, and takes rank 0's objective state."""
        n = ck.get("world", 1)
        if ck["order"] is not None:
            self.scope.log(f"[{self.scope.name}] ignoring {self.path.name}: written by {n} process(es) inside an "
                           f"epoch, now {self.world}: the fit starts afresh")
            return None
        self.scope.log(f"[{self.scope.name}] {self.path.name} was written by {n} process(es), now {self.world}: "
                       f"resuming at its epoch boundary (shuffling and augmentation differ from an uninterrupted run)")
        return {k: v for k, v in ck.items() if k not in ("generator", "rng")}

    def _agree(self, loop, ck: Optional[dict]) -> Optional[dict]:
        """Rank 0's checkpoint and each rank's own part of the same step, on every rank; or None on
        every rank (one of them lacks its part: a kill between the parts and the commit)."""
        if self.world == 1:
            return ck if ck is None or ck.get("world", 1) == 1 else self._other_world(ck)
        head = distributed.broadcast_object(None if ck is None else {"step": ck["step"], "world": ck.get("world", 1)})
        if head is None:
            return None
        if head["world"] != self.world:
            return distributed.broadcast_object(None if ck is None else self._other_world(ck))
        own = ck if self.rank == 0 else self._read(self._part(head["step"]), loop)
        ok = distributed.gather_object(own is not None and own["step"] == head["step"])
        if not all(ok):
            missing = [r for r, o in enumerate(ok) if not o]
            self.scope.log(f"[{self.scope.name}] ignoring {self.path.name}: rank(s) {missing} have no part of step "
                           f"{head['step']}; the fit starts afresh")
            return None
        base = distributed.broadcast_object(None if ck is None else {k: v for k, v in ck.items() if k not in OWN})
        return {**base, **{k: own[k] for k in OWN}}

    def on_train_start(self, loop) -> None:
        self.scope.training = True
        ck = self._agree(loop, self._read(self.path, loop) if self.rank == 0 else None)
        if ck is None:
            return
        backup = copy.deepcopy({"model": loop.model.state_dict(), "optimizer": self.step.optimizer.state_dict(),
                                "objective": self.step.objective.states, "quant": self._quant(loop.model)})
        try:
            self._restore(loop, ck)
            error = ""
        except Exception as e:  # a checkpoint of another model
            error = str(e)[:120] or type(e).__name__
        if distributed.all_true(not error):
            self.scope.log(f"[{self.scope.name}] resuming at step {loop.step}/{loop.total} (epoch {loop.epoch + 1}) "
                           f"from {self.path}")
            return
        # start the fit afresh, on every rank if one failed
        self._load_model(loop.model, backup["model"], backup["quant"])
        self.step.optimizer.load_state_dict(backup["optimizer"])
        for mine, saved in zip(self.step.objective.states, backup["objective"]):
            mine.clear()
            mine.update(saved)
        self.history.rows[:] = []
        self.sampler.pending, self.sums = None, None
        loop.step = loop.epoch = 0
        self.scope.log(f"[{self.scope.name}] ignoring {self.path.name}: does not fit ({error or 'on another rank'})")

    def _load_model(self, model, state: dict, quant: Optional[dict]) -> None:
        if self.qat is None:
            load_into(model, state, str(self.path))
            return
        if quant is None or quant["signature"] != self.qat.signature(model):
            raise ValueError("another quantized structure (quant layers or weight bits)")
        with self.qat.loading():
            load_into(model, state, str(self.path))
        self.qat.set_runtime_state(model, quant["runtime"])

    def _restore(self, loop, ck: dict) -> None:
        self._load_model(loop.model, ck["model"], ck.get("quant"))
        self.step.optimizer.load_state_dict(ck["optimizer"])
        for mine, saved in zip(self.step.objective.states, ck["objective"]):
            mine.clear()
            mine.update(saved)
        if ck["adapters"] is not None and self._adapters() is not None:
            self._adapters().load_state_dict(ck["adapters"])
        for keeper, masks in zip(self.keepers, ck["masks"]):  # on the device the loop placed them
            keeper.masks.update({n: m.to(keeper.masks[n].device) for n, m in masks.items() if n in keeper.masks})
        if "generator" in ck:
            self.g.set_state(ck["generator"])
            _set_rng_state(ck["rng"])
        self.history.rows[:] = ck["rows"]
        loop.step, loop.epoch = ck["step"], ck["epoch"]
        if ck["order"] is not None:  # stopped inside an epoch: its rest, and its partial sums
            self.sampler.pending = ck["order"].tolist()
            self.sums = ck["sums"]

    def on_epoch_start(self, loop) -> None:
        if self.sums is not None:  # after History reset them
            h, s = self.history, self.sums
            h.sums, h.n, h.correct, h.seen = dict(s["sums"]), s["n"], s["correct"], s["seen"]
            self.sums = None

    def on_step_end(self, loop) -> None:
        scope = self.scope
        # under torchrun each rank gets the signal on its own: all stop after the same step
        sig = distributed.max_int(scope.signal or 0) if self.world > 1 else scope.signal
        if sig:
            self.save(loop)
            name = signal.Signals(sig).name
            scope.log(f"[{scope.name}] stopped by {name} after step {loop.step}/{loop.total}; checkpoint written "
                      f"to {self.path}. Run the same `compress run` command again to resume from it.")
            raise SystemExit(128 + sig)
        if scope.every_steps and loop.step % scope.every_steps == 0 and loop.step % loop.steps_per_epoch:
            self.save(loop)

    def on_epoch_end(self, loop) -> None:
        self.save(loop, ended=True)

    def on_train_end(self, loop) -> None:
        self.scope.training = False


def callbacks(step, generator: torch.Generator, sampler, history, others: list) -> list:
    """The checkpoint callback of the fit that calls this, when a stage scope is open (else none).
    Last in the loop's list: it saves the row the reporting callbacks completed."""
    if _scope is None or not isinstance(sampler, ResumableSampler):
        return []
    _scope.fits += 1
    return [TrainCheckpoint(_scope, _scope.fits - 1, step, generator, sampler, history, others)]


def _handler(signum, frame) -> None:
    if _scope is not None and _scope.training:
        if _scope.signal is None:
            _scope.log(f"[{_scope.name}] {signal.Signals(signum).name}: stopping after the current step "
                       f"(send it again to stop at once)")
            _scope.signal = signum
            return
    raise SystemExit(128 + signum) if signum != signal.SIGINT else KeyboardInterrupt


@contextlib.contextmanager
def stage_checkpoints(sdir: Path, h: str, name: str, log: Callable[[str], None], every_steps: int = 0):
    """Checkpoints for the fits of one stage, kept in <sdir>/.resume/ while they belong to hash `h`
    (a folder written for other settings is removed), and SIGINT/SIGTERM stopping after a step."""
    global _scope
    folder = sdir / RESUME_DIR
    if distributed.is_main():  # one rank settles the folder, the others wait for it
        marker = folder / "stage.json"
        try:
            same = json.loads(marker.read_text()).get("config_hash") == h
        except (OSError, ValueError, AttributeError):
            same = False
        if folder.exists() and not same:
            shutil.rmtree(folder, ignore_errors=True)
        write_json(marker, {"config_hash": h})
    distributed.barrier()
    _scope = _Scope(folder, h, name, log, every_steps)
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield _scope
    finally:
        _scope = None
        for s, handler in old.items():
            signal.signal(s, handler)


def clear(sdir: Path) -> None:
    """After the stage's metrics.json is written: its checkpoints are no longer needed."""
    shutil.rmtree(sdir / RESUME_DIR, ignore_errors=True)
