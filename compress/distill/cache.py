"""Teacher-output cache: the teacher's outputs on the training set, computed once and
stored in the run directory, so distillation epochs skip the teacher's forward pass.

full       float16 logits of every training example (of every teacher of a `probs` ensemble,
           so each loss term averages them at its own temperature, as a live teacher does)
topk       the k largest probabilities (at the stage's temperature) and their classes
sampled    k classes drawn with replacement from the teacher's distribution, stored with
           weights count/k: an unbiased estimate of the teacher distribution (Sparse Logit
           Sampling, Anshumann et al. 2025, arXiv:2503.16870)
augmented  R random augmented views per example (FKD, Shen & Xing, ECCV 2022): the views'
           parameters (shift-crop offsets and flip, seeded; not the images) and the teacher's
           targets on each view (`targets`: full, topk or sampled, as above). Epoch e replays
           view (e + i) mod R of example i (`AugmentedCache`): every view once per R epochs, a
           pure function of epoch and index, so a resumed run replays what the uninterrupted
           one would. The student gets augmentation without the teacher's forward pass; the
           cache costs R teacher passes over the training set, once (under the training
           autocast and memory format, as the live teacher runs).

Size, disk and memory alike (the tensors are held as stored): per example and view, full
2C bytes (x M teachers of a probs ensemble), topk/sampled k x 4 bytes (int16 class id +
float16 probability; k x 6 past 32,768 classes), plus 3 bytes of view parameters. Per 60,000
images at R = 8, k = 8: 16.8 MB (topk/sampled, any C up to 32,768), 11.0 MB (full, C = 10);
measured: benchmarks/RESULTS.md, "Augmented teacher cache".

The file name holds the teacher's identity hash, the data identity and the cache settings
(k, T, R, seed, augmentation), so a changed teacher, data set or setting never reads a
stale cache.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from compress import distributed
from compress.checkpoint import load_sealed_tensors, save_sealed_tensors
from compress.distill.ensemble import Members
from compress.loader import calls

PAD = 2  # the loop's shift-crop: up to 2 px each way (28x28 Fashion-MNIST: 7%), then a coin-flip mirror
AUGMENT = f"shift{PAD}flip"  # names the augmentation in the augmented cache's file name


def shift_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = PAD):
    """Image i cropped at offset (dy_i, dx_i) of its zero-padded self, then mirrored where flip_i:
    what the training loop's augmentation draws (train.augment_batch) and the augmented cache replays."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy.tolist(), dx.tolist()))])
    flip = flip.bool()
    out[flip] = out[flip].flip(-1)
    return out


@dataclass
class SparseTarget:
    """A teacher distribution known on a few classes per example (probabilities sum to 1)."""
    index: torch.Tensor  # (N, k) int64
    prob: torch.Tensor   # (N, k) float32


def on_device(target, device: torch.device):
    """The cache lives in host memory (one copy for every stage); the step's targets go where
    the student's outputs are (on CUDA the objective would otherwise mix cuda and cpu tensors)."""
    if device is None:
        return target
    if isinstance(target, torch.Tensor):
        return target.to(device, non_blocking=True)
    moved = {f.name: getattr(target, f.name).to(device, non_blocking=True) for f in dataclasses.fields(target)
             if isinstance(getattr(target, f.name), torch.Tensor)}
    return dataclasses.replace(target, **moved)


class TeacherCache:
    """Teacher outputs by example index; a teacher source for the training step
    (compress.distill.teacher), called as `cache(x, idx)` in place of the teacher's forward."""

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor], temperature: float = 1.0):
        self.kind, self.t, self.temperature = kind, tensors, temperature

    def lookup(self, idx: torch.Tensor, view: Optional[torch.Tensor] = None):
        """The targets of examples `idx` (of their views `view`, in an augmented cache)."""
        def rows(name):
            return self.t[name][idx] if view is None else self.t[name][idx, view]
        if "members" in self.t:  # (n, M, C): every teacher of a probs ensemble
            return Members(rows("members").float().transpose(0, 1), self.t["weights"], self.temperature)
        if "logits" in self.t:
            return rows("logits").float()
        return SparseTarget(rows("index").long(), rows("prob").float())

    def __call__(self, x: torch.Tensor, idx: torch.Tensor):
        return on_device(self.lookup(idx), None if x is None else x.device)


class AugmentedCache(TeacherCache):
    """R stored views per example: `replay` makes the epoch's view of a batch (the loader's
    images, before normalization), `__call__` returns the teacher's targets on that view."""

    epoch = 0

    def on_epoch_start(self, state) -> None:  # after a resume: the restored epoch
        self.epoch = state.epoch

    def views(self, idx: torch.Tensor) -> torch.Tensor:
        return (self.epoch + idx) % self.t["dy"].shape[1]

    def replay(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        v = self.views(idx)
        return shift_flip(x, self.t["dy"][idx, v], self.t["dx"][idx, v], self.t["flip"][idx, v])

    def replayed(self, loader) -> Replayed:
        return Replayed(loader, self)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor):
        return on_device(self.lookup(idx, self.views(idx)), None if x is None else x.device)


class Replayed:
    """The training loader with each batch's images replaced by the epoch's stored views."""

    def __init__(self, loader, cache: AugmentedCache):
        self.loader, self.cache = loader, cache

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y, idx in self.loader:
            yield self.cache.replay(x, idx), y, idx


def _index_dtype(num_classes: int) -> torch.dtype:
    """int16 halves the cache while every class id fits; past 32,767 classes they would wrap."""
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max + 1 else torch.int32


