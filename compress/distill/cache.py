"""Teacher-output cache: the teacher's outputs on the training set, computed once and
stored in the run directory, so distillation epochs skip the teacher's forward pass.

full     float16 logits of every training example
topk     the k largest probabilities (at the stage's temperature) and their classes
sampled  k classes drawn with replacement from the teacher's distribution, stored with
         weights count/k: an unbiased estimate of the teacher distribution (Sparse Logit
         Sampling, Anshumann et al. 2025, arXiv:2503.16870)

The file name holds the teacher's identity hash, the data identity and the cache settings,
so a changed teacher or data set never reads a stale cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from compress import distributed
from compress.checkpoint import load_sealed_tensors, save_sealed_tensors


@dataclass
class SparseTarget:
    """A teacher distribution known on a few classes per example (probabilities sum to 1)."""
    index: torch.Tensor  # (N, k) int64
    prob: torch.Tensor   # (N, k) float32


class TeacherCache:
    """Teacher outputs by example index; a teacher source for the training step
    (compress.distill.teacher), called as `cache(x, idx)` in place of the teacher's forward."""

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor]):
        self.kind, self.t = kind, tensors

    def lookup(self, idx: torch.Tensor):
        if self.kind == "full":
            return self.t["logits"][idx].float()
        return SparseTarget(self.t["index"][idx].long(), self.t["prob"][idx].float())

    def __call__(self, x: torch.Tensor, idx: torch.Tensor):
        return self.lookup(idx)


def _index_dtype(num_classes: int) -> torch.dtype:
    """int16 halves the cache while every class id fits; past 32,767 classes they would wrap."""
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max + 1 else torch.int32


def _wrapped(tensors: dict) -> bool:
    """A cache written before int32 ids: with 32,768..65,535 classes the large ids wrapped negative."""
    index = tensors.get("index")
    return index is not None and index.dtype == torch.int16 and bool((index < 0).any())


@torch.no_grad()
def _teacher_logits(forward, data, batch_size: int, device) -> torch.Tensor:
    outs = []
    for i in range(0, len(data.train), batch_size):
        x = data.normalize(data.train.images[i:i + batch_size]).to(device)
        outs.append(forward(x).float().cpu())
    return torch.cat(outs)


def build_or_load(kind: str, k: int, temperature: float, forward, teacher_key: str,
                  data_key: str, data, cache_dir: Path, seed: int, device,
                  log=print) -> Optional[TeacherCache]:
    if kind == "none":
        return None
    suffix = "" if kind == "full" else f"-k{k}-T{temperature:g}" + (f"-s{seed}" if kind == "sampled" else "")
    path = cache_dir / f"teacher-{teacher_key}-{data_key}-{kind}{suffix}.safetensors"
    # under torchrun rank 0 builds and writes the cache; the other ranks wait, then read it
    with distributed.main_first():
        return _build_or_read(path, kind, k, temperature, forward, data, seed, device, log)


def _build_or_read(path: Path, kind: str, k: int, temperature: float, forward, data, seed: int, device,
                   log) -> TeacherCache:
    cached = load_sealed_tensors(path, log, "teacher cache") if path.is_file() else None
    if cached is not None and _wrapped(cached):
        log(f"  teacher cache: {path.name} has wrapped class ids (int16 past 32,767 classes); rebuilding")
        cached = None
    if cached is not None:
        log(f"  teacher cache: reusing {path.name}")
        return TeacherCache(kind, cached)
    logits = _teacher_logits(forward, data, 512, device)
    if kind == "full":
        tensors = {"logits": logits.half()}
    else:
        p = F.softmax(logits / temperature, 1)
        if kind == "topk":
            prob, index = p.topk(k, 1)
            prob = prob / prob.sum(1, keepdim=True)
        else:
            g = torch.Generator().manual_seed(seed)
            index = torch.multinomial(p, k, replacement=True, generator=g)
            prob = torch.full(index.shape, 1.0 / k)  # each draw carries weight 1/k
        tensors = {"index": index.to(_index_dtype(logits.shape[1])), "prob": prob.half()}
    save_sealed_tensors(path, tensors)
    log(f"  teacher cache: wrote {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
    return TeacherCache(kind, tensors)
