"""torch.distributed for the training stages: one process per device under torchrun.

`torchrun --nproc_per_node N -m compress run CONFIG` (or `compress run --nproc N`) starts N
copies of the run. Every rank trains the same model under DistributedDataParallel on its
shard of each epoch (a DistributedSampler); rank 0 alone writes artifacts, caches and the
report, and makes every decision that is measured rather than computed (latency search,
importance scores, blocks removed, mixed-precision bits), which the others receive by
broadcast. Without torchrun's variables (RANK, WORLD_SIZE) nothing here does anything: a
single process runs exactly as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from compress.errors import UserError

T = TypeVar("T")


def launched() -> bool:
    """True under torchrun (it sets WORLD_SIZE for every rank)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl on GPU, gloo on CPU) once; returns the device this
    rank trains on (cuda:LOCAL_RANK on GPU). A no-op without torchrun."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # rank 0 exports and deploys while the others wait: allow for it (default 30 min)
        minutes = float(os.environ.get("COMPRESS_DIST_TIMEOUT_MIN", "120"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=minutes))
    return device


def shutdown() -> None:
    """Leave the process group together: a rank tearing down gloo while another still
    completes its last collective aborts both ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a rank that failed: torchrun ends the others anyway
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """rank `src`'s object on every rank (pickled by torch.distributed between our own
    processes only: never from a file)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 alone; its result broadcast to every rank (the others wait)."""
    return broadcast_object(fn() if is_main() else None)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it builds a cache, writes a file); the others then run it
    and find the result on disk."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def all_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on every rank."""
    return all(gather_object(bool(flag))) if active() else bool(flag)


def gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    every: list = [None] * world_size()
    dist.all_gather_object(every, obj)
    return every


def max_int(value: int) -> int:
    """The largest of the ranks' values (signals: all ranks stop after the same step)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sums of each value over the ranks (float64 on CPU: exact for counts)."""
    if not active():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


def average_grads(params: list[nn.Parameter]) -> None:
    """Mean gradient over the ranks for parameters outside the DDP module (feature adapters)."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def structure_checksum(model: nn.Module, structure) -> str:
    """Digest of what makes the model's architecture: structure.json's content and every
    parameter and buffer's name and shape (not the values)."""
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    rec = {"structure": structure.model_dump(mode="json"), "shapes": shapes}
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def assert_same_structure(model: nn.Module, structure, where: str) -> str:
    """Every rank's structure checksum must equal rank 0's; returns it."""
    mine = structure_checksum(model, structure)
    if not active():
        return mine
    every = gather_object(mine)
    if len(set(every)) != 1:
        raise UserError(f"{where}: the ranks hold different model structures (checksums {every}); "
                        f"a decision was not broadcast from rank 0")
    return mine


def broadcast_importance(imp):
    """A torch-pruning importance whose scores are rank 0's, broadcast: every rank then
    removes the same channels. The class stays a subclass of the original (the pruner
    tests isinstance)."""
    if not active():
        return imp
    base = type(imp)

    class FromRankZero(base):
        def __call__(self, group):
            return on_main(lambda: base.__call__(self, group))

    imp.__class__ = FromRankZero
    return imp


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """The module the training step calls: DDP (its constructor copies rank 0's parameters
    and buffers to every rank) when distributed, the model itself otherwise."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def sync_from_main(model: nn.Module) -> None:
    """Every rank's parameters and buffers set to rank 0's, in place. DDP keeps the parameters
    equal but not BatchNorm's running statistics (each rank's last forward updates its own): after
    a fit, a model that teaches or trains on (the teacher, a pruning round's start) must be the one
    rank 0 saves, as it is after a resume from rank 0's checkpoint."""
    if not active():
        return
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.bool):
                dist.broadcast(t, src=0)


def sampler_factory(seed: int):
    """SamplerFactory for fit(): each rank's shard of a seeded per-epoch permutation."""
    from torch.utils.data import DistributedSampler

    def make(n: int, _g: torch.Generator):
        return DistributedSampler(range(n), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                                  drop_last=True)
    return make


def launch(cmd: list[str]) -> int:
    """Runs torchrun (`cmd`) and returns its exit code: 128 + the signal when a SIGINT/SIGTERM
    sent to us stopped it. torchrun passes the signal on to every rank, which stops after a step
    with a checkpoint (compress/train_state.py). torchrun gets it once, from us: it runs in its own
    session, out of reach of a terminal's Ctrl-C (twice would make its shutdown kill the ranks)."""
    import signal
    import subprocess
    child, got = subprocess.Popen(cmd, start_new_session=True), []

    def forward(signum, _frame):
        got.append(signum)
        child.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 128 + got[0] if got and code else code


def local_batch(batch_size: int, where: str) -> int:
    """data.batch_size is the global batch: each rank takes its share, so the optimizer sees
    the same batch and the same number of steps as one process."""
    n = world_size()
    if batch_size % n:
        raise UserError(f"{where}: data.batch_size={batch_size} is not divisible by the {n} processes")
    return batch_size // n