def _wrapped(tensors: dict) -> bool:
    """A cache written before int32 ids: with 32,768..65,535 classes the large ids wrapped negative."""
    index = tensors.get("index")
    return index is not None and index.dtype == torch.int16 and bool((index < 0).any())


@torch.no_grad()
def _teacher_logits(forward, data, batch_size: int, device, view: Optional[dict] = None, amp=None,
                    fmt=torch.contiguous_format) -> torch.Tensor:
    """The teacher's outputs on the training images (on one stored view of each, if `view`)."""
    outs = []
    for i in range(0, len(data.train), batch_size):
        x = data.train.images[i:i + batch_size]
        if view is not None:
            x = shift_flip(x, *(view[k][i:i + batch_size] for k in ("dy", "dx", "flip")))
        x = data.normalize(x).to(device).contiguous(memory_format=fmt)
        with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
            outs.extend(forward(part).float().cpu() for part in calls(x))
    return torch.cat(outs)


def _encode(logits: torch.Tensor, kind: str, k: int, temperature: float, g: torch.Generator,
            weights: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One set of teacher outputs (N, C) (or (N, M, C), every teacher when `weights`) as stored."""
    if kind == "full":
        if weights is not None:
            return {"members": logits.half(), "weights": weights.float().cpu()}
        return {"logits": logits.half()}
    p = F.softmax(logits / temperature, 1)
    if kind == "topk":
        prob, index = p.topk(k, 1)
        prob = prob / prob.sum(1, keepdim=True)
    else:
        index = torch.multinomial(p, k, replacement=True, generator=g)
        prob = torch.full(index.shape, 1.0 / k)  # each draw carries weight 1/k
    return {"index": index.to(_index_dtype(logits.shape[1])), "prob": prob.half()}


def draw_views(n: int, r: int, seed: int, pad: int = PAD) -> dict[str, torch.Tensor]:
    """R seeded views of n examples: crop offsets in [0, 2 pad] and flips, as augment_batch draws them."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randint(0, 2 * pad + 1, (n, r), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n, r), generator=g)
    flip = torch.rand(n, r, generator=g) < 0.5
    return {"dy": dy.to(torch.uint8), "dx": dx.to(torch.uint8), "flip": flip.to(torch.uint8)}


def cache_name(kind: str, k: int, temperature: float, teacher_key: str, data_key: str, seed: int,
               views: int = 8, targets: str = "topk") -> str:
    if kind == "augmented":
        sparse = "" if targets == "full" else f"-k{k}-T{temperature:g}"
        return f"teacher-{teacher_key}-{data_key}-augmented-{targets}{sparse}-r{views}-s{seed}-{AUGMENT}.safetensors"
    suffix = "" if kind == "full" else f"-k{k}-T{temperature:g}" + (f"-s{seed}" if kind == "sampled" else "")
    return f"teacher-{teacher_key}-{data_key}-{kind}{suffix}.safetensors"


def build_or_load(kind: str, k: int, temperature: float, forward, teacher_key: str,
                  data_key: str, data, cache_dir: Path, seed: int, device,
                  log=print, *, views: int = 8, targets: str = "topk", weights: Optional[torch.Tensor] = None,
                  amp: Optional[torch.dtype] = None, fmt=torch.contiguous_format) -> Optional[TeacherCache]:
    """The cache of `kind`, read from cache_dir or built there. `forward(x)` gives (N, C) logits, or
    (N, M, C) with `weights` (M,): every teacher of a probs ensemble (stored for kind/targets full).
    augmented: `views` (R) views, `targets` stored per view, built under `amp` and `fmt`."""
    if kind == "none":
        return None
    path = cache_dir / cache_name(kind, k, temperature, teacher_key, data_key, seed, views, targets)
    # under torchrun rank 0 builds and writes the cache; the other ranks wait, then read it
    with distributed.main_first():
        cached = _read(path, log)
        if cached is None:
            if kind == "augmented":
                cached = _build_augmented(views, targets, k, temperature, forward, data, seed, device, weights, amp,
                                          fmt)
            else:
                logits = _teacher_logits(forward, data, 512, device)
                cached = _encode(logits, kind, k, temperature, torch.Generator().manual_seed(seed), weights)
            save_sealed_tensors(path, cached)
            log(f"  teacher cache: wrote {path.name} ({path.stat().st_size / 1e6:.1f} MB)")
    return (AugmentedCache if kind == "augmented" else TeacherCache)(kind, cached, temperature)


def _read(path: Path, log) -> Optional[dict[str, torch.Tensor]]:
    cached = load_sealed_tensors(path, log, "teacher cache") if path.is_file() else None
    if cached is not None and _wrapped(cached):
        log(f"  teacher cache: {path.name} has wrapped class ids (int16 past 32,767 classes); rebuilding")
        cached = None
    if cached is not None:
        log(f"  teacher cache: reusing {path.name}")
    return cached


def _build_augmented(r: int, targets: str, k: int, temperature: float, forward, data, seed: int, device,
                     weights, amp, fmt) -> dict[str, torch.Tensor]:
    """R passes of the teacher, one per view; the views stacked on dim 1 of every stored tensor."""
    view = draw_views(len(data.train), r, seed)
    g = torch.Generator().manual_seed(seed + 1)  # sampled targets' draws, view after view
    per_view = []
    for j in range(r):
        one = {name: v[:, j] for name, v in view.items()}
        per_view.append(_encode(_teacher_logits(forward, data, 512, device, one, amp, fmt), targets, k,
                                temperature, g, weights))
    out = {name: torch.stack([p[name] for p in per_view], 1) for name in per_view[0] if name != "weights"}
    if "weights" in per_view[0]:  # one per teacher, not per view
        out["weights"] = per_view[0]["weights"]
    return {**out, **view}
