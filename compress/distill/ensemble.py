"""Several teachers as one: weighted average of softmax probabilities (MEAL V2, Shen &
Savvides 2020) or of logits. In "probs" mode the output is T * log(mean softmax(z_i / T)),
so softmax(output / T) is exactly the averaged distribution at the stage's KD temperature T
and every logit objective can consume it.

A live teacher in "probs" mode hands the objective `Members` instead: each term then averages
the teachers' probabilities at its own temperature (MEAL V2); terms without a temperature
(mse_logits, l1_logits) get the average at the stage's KD temperature, as before. The full
teacher caches (`cache: full`, and `augmented` with `cache_targets: full`) store every teacher's
logits and hand the objective `Members` too, so cached and live targets agree term by term; the
sparse caches (topk, sampled) store the average at the stage's KD temperature, the one
temperature they serve (a single kl term, which TrainConfig checks). Feature terms hook the
first teacher."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def mix(outs: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """T * log(sum_i w_i softmax(z_i / T)) over the members (dim 0); classes on dim 2."""
    w = weights.view(-1, *[1] * (outs.dim() - 1))
    t = temperature
    return t * torch.logsumexp(torch.log_softmax(outs / t, 2) + w.log(), 0)


@dataclass
class Members:
    """Every teacher's logits (M, N, C, ...), their normalized weights, the stage's KD temperature."""
    logits: torch.Tensor
    weights: torch.Tensor
    temperature: float

    def at(self, temperature: float | None) -> torch.Tensor:
        return mix(self.logits, self.weights, self.temperature if temperature is None else temperature)


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module], weights: list[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        w = torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)

    def forward(self, x: torch.Tensor, mode: str = "probs", temperature: float = 1.0):
        outs = torch.stack([m(x).float() for m in self.members])  # (M, N, C) or per pixel (M, N, C, H, W)
        if mode == "logits":
            return (self.weights.view(-1, *[1] * (outs.dim() - 1)) * outs).sum(0)
        if mode == "members":  # "probs", each term at its own temperature (a live teacher)
            return Members(outs, self.weights, temperature)
        return mix(outs, self.weights, temperature)
