"""Calibration subsets: stratified by class, drawn with a fixed seed."""
from __future__ import annotations

import torch

from calib.datasets import Split


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices with each class represented in proportion, reproducible for a seed.

    Stratifying keeps a small calibration set from missing a class, whose activations
    would then be clipped by ranges learned without it.
    """
    n = min(n, len(labels))
    g = torch.Generator().manual_seed(seed)
    if labels.dim() != 1 or labels.is_floating_point():  # masks, regression targets: no classes to stratify
        return torch.randperm(len(labels), generator=g)[:n]
    classes, counts = labels.unique(return_counts=True)
    quota = (counts.float() / counts.sum() * n).floor().long()
    # hand out the remainder to the largest classes so the total is exactly n
    for i in torch.argsort(counts, descending=True)[: n - int(quota.sum())]:
        quota[i] += 1
    picked = []
    for c, q in zip(classes, quota):
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[: int(q)]])
    out = torch.cat(picked)
    return out[torch.randperm(len(out), generator=g)]


def calibration_split(split: Split, n: int, seed: int) -> Split:
    return split.subset(stratified_indices(split.labels, n, seed))
