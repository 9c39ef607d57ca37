"""Several teachers as one: weighted average of softmax probabilities (MEAL V2, Shen &
Savvides 2020) or of logits. In "probs" mode the output is T * log(mean softmax(z_i / T)),
so softmax(output / T) is exactly the averaged distribution at the stage's KD temperature T
and every logit objective can consume it."""
from __future__ import annotations

import torch
from torch import nn


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module], weights: list[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)

    def forward(self, x: torch.Tensor, mode: str = "probs", temperature: float = 1.0) -> torch.Tensor:
        outs = torch.stack([m(x).float() for m in self.members])  # (M, N, C) or per pixel (M, N, C, H, W)
        w = self.weights.view(-1, *[1] * (outs.dim() - 1))
        if mode == "logits":
            return (w * outs).sum(0)
        t = temperature
        return t * torch.logsumexp(torch.log_softmax(outs / t, 2) + w.log(), 0)
