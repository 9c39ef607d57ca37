"""Logit objectives: small documented functions, composed with weights from config.

Every term maps (student logits, teacher logits, labels, state) to a scalar. KL-family
terms at temperature T are multiplied by T^2 (Hinton et al. 2015) so their gradients keep
the scale of the hard-label term whatever T is.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from compress.distill.ensemble import Members


class _Term(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0, description="weight of this term in the total loss")


class CE(_Term):
    """Cross-entropy with the labels."""
    kind: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the targets")


class MSE(_Term):
    """Mean squared error with the labels (regression)."""
    kind: Literal["mse"] = "mse"


class L1(_Term):
    """Mean absolute error with the labels (regression; less pulled by outliers than mse)."""
    kind: Literal["l1"] = "l1"


class KL(_Term):
    """Hinton KD: KL(teacher_T || student_T) * T^2 (Hinton et al. 2015, arXiv:1503.02531)."""
    kind: Literal["kl"] = "kl"
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")


class ReverseKL(_Term):
    """Reverse KL(student_T || teacher_T) * T^2: mode-seeking (Gu et al. 2024, MiniLLM)."""
    kind: Literal["reverse_kl"] = "reverse_kl"
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")


class JS(_Term):
    """Generalized Jensen-Shannon divergence (Agarwal et al. 2024, GKD, eq. 1): with the mixture
    M = beta*teacher_T + (1-beta)*student_T, beta*KL(teacher_T || M) + (1-beta)*KL(student_T || M).
    Our convention multiplies it by T^2 (as Hinton KD does, so the gradient's scale does not shrink
    with T and terms at several temperatures stay comparable); GKD and TRL's `generalized_jsd_loss`
    have no such factor: `t_squared: false` is the paper's form."""
    kind: Literal["js"] = "js"
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    beta: float = Field(0.5, gt=0, lt=1, description="GKD's mixture weight of the teacher (0.5: the symmetric JSD)")
    t_squared: bool = Field(True, description="multiply by T^2 (our convention); false: GKD's form, no factor")


class MSELogits(_Term):
    """Squared error between raw logits as Ba & Caruana 2014 ("Do deep nets need to be deep?",
    eq. 1): 1/2 * sum over classes (dim 1) of (z_s - z_t)^2, mean over the batch (and pixels).
    reduction: mean is the plain element-wise MSE (mean over classes too: 2/C times the paper's),
    kept for outputs where a per-element scale is wanted (the regression task's default)."""
    kind: Literal["mse_logits"] = "mse_logits"
    reduction: Literal["paper", "mean"] = Field(
        "paper", description="paper: 1/2 * sum over classes, mean over examples (Ba & Caruana); mean: element-wise MSE")


class L1Logits(_Term):
    """Mean absolute error between raw outputs (regression outputs, or logits)."""
    kind: Literal["l1_logits"] = "l1_logits"


class CAKLD(_Term):
    """Confidence-aware KL (BitDistiller, Du et al. 2024): gamma*RKL + (1-gamma)*FKL, gamma the
    teacher's mean confidence in the true label, so a confident teacher is followed mode-seeking."""
    kind: Literal["cakld"] = "cakld"
    temperature: float = Field(1.0, gt=0, description="softmax temperature T")
    confidence: Optional[float] = Field(
        None, ge=0, le=1, description="fixed gamma; default: the teacher's mean true-label probability in each batch")


class TAID(_Term):
    """TAID (Shing et al. 2025, arXiv:2501.16937): KL to an intermediate target
    softmax((1-t)*student.detach() + t*teacher), t rising from t_start to t_end with an
    adaptive step driven by the relative improvement of the objective."""
    kind: Literal["taid"] = "taid"
    temperature: float = Field(1.0, gt=0, description="softmax temperature T")
    t_start: float = Field(0.4, ge=0, le=1, description="initial interpolation toward the teacher")
    t_end: float = Field(1.0, ge=0, le=1, description="final interpolation (1 = the teacher itself)")
    alpha: float = Field(5e-4, ge=0, description="adaptive step size of t")
    beta: float = Field(0.99, ge=0, lt=1, description="momentum of the relative loss change")


class DIST(_Term):
    """DIST (Huang et al. 2022, arXiv:2205.10536): 1 - Pearson correlation of softmax outputs,
    across classes per example (inter-class) and across the batch per class (intra-class)."""
    kind: Literal["dist"] = "dist"
    temperature: float = Field(1.0, gt=0, description="softmax temperature T")
    inter: float = Field(1.0, ge=0, description="weight of the inter-class relation (beta)")
    intra: float = Field(1.0, ge=0, description="weight of the intra-class relation (gamma)")


