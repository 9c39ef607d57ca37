"""The quantize stage's config (one config: prepare -> calibrate -> train -> convert) and the
settings recorded in structure.json to rebuild the quantized structure."""
from __future__ import annotations

import math
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.distill.objectives import LogitTerm, kd_default
from compress.train import TrainConfig

# Bit widths are 2..8: weights are exported as int8 Q/DQ whatever their width (a b-bit
# weight is an int8 tensor clipped to the b-bit range), and 2 is the least that brevitas'
# narrow-range integer quantizer gives a nonzero level.


class MixedPrecisionConfig(BaseModel):
    """Per-layer weight bit widths chosen by measured sensitivity to meet a budget."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    low_bits: int = Field(4, ge=2, le=8)
    """the bit width a layer may be lowered to (the high one is weight_bits)"""
    avg_bits: Optional[float] = Field(None, gt=0, le=8)
    """budget: average weight bits, weighted by each layer's weight count"""
    weight_bytes: Optional[int] = Field(None, gt=0)
    """budget: total packed weight bytes (sum of weights x bits / 8)"""
    batches: int = Field(2, ge=1, description="calibration batches each layer's sensitivity is measured on")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.avg_bits is None) == (self.weight_bytes is None):
            raise ValueError("mixed_precision: give exactly one budget, avg_bits or weight_bytes")
        return self


TeacherName = Literal["configured", "self"]
TEACHER_NAMES = ("configured", "self")


def teacher_choice(v):
    """`teacher` as written: a name, or {name: weight > 0}; one error line for anything else."""
    if isinstance(v, str) and v in TEACHER_NAMES:
        return v
    if isinstance(v, dict) and v and all(k in TEACHER_NAMES for k in v) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
            for w in v.values()):
        return {k: float(w) for k, w in v.items()}
    raise ValueError(f"{v!r}: expected configured, self, or weights such as {{self: 0.7, configured: 0.3}} "
                     f"(each > 0)")


class QuantizeConfig(TrainConfig):
    """Quantization-aware distillation: brevitas PTQ calibration, then QAT epochs with KD."""
    model_config = ConfigDict(use_attribute_docstrings=True)
    kind: Literal["quantize"] = "quantize"
    weight_bits: int = Field(8, ge=2, le=8)
    """weight bit width (per-channel, symmetric, narrow range): 8 = W8, 4 = W4"""
    act_bits: Literal[8, 16] = Field(8)
    """8 = int8 activations (per tensor); 16 = activations stay float (weight-only, e.g. W4A16)"""
    activations: Literal["symmetric", "asymmetric", "signed"] = Field("symmetric")
    """symmetric int8 (ReLU outputs uint8); asymmetric: each compute layer's input uint8 with a learned zero point
    (residual sums stay symmetric); signed: int8 everywhere, ReLU outputs too, for TensorRT (which takes no uint8; ORT
    CPU then cannot fuse Conv+ReLU into QLinearConv)"""
    first_layer_bits: Optional[int] = Field(None, ge=2, le=8)
    """weight bits of the first compute layer (None = weight_bits)"""
    last_layer_bits: Optional[int] = Field(None, ge=2, le=8)
    """weight bits of the last compute layer (None = weight_bits)"""
    layer_bits: dict[str, int] = Field(default_factory=dict)
    """weight bits by qualified module name, e.g. {layers.0.conv1: 4}; wins over first/last"""
    mixed_precision: Optional[MixedPrecisionConfig] = Field(None)
    """choose weight bits per layer by measured sensitivity under a budget"""
    calib_batches: int = Field(8, ge=1, description="batches of the calibration subset used for activation ranges")
    equalize_iters: int = Field(0, ge=0)
    """cross-layer weight equalization iterations before quantizing (data-free; 0 = off)"""
    act_equalization: float = Field(0.0, ge=0, le=1)
    """activation equalization strength alpha on calibration data (SmoothQuant-style, brevitas graph mode; scales fold
    into the weights; 0 = off)"""
    bias_correction: bool = Field(False)
    """after calibration, correct each layer's bias for the mean shift quantization causes (brevitas
    bias_correction_mode)"""
    epochs: float = Field(1, ge=0, description="QAT epochs with KD (0 = post-training quantization only)")
    lr: float = Field(2e-4, gt=0, description="QAT learning rate (small: the model is already trained)")
    weight_decay: float = Field(0.0, ge=0)
    """none by default: decay would pull weights off their quantization grid"""
    loss: list[LogitTerm] = Field(default_factory=kd_default)
    """QAT objective: logit terms {kind, weight, ...} (cakld per BitDistiller)"""
    precision: Literal["auto", "bf16", "fp32"] = Field("fp32")
    """fake-quant QAT runs in fp32 (bf16 would blur the int8 grid)"""
    channels_last: bool = Field(False, description="NHWC while training")
    teacher: Union[TeacherName, dict[TeacherName, float]] = Field("configured")
    """whom QAT distills from: configured (the run's teacher), self (a frozen copy of the float model that entered
    this stage: BitDistiller's self-distillation), or both, probabilities averaged by weight, e.g. {self: 0.7,
    configured: 0.3}"""

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher_choice(cls, v):
        return teacher_choice(v)

    def teacher_weights(self) -> dict[str, float]:
        """{source: weight}: configured -> {configured: 1}, self -> {self: 1}, a dict as given."""
        return {self.teacher: 1.0} if isinstance(self.teacher, str) else dict(self.teacher)

    @model_validator(mode="after")
    def _teacher_rules(self):
        if self.teacher == "configured":
            return self
        if self.epochs == 0:
            raise ValueError(f"teacher: {self.teacher} distills during QAT, but epochs: 0 is post-training "
                             f"quantization only; give epochs > 0, or remove teacher")
        if not self.needs_teacher:
            raise ValueError(f"teacher: {self.teacher}: the loss {[t.kind for t in self.loss]} has no teacher term; "
                             f"add one (kl, cakld, ...), or remove teacher")
        return self

    @model_validator(mode="after")
    def _bits_rules(self):
        bad = {k: v for k, v in self.layer_bits.items() if not 2 <= v <= 8}
        if bad:
            raise ValueError(f"layer_bits: {bad}: weight bits must be 2..8")
        if self.mixed_precision and self.mixed_precision.low_bits >= self.weight_bits:
            raise ValueError(f"mixed_precision.low_bits={self.mixed_precision.low_bits} must be below "
                             f"weight_bits={self.weight_bits} (the high bit width)")
        if self.act_bits == 16 and self.bias_correction:
            raise ValueError("bias_correction needs quantized activations (act_bits: 8); "
                             "weight-only (act_bits: 16) keeps float biases")
        return self


def settings(cfg: QuantizeConfig) -> dict:
    """What rebuilding the quantized structure needs (recorded in structure.json). The stage
    adds `layer_bits` (every compute layer's final weight bits) once it has resolved them."""
    return {"weight_bits": cfg.weight_bits, "act_bits": cfg.act_bits,
            "activations": cfg.activations, "weight_scaling": "per_channel",
            "bias": "int32" if cfg.act_bits == 8 else "float", "merge_bn": True,
            "plain_batchnorms": True, "equalize_iters": cfg.equalize_iters}


def format_name(qs: dict) -> str:
    """W8A8, W4A8, W4A16 weight-only, W4/8A8 mixed."""
    bits = sorted(set(qs["layer_bits"].values())) or [qs["weight_bits"]]
    name = f"W{'/'.join(map(str, bits))}A{qs['act_bits']}"
    return name + (" weight-only" if qs["act_bits"] == 16 else "") + (" mixed" if len(bits) > 1 else "")
