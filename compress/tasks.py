"""Tasks: what the labels mean, and so how a model is trained against them, scored, and held
to its torch outputs on a runtime. `task: classification | regression | segmentation` (or
`{kind: segmentation, ignore_index: 255}`) picks one of the classes below; everything that
depends on the task (supervised loss, which teacher terms apply, metrics, agreement, the
parity gate's defaults, report columns, output and label shapes) asks the Task object.

Outputs per task: classification [B, C] logits; regression [B, K] values; segmentation
[B, C, H, W] per-pixel logits at the masks' resolution. Labels: int64 [N] in [0, C); float
[N, K]; int64 masks [N, H, W] in [0, C) or the ignore index.

A user metric (`metric: pkg.module:fn`) is called as fn(outputs, labels) with numpy arrays
(outputs float32 as above, labels as the dataset holds them) and returns a float (a column
named after fn) or a dict of name -> float; it is scored beside the task's own metrics on
torch and on every runtime, and the report shows it.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from compress.distill.objectives import MSE, MSELogits, l1, mse
from compress.errors import UserError

TASKS = ("classification", "regression", "segmentation")
# report column headers of the metric keys (a user metric's keys print as they are)
HEADERS = {"accuracy": "accuracy", "miou": "mIoU", "pixel_accuracy": "pixel acc", "rmse": "RMSE", "mae": "MAE",
           "agreement": "agreement", "max_abs_diff": "max abs diff", "mean_abs_diff": "mean abs diff"}


class TaskConfig(BaseModel):
    """What the labels are: class ids, float targets, or per-pixel class ids."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    kind: Literal["classification", "regression", "segmentation"] = "classification"
    """classification ([B, C] logits), regression ([B, K] values) or segmentation ([B, C, H, W] logits)"""
    # 255: the "void" label of PASCAL VOC / Cityscapes masks
    ignore_index: int = Field(255, description="segmentation: mask value left out of the loss, metrics and checks")