class DKD(_Term):
    """Decoupled KD (Zhao et al. 2022, arXiv:2203.08679): alpha*TCKD (target vs rest,
    binary) + beta*NCKD (distribution among the non-target classes), each * T^2."""
    kind: Literal["dkd"] = "dkd"
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    alpha: float = Field(1.0, ge=0, description="weight of target-class KD")
    beta: float = Field(8.0, ge=0, description="weight of non-target-class KD")


LogitTerm = Annotated[Union[CE, MSE, L1, KL, ReverseKL, JS, MSELogits, L1Logits, CAKLD, TAID, DIST, DKD],
                      Field(discriminator="kind")]


def kd_default() -> list:
    """Hinton KD at T=4 with a little label CE: the classic recipe (Hinton et al. 2015)."""
    return [KL(weight=0.9, temperature=4.0), CE(weight=0.1)]


NEEDS_TEACHER = {"kl", "reverse_kl", "js", "mse_logits", "l1_logits", "cakld", "taid", "dist", "dkd"}
# terms against the labels: computed by the run's task (compress/tasks.py), which knows the
# labels' form (class ids, per-pixel class ids with an ignore index, float targets)
SUPERVISED = {"ce", "mse", "l1"}


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities, summed over classes, mean over the batch."""
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def ce(s, t, y, c: CE, state) -> torch.Tensor:
    return F.cross_entropy(s, y, label_smoothing=c.label_smoothing)


def kl(s, t, y, c: KL, state) -> torch.Tensor:
    T = c.temperature
    return _kl(F.log_softmax(t / T, 1), F.log_softmax(s / T, 1)) * T * T


def reverse_kl(s, t, y, c: ReverseKL, state) -> torch.Tensor:
    T = c.temperature
    return _kl(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1)) * T * T


def js(s, t, y, c: JS, state) -> torch.Tensor:
    T, b = c.temperature, c.beta
    log_p, log_q = F.log_softmax(t / T, 1), F.log_softmax(s / T, 1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(b), log_q + math.log(1 - b)]), 0)
    loss = b * _kl(log_p, log_m) + (1 - b) * _kl(log_q, log_m)
    return loss * T * T if c.t_squared else loss


def mse_logits(s, t, y, c: MSELogits, state) -> torch.Tensor:
    if c.reduction == "mean":
        return F.mse_loss(s, t)
    return 0.5 * (s - t).pow(2).sum(1).mean()


def l1_logits(s, t, y, c: L1Logits, state) -> torch.Tensor:
    return F.l1_loss(s, t)


def mse(s, t, y, c: MSE, state) -> torch.Tensor:
    return F.mse_loss(s, y.to(s.dtype))


def l1(s, t, y, c: L1, state) -> torch.Tensor:
    return F.l1_loss(s, y.to(s.dtype))


def cakld(s, t, y, c: CAKLD, state) -> torch.Tensor:
    T = c.temperature
    log_p, log_q = F.log_softmax(t / T, 1), F.log_softmax(s / T, 1)
    gamma = c.confidence
    if gamma is None:
        gamma = float(F.softmax(t, 1).gather(1, y[:, None]).mean())
    state["gamma"] = gamma
    return (gamma * _kl(log_q, log_p) + (1 - gamma) * _kl(log_p, log_q)) * T * T


def taid(s, t, y, c: TAID, state) -> torch.Tensor:
    interp = state.setdefault("t", c.t_start)
    T = c.temperature
    target = F.log_softmax(((1 - interp) * s.detach() + interp * t) / T, 1)
    loss = _kl(target, F.log_softmax(s / T, 1)) * T * T
    _taid_update(float(loss.detach()), c, state)
    return loss


def _taid_update(loss: float, c: TAID, state: dict) -> None:
    """The adaptive schedule: t moves toward t_end faster while the objective improves,
    and never lags the linear schedule from t_start to t_end."""
    prev = state.get("prev_loss")
    state["prev_loss"] = loss
    if prev is None:
        return
    rel = (prev - loss) / (prev + 1e-12)
    m = state["momentum"] = c.beta * state.get("momentum", 0.0) + (1 - c.beta) * rel
    floor = c.t_start + (c.t_end - c.t_start) * state.get("progress", 0.0)
    step = c.alpha * (1 / (1 + math.exp(-m))) * (1 - state["t"])
    state["t"] = min(c.t_end, max(floor, state["t"] + step))


def _pearson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    return (1 - r).mean()


def dist(s, t, y, c: DIST, state) -> torch.Tensor:
    T = c.temperature
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    inter = _pearson_distance(ps, pt)
    intra = _pearson_distance(ps.t(), pt.t())
    return (c.inter * inter + c.intra * intra) * T * T


def _binary_log(z: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """log (p_target, p_rest) of softmax(z), in log space: a clamp on the probabilities would zero
    the TCKD gradient once the student is over-confident (margin/T past ~27.6 + ln(C-1))."""
    log_p = F.log_softmax(z, 1)
    target = log_p.masked_select(gt)
    rest = torch.logsumexp(log_p.masked_fill(gt, float("-inf")), 1)
    return torch.stack([target, rest], 1)


def dkd(s, t, y, c: DKD, state) -> torch.Tensor:
    T = c.temperature
    gt = F.one_hot(y, s.shape[1]).bool()
    # binary (target, all others) distributions
    tckd = _kl(_binary_log(t / T, gt), _binary_log(s / T, gt))
    # distributions among non-target classes only (target logit pushed to -inf)
    nckd = _kl(F.log_softmax(t / T - 1000.0 * gt, 1), F.log_softmax(s / T - 1000.0 * gt, 1))
    return (c.alpha * tckd + c.beta * nckd) * T * T


FUNCTIONS = {"ce": ce, "mse": mse, "l1": l1, "kl": kl, "reverse_kl": reverse_kl, "js": js, "mse_logits": mse_logits,
             "l1_logits": l1_logits, "cakld": cakld, "taid": taid, "dist": dist, "dkd": dkd}


def sparse_kl(s: torch.Tensor, target, c) -> torch.Tensor:
    """KD against a cached sparse teacher distribution (top-k or sampled): the cross-entropy
    -sum_i p_i log q_i over the stored classes, * T^2. It differs from KL(p||q) by the
    teacher's entropy, a constant, so the gradients are the same."""
    T = c.temperature
    log_q = F.log_softmax(s / T, 1).gather(1, target.index)
    return -(target.prob * log_q).sum(1).mean() * T * T


