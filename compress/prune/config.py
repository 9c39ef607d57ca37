"""The prune stage's configuration (one YAML section: `kind: prune`)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.distill.objectives import LogitTerm, kd_default
from compress.train import TrainConfig

Criterion = Literal["l1", "l2", "bn_scale", "taylor", "hessian", "lamp", "random"]


class LatencyTarget(BaseModel):
    """Prune to a latency measured on a deployment backend instead of a fixed ratio."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    # the name is checked against the backends at preflight (ctx.latency), not here: the
    # prune package knows no backends
    backend: str = Field("openvino", description="backend the candidates are timed on (onnxruntime | openvino)")
    batch: int = Field(1, ge=1, description="batch size of the timed inference")
    threads: Optional[int] = Field(None, ge=1, description="runtime threads while timing (default: the runtime's)")
    latency_ms: Optional[float] = Field(None, gt=0, description="budget: p50 latency in ms (give this or speedup)")
    speedup: Optional[float] = Field(None, gt=1)
    """budget: unpruned p50 / pruned p50 (give this or latency_ms)"""
    max_ratio: float = Field(0.8, gt=0, lt=1, description="the largest pruning ratio the search tries")
    iterations: int = Field(5, ge=1, description="bisection steps after checking max_ratio")
    runs: int = Field(200, ge=10)
    """timed inferences per model per candidate, interleaved with the unpruned model"""

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.latency_ms is None) == (self.speedup is None):
            raise ValueError("give exactly one of latency_ms or speedup")
        return self


class PruneConfig(TrainConfig):
    """Structured pruning with torch-pruning (channels, attention heads), residual-block
    removal (LAPTOP-Diff) and 2:4 semi-structured sparsity, each followed by KD recovery."""
    model_config = ConfigDict(use_attribute_docstrings=True)
    kind: Literal["prune"] = "prune"
    ratio: float = Field(0.5, ge=0, lt=1)
    """fraction of channels removed from each prunable layer group (the final ratio when steps > 1; 0 = no channel
    pruning)"""
    importance: Criterion = Field("l2")
    """channel importance: l1 | l2 | bn_scale | taylor | hessian | lamp | random"""
    steps: int = Field(1, ge=1)
    """pruning steps; the ratio grows linearly and the recovery epochs are split between steps"""
    global_pruning: bool = Field(False)
    """rank channels across layers (global) instead of within each layer (uniform)"""
    layer_ratios: dict[str, float] = Field(default_factory=dict)
    """per-layer ratio by qualified module name (overrides ratio)"""
    max_layer_ratio: float = Field(0.9, gt=0, le=1)
    """no layer loses more than this fraction, so none collapses under global ranking"""
    ignored: Optional[list[str]] = Field(None)
    """qualified module names never pruned (default: the classifier, found by timm's get_classifier() or by tracing
    the layer whose output is the logits; the stage's metrics name it under `ignored`)"""
    keep_ignored_inputs: bool = Field(True)
    """ignored layers keep their input channels too (Torch-Pruning #341: by default only outputs are kept); false lets
    e.g. the classifier's inputs shrink"""
    # int8 kernels (VNNI/AMX on CPU, tensor cores on GPU) work on blocks of 8 or more
    # channels: a count off that grid pads to the next multiple and wastes the difference
    # (measured here in benchmarks/RESULTS.md, "round_to").
    round_to: int = Field(8, ge=1)
    """kept channel counts are multiples of this (int8 kernels want multiples of 8)"""
    prune_heads: bool = Field(True)
    """attention modules (a qkv Linear and num_heads) lose whole heads; false shrinks every head's width instead"""
    importance_batches: int = Field(4, ge=1)
    """calibration batches whose gradients score channels (taylor, hessian)"""
    remove_blocks: int = Field(0, ge=0)
    """whole blocks removed before channel pruning, chosen by the output distortion each removal causes on calibration
    data (LAPTOP-Diff)"""
    block_candidates: list[str] = Field(default_factory=list)
    """blocks that may be removed, by qualified name (default: every block in a Sequential whose output shape equals its
    input shape)"""
    block_batches: int = Field(4, ge=1, description="calibration batches used to score block removals")
    semi_structured: list[str] = Field(default_factory=list)
    """2:4 sparsity (2 of every 4 weights along the input channels are zero) on modules matching these name patterns,
    e.g. 'layers.*.conv2'; masks are kept through every later stage"""
    target: Optional[LatencyTarget] = Field(None)
    """search the channel ratio for a latency budget on a backend (replaces ratio)"""
    recovery_teacher: Literal["configured", "unpruned"] = Field("configured")
    """KD recovery from the run's teacher, or from a frozen copy of the model before pruning (CoFi)"""
    epochs: float = Field(2, ge=0, description="KD recovery epochs after pruning (in total, over all steps)")
    loss: list[LogitTerm] = Field(default_factory=kd_default)
    """recovery objective: logit terms {kind, weight, ...}"""