class Task:
    """Classification; the other tasks override what differs."""
    name = "classification"
    primary, higher_is_better = "accuracy", True
    metric_keys: tuple[str, ...] = ("accuracy",)
    diff_keys: tuple[str, ...] = ("agreement", "max_abs_diff")
    supervised_kinds = frozenset({"ce"})
    teacher_kinds = frozenset({"kl", "reverse_kl", "js", "mse_logits", "l1_logits", "cakld", "taid", "dist", "dkd"})
    train_key, train_label, val_label = "train_accuracy", "train acc", "val acc"
    parity_defaults: dict = {}
    agreement_text = "top-1 agreement"

    def __init__(self, cfg: Optional[TaskConfig] = None, user_metric: Optional[Callable] = None):
        self.cfg = cfg or TaskConfig(kind=self.name)
        self.user_metric = user_metric
        self.user_keys: list[str] = []

    def columns(self) -> dict[str, list[str]]:
        """The report's metric columns: of the stage table (torch) and of the deployment table."""
        metrics = [*self.metric_keys, *self.user_keys]
        return {"stages": metrics, "deployments": metrics + list(self.diff_keys)}

    @property
    def delta_key(self) -> str:
        """The vs-teacher difference of the primary metric (report.json; accuracy_delta kept)."""
        return f"{self.primary}_delta"

    @property
    def terms(self) -> frozenset:
        return self.supervised_kinds | self.teacher_kinds

    # -- training -------------------------------------------------------------------------
    def default_loss(self, with_teacher: bool) -> Optional[list]:
        """The loss a stage gets when its config sets none; None: the stage config's own."""
        return None

    def supervised(self, term, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(s, y, label_smoothing=term.label_smoothing)

    def train_stat(self, out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(numerator, denominator) of the training metric on one batch, summed over an epoch."""
        return int((out.argmax(1) == y).sum()), len(y)

    def train_value(self, num: float, den: float) -> float:
        return num / max(1, den)

    # -- scoring --------------------------------------------------------------------------
    def own_metrics(self, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"accuracy": float((outputs.argmax(1) == np.asarray(labels)).mean())}

    def metrics(self, outputs: np.ndarray, labels) -> dict[str, float]:
        """The task's metrics (the primary first), then the user metric's."""
        labels = np.asarray(labels)
        out = self.own_metrics(outputs, labels)
        if self.user_metric is not None:
            got = self.user_metric(outputs, labels)
            got = got if isinstance(got, dict) else {self.user_metric.__name__: got}
            self.user_keys += [k for k in got if k not in self.user_keys]  # the report's extra columns
            out.update(got)
        return {k: float(v) for k, v in out.items()}

    def score(self, outputs: np.ndarray, labels) -> float:
        """The primary metric (per-epoch evaluation)."""
        return self.own_metrics(outputs, np.asarray(labels))[self.primary]

    def agreement(self, outputs: np.ndarray, reference: np.ndarray, labels: np.ndarray, parity) -> dict:
        return {"agreement": float((outputs.argmax(1) == reference.argmax(1)).mean()),
                "max_abs_diff": float(np.abs(outputs - reference).max())}

    def compare(self, outputs: np.ndarray, labels, reference: np.ndarray, parity=None) -> dict:
        """A runtime's outputs: the metrics on the labels, agreement with torch's `reference`."""
        return {**self.metrics(outputs, labels), **self.agreement(outputs, reference, np.asarray(labels), parity)}

    def metric_drop(self, runtime: float, torch_value: float) -> float:
        return torch_value - runtime

    def parity_failures(self, row: dict, torch_value: float, parity) -> list[str]:
        """Why `row` (a runtime's compare()) fails the gate; torch_value: torch's primary metric."""
        out = []
        if row["agreement"] < parity.min_agreement:
            out.append(f"{self.agreement_text} with torch {row['agreement']:.4f} "
                       f"< min_agreement {parity.min_agreement}")
        drop, name = self.metric_drop(row[self.primary], torch_value), HEADERS[self.primary]
        if drop > parity.max_acc_drop:
            out.append(self.drop_text(name, row[self.primary], torch_value, drop, parity.max_acc_drop))
        if parity.max_abs_diff is not None and row["max_abs_diff"] > parity.max_abs_diff:
            out.append(f"max |delta logit| {row['max_abs_diff']:.3g} > max_abs_diff {parity.max_abs_diff}")
        return out

    def drop_text(self, name, value, torch_value, drop, limit) -> str:
        return f"{name} {value:.4f} is {drop:.4f} below torch's {torch_value:.4f} (max_acc_drop {limit})"

    # -- shapes and labels ----------------------------------------------------------------
    def output_shape(self, batch: int, data) -> tuple:
        return (batch, data.num_classes)

    def output_text(self, data) -> str:
        return f"(the data has {data.num_classes} classes)"

    def check_labels(self, data, where: str = "data.dataset") -> None:
        """Classification labels are checked by calib/datasets.py (range, classes present)."""

    def manifest_output(self, data) -> dict:
        return {}


class Regression(Task):
    name = "regression"
    primary, higher_is_better = "rmse", False
    metric_keys = ("rmse", "mae")
    diff_keys = ("agreement", "max_abs_diff", "mean_abs_diff")
    supervised_kinds = frozenset({"mse", "l1"})
    teacher_kinds = frozenset({"mse_logits", "l1_logits"})
    train_key, train_label, val_label = "train_rmse", "train rmse", "val rmse"
    # agreement: an example agrees when every output is within 0.05 std of that output's
    # labels of torch's (int8 output steps are ~1/255 of the range); RMSE may grow 5%
    parity_defaults = {"max_acc_drop": 0.05, "tolerance": 0.05}
    agreement_text = "share of examples within tolerance"

    def default_loss(self, with_teacher: bool) -> list:
        return [MSELogits(weight=0.9, reduction="mean"), MSE(weight=0.1)] if with_teacher else [MSE()]

    def supervised(self, term, s, y):
        return (mse if term.kind == "mse" else l1)(s, None, y, term, None)

    def train_stat(self, out, y):
        return float(((out.float() - y.float()) ** 2).sum()), y.numel()

    def train_value(self, num, den):
        return float(np.sqrt(num / max(1, den)))

    def own_metrics(self, outputs, labels):
        err = outputs - labels
        return {"rmse": float(np.sqrt((err ** 2).mean())), "mae": float(np.abs(err).mean())}

    def agreement(self, outputs, reference, labels, parity):
        tol = (parity.tolerance if parity is not None and parity.tolerance is not None else 0.05)
        scale = labels.std(0)
        diff = np.abs(outputs - reference)
        within = diff <= tol * np.where(scale > 0, scale, 1.0)
        return {"agreement": float(within.all(1).mean()), "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean())}

    def metric_drop(self, runtime, torch_value):
        return (runtime - torch_value) / max(torch_value, 1e-12)  # relative: labels have any scale

    def drop_text(self, name, value, torch_value, drop, limit):
        return f"{name} {value:.4g} is {drop:.1%} above torch's {torch_value:.4g} (max_acc_drop {limit}, relative)"

    def output_text(self, data):
        return f"(the labels have {data.num_classes} values per example)"

    def check_labels(self, data, where="data.dataset"):
        for part in ("train", "test"):
            y = getattr(data, part).labels
            if not y.is_floating_point() or y.dim() != 2 or y.shape[1] != data.num_classes:
                raise UserError(f"{where}: task regression: {part} labels are {str(y.dtype).split('.')[-1]} "
                                f"{list(y.shape)}, expected float [N, {data.num_classes}] (num_classes = outputs)")
            if not bool(torch.isfinite(y).all()):
                raise UserError(f"{where}: task regression: {part} labels hold NaN or inf "
                                f"({int((~torch.isfinite(y)).sum())} values)")

    def manifest_output(self, data):
        return {"kind": "values", "num_outputs": data.num_classes}


class Segmentation(Task):
    name = "segmentation"
    primary = "miou"
    metric_keys = ("miou", "pixel_accuracy")
    teacher_kinds = frozenset({"kl", "reverse_kl", "js", "mse_logits", "l1_logits", "taid"})
    train_key, train_label, val_label = "train_pixel_accuracy", "train pixel acc", "val miou"
    # a tiny test split's mIoU moves by ~0.005 when a few boundary pixels flip
    parity_defaults = {"max_acc_drop": 0.01}
    agreement_text = "per-pixel agreement"

    @property
    def ignore(self) -> int:
        return self.cfg.ignore_index

    def supervised(self, term, s, y):
        return F.cross_entropy(s, y, ignore_index=self.ignore, label_smoothing=term.label_smoothing)

    def train_stat(self, out, y):
        valid = y != self.ignore
        return int(((out.argmax(1) == y) & valid).sum()), int(valid.sum())

    def confusion(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[true class, predicted class] pixel counts over the labelled pixels."""
        c = outputs.shape[1]
        valid = labels != self.ignore
        idx = labels[valid].astype(np.int64) * c + outputs.argmax(1)[valid]
        return np.bincount(idx, minlength=c * c).reshape(c, c)

    def own_metrics(self, outputs, labels):
        cm = self.confusion(outputs, labels)
        tp = np.diag(cm).astype(np.float64)
        union = cm.sum(0) + cm.sum(1) - tp
        seen = union > 0  # a class neither in the masks nor predicted has no IoU
        miou = float((tp[seen] / union[seen]).mean()) if seen.any() else 0.0
        return {"miou": miou, "pixel_accuracy": float(tp.sum() / max(1, cm.sum()))}

    def agreement(self, outputs, reference, labels, parity):
        return {"agreement": float((outputs.argmax(1) == reference.argmax(1)).mean()),
                "max_abs_diff": float(np.abs(outputs - reference).max())}

    def output_shape(self, batch, data):
        return (batch, data.num_classes, *mask_size(data))

    def check_labels(self, data, where="data.dataset"):
        c, hw = data.num_classes, tuple(data.input_shape[1:])
        for part in ("train", "test"):
            y = getattr(data, part).labels
            if y.dtype != torch.int64 or y.dim() != 3:
                raise UserError(f"{where}: task segmentation: {part} labels are {str(y.dtype).split('.')[-1]} "
                                f"{list(y.shape)}, expected int64 masks [N, H, W]")
            if tuple(y.shape[1:]) != hw:
                raise UserError(f"{where}: task segmentation: {part} masks are {list(y.shape[1:])}, "
                                f"the images {list(hw)}: masks must be at the images' resolution")
            bad = (y != self.ignore) & ((y < 0) | (y >= c))
            if bool(bad.any()):
                raise UserError(f"{where}: task segmentation: {part} masks hold {int(y[bad][0])}, expected "
                                f"classes 0..{c - 1} or ignore_index {self.ignore} ({int(bad.sum())} pixels)")

    def manifest_output(self, data):
        return {"kind": "per-pixel logits", "num_classes": data.num_classes, "ignore_index": self.ignore}


def mask_size(data) -> tuple[int, int]:
    """The H, W outputs must have: the masks' (the input's when no masks are loaded)."""
    labels = getattr(getattr(data, "train", None), "labels", None)
    return tuple(labels.shape[1:]) if labels is not None and labels.dim() == 3 else tuple(data.input_shape[1:])


TABLE: dict[str, type[Task]] = {"classification": Task, "regression": Regression, "segmentation": Segmentation}
CLASSIFICATION = Task()


def get_task(task: Optional[Task]) -> Task:
    return CLASSIFICATION if task is None else task


def resolve_metric(spec: Optional[str]) -> Optional[Callable]:
    if not spec:
        return None
    from calib.datasets import resolve_factory
    return resolve_factory(spec, "metric")


def make_task(cfg: Optional[TaskConfig] = None, metric: Optional[str] = None) -> Task:
    cfg = cfg or TaskConfig()
    return TABLE[cfg.kind](cfg, resolve_metric(metric))


def from_config(cfg) -> Task:
    """The run config's task (RunConfig.task, RunConfig.metric)."""
    return make_task(cfg.task, cfg.metric)



BUILTIN_CLASSIFICATION_SETS = ("fashion_mnist", "synthetic")


def _rule_errors(task: Task, loc: tuple, section) -> list[tuple[tuple, str]]:
    """A training section's loss terms and cache against the task (its default loss filled in)."""
    from compress.distill.objectives import NEEDS_TEACHER
    default = task.default_loss(any(t.kind in NEEDS_TEACHER for t in section.loss))
    if default is not None and "loss" not in section.model_fields_set:
        section.loss = default
    out = [(loc + ("loss", j, "kind"), f"{t.kind} does not apply to task {task.name} "
            f"(its terms: {', '.join(sorted(task.terms))})")
           for j, t in enumerate(section.loss) if t.kind not in task.terms]
    if task.name == "regression" and getattr(section, "ensemble", "logits") == "probs":
        if "ensemble" not in section.model_fields_set:
            section.ensemble = "logits"  # outputs are values, not class scores: average them
        else:
            out.append((loc + ("ensemble",), "probs averages class probabilities: not for task regression "
                                             "(use logits: the teachers' outputs averaged)"))
    if task.name != "classification" and getattr(section, "augment", False):
        if "augment" not in section.model_fields_set:
            section.augment = False  # the default shifts and flips: the labels would not follow
        else:
            out.append((loc + ("augment",), f"shifts and flips the images, not their {task.name} labels: "
                                            f"classification only (set augment: false)"))
    if task.name != "classification" and getattr(section, "cache", "none") in ("topk", "sampled", "augmented"):
        out.append((loc + ("cache",), f"{section.cache} keeps a few class probabilities per example: "
                                      f"classification only (task {task.name}: use cache: full or none)"))
    return out


def apply_task(cfg) -> None:
    """RunConfig's task rules, at validate: each training section gets the task's default loss
    when it sets none and has only terms that apply; unset parity fields get the task's
    defaults. Every violation is one error at its own key path."""
    from pydantic import ValidationError
    from pydantic_core import InitErrorDetails, PydanticCustomError
    task = TABLE[cfg.task.kind](cfg.task)
    sections = [(("teacher", i, "train"), t.train) for i, t in enumerate(cfg.teachers) if t.train is not None]
    sections += [(("stages", i), s) for i, s in enumerate(cfg.stages) if hasattr(s, "loss")]
    errors = [e for loc, sec in sections for e in _rule_errors(task, loc, sec)]
    for t in cfg.targets:
        for key, value in task.parity_defaults.items():
            if key not in t.parity.model_fields_set:
                setattr(t.parity, key, value)
    if task.name == "regression" and cfg.data.calibration == "synthetic":
        errors.append((("data", "calibration"), "synthetic calibration labels images by the teacher's argmax: "
                                                "not for task regression (use real)"))
    if task.name != "classification" and cfg.data.dataset in BUILTIN_CLASSIFICATION_SETS:
        errors.append((("data", "dataset"), f"{cfg.data.dataset} is a classification set; task {task.name} needs "
                                            f"a 'pkg.module:factory' dataset with its labels "
                                            f"(e.g. calib.task_data:shapes_{task.name})"))
    if errors:
        raise ValidationError.from_exception_data("RunConfig", [
            InitErrorDetails(type=PydanticCustomError("value_error", msg), loc=loc, input=None)
            for loc, msg in errors])