class Objective:
    """The weighted sum of the configured logit terms (and feature terms, when a
    FeatureDistiller is attached). Returns (total, parts) with one part per term.
    task: the run's compress.tasks.Task, which computes the terms against the labels (None:
    the plain functions here: class-id labels). The teacher terms work over dim 1 whatever follows it, so on
    [B, C, H, W] outputs they are per-pixel (a mean over batch and pixels)."""

    def __init__(self, terms: list, features=None, task=None):
        self.terms, self.features, self.task = terms, features, task
        self.states = [dict() for _ in terms]
        self.needs_teacher = any(t.kind in NEEDS_TEACHER for t in terms)

    def _supervised(self, term, s, y, state):
        if self.task is None:
            return FUNCTIONS[term.kind](s, None, y, term, state)
        return self.task.supervised(term, s, y)

    def __call__(self, s, t, y, progress: float):
        parts = {}
        total = s.new_zeros(())
        for term, state in zip(self.terms, self.states):
            state["progress"] = progress
            if isinstance(t, Members):  # several teachers: averaged at this term's temperature
                t_term = t.at(getattr(term, "temperature", None)) if term.kind in NEEDS_TEACHER else None
                value = self._one(term, s, t_term, y, state)
            else:
                value = self._one(term, s, t, y, state)
            name = term.kind if term.kind not in parts else f"{term.kind}{len(parts)}"
            parts[name] = value
            total = total + term.weight * value
        if self.features is not None:
            for name, value in self.features.losses().items():
                parts[name] = value
                total = total + self.features.terms[int(name[4:].split("_")[0])].weight * value
        return total, parts

    def _one(self, term, s, t, y, state) -> torch.Tensor:
        if t is not None and not isinstance(t, torch.Tensor):  # a cached sparse target
            if term.kind not in ("ce", "kl"):
                raise ValueError(f"loss term {term.kind} needs full teacher logits")
            return self._supervised(term, s, y, state) if term.kind == "ce" else sparse_kl(s, t, term)
        if term.kind in SUPERVISED:
            return self._supervised(term, s, y, state)
        return FUNCTIONS[term.kind](s, t, y, term, state)
