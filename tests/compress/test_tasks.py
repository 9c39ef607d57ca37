"""Tasks beyond classification (compress/tasks.py): metrics and per-pixel KD against values
computed by hand, config rules, label and output checks, the logits layer of task heads, and
the whole chain (distill, prune, quantize, export, ONNX Runtime + OpenVINO with parity) for
segmentation and regression on the synthetic shapes of calib/task_data.py."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from compress.config import ConfigError
from compress.config_load import load_config
from compress.distill.objectives import CE, KL, MSE, Objective
from compress.errors import UserError
from compress.tasks import Regression, Segmentation, TaskConfig, make_task


def max_error(outputs, labels):
    """A user metric (`metric: tests.compress.test_tasks:max_error`)."""
    return float(np.abs(outputs - labels).max())


# -- metrics and objectives against hand-computed values ----------------------------------

def one_hot_logits(pred: np.ndarray, c: int) -> np.ndarray:
    """[N, H, W] class ids -> [N, C, H, W] logits whose argmax is `pred`."""
    return np.moveaxis(np.eye(c, dtype=np.float32)[pred], -1, 1)


def test_miou_and_pixel_accuracy_by_hand():
    task = Segmentation(TaskConfig(kind="segmentation", ignore_index=255))
    labels = np.array([[[0, 1], [2, 255]]])
    out = one_hot_logits(np.array([[[0, 1], [1, 0]]]), 3)
    m = task.metrics(out, labels)
    # 3 labelled pixels, 2 right; IoU: class 0 1/1, class 1 1/2 (predicted twice), class 2 0/1
    assert m["pixel_accuracy"] == pytest.approx(2 / 3)
    assert m["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    # a class neither labelled nor predicted does not count: with 4 classes the mean is the same
    assert task.metrics(one_hot_logits(np.array([[[0, 1], [1, 0]]]), 4), labels)["miou"] == pytest.approx(0.5)
    # agreement is per pixel, the ignored one included
    ref = one_hot_logits(np.array([[[0, 1], [1, 1]]]), 3)
    assert task.agreement(out, ref, labels, None)["agreement"] == pytest.approx(0.75)


def test_regression_metrics_and_agreement_by_hand():
    task = Regression()
    labels = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)  # std per output: 1, 1
    out = np.array([[0.5, 1.0], [2.0, 2.0]], np.float32)
    m = task.metrics(out, labels)
    assert m["rmse"] == pytest.approx(math.sqrt((0.25 + 1) / 4))
    assert m["mae"] == pytest.approx(1.5 / 4)
    ref = out + np.array([[0.04, 0.0], [0.0, 0.06]], np.float32)  # 2nd example off by > 0.05 std
    a = task.agreement(out, ref, labels, None)
    assert a["agreement"] == pytest.approx(0.5)
    assert a["max_abs_diff"] == pytest.approx(0.06, abs=1e-6)
    # the gate: RMSE up 10% fails at max_acc_drop 0.05 (relative), agreement 0.5 < 0.98 fails
    from compress.plan import Parity
    row = {**m, **a, "rmse": m["rmse"] * 1.1}
    fails = task.parity_failures(row, m["rmse"], Parity(max_acc_drop=0.05, tolerance=0.05))
    assert len(fails) == 2 and "10.0% above" in fails[1]


def test_per_pixel_kd_and_ce_by_hand():
    # two pixels, two classes: teacher (0, 0) and (1, 1) -> p = (.5, .5) at both; student
    # (0, ln 3) -> q = (.25, .75) at the first, equal to the teacher's at the second
    t = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]])  # [B=1, C=2, H=1, W=2]
    s = torch.tensor([[[[0.0, 5.0]], [[math.log(3), 5.0]]]])
    kl_first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    seg = Segmentation(TaskConfig(kind="segmentation"))
    loss, parts = Objective([KL(temperature=1.0)], task=seg)(s, t, None, 0.0)
    assert float(loss) == pytest.approx(kl_first / 2, rel=1e-5)  # the mean over pixels
    # T = 2: logits halved, times T^2
    q2 = torch.softmax(torch.tensor([0.0, math.log(3) / 2]), 0)
    assert float(Objective([KL(temperature=2.0)], task=seg)(s, t, None, 0.0)[0]) == pytest.approx(
        4 * float((0.5 * (0.5 / q2).log()).sum()) / 2, rel=1e-5)
    # per-pixel CE: the ignored pixel (255) is left out
    y = torch.tensor([[[1, 255]]])
    ce = float(Objective([CE()], task=seg)(s, t, y, 0.0)[0])
    assert ce == pytest.approx(-math.log(0.75), rel=1e-5)


def test_regression_supervised_loss():
    s, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert float(Objective([MSE()], task=Regression())(s, None, y, 0.0)[0]) == pytest.approx(2.5)


# -- config rules ---------------------------------------------------------------------------

def write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def base(task: str, **over) -> dict:
    cfg = {"name": "t", "task": task, "data": {"dataset": f"calib.task_data:shapes_{task}"},
           "teacher": {"model": "resnet_tiny", "train": {"epochs": 1}}, "student": {"model": "resnet_tiny"},
           "stages": [{"kind": "distill"}]}
    cfg.update(over)
    return cfg


def test_invalid_objective_for_task_is_one_line(tmp_path):
    cfg = base("regression", stages=[{"kind": "distill", "loss": [{"kind": "mse"}, {"kind": "kl"}]}])
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg))
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "1 error" in lines[0]
    assert lines[1].strip().startswith("stages.0.loss.1.kind: kl does not apply to task regression")
    # the teacher's loss too, and augmentation asked for explicitly
    cfg = base("segmentation", teacher={"model": "resnet_tiny", "train": {"loss": [{"kind": "mse"}], "augment": True}})
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg))
    msg = str(e.value)
    assert "teacher.train.loss.0.kind: mse does not apply to task segmentation" in msg
    assert "teacher.train.augment:" in msg


def test_task_defaults_and_classification_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, base("regression")))
    assert [t.kind for t in cfg.stages[0].loss] == ["mse_logits", "mse"]
    assert [t.kind for t in cfg.teachers[0].train.loss] == ["mse"]
    assert cfg.stages[0].augment is False and cfg.targets[0].parity.tolerance == 0.05
    plain = base("classification", data={"dataset": "synthetic"})
    del plain["task"]
    c = load_config(write(tmp_path, plain))
    dump = c.model_dump()
    assert "task" not in dump and "metric" not in dump and "tolerance" not in dump["targets"][0]["parity"]
    assert c.targets[0].parity.max_acc_drop == 0.005 and c.stages[0].augment is True
    with pytest.raises(ConfigError, match="data.dataset: synthetic is a classification set"):
        load_config(write(tmp_path, base("segmentation", data={"dataset": "synthetic"})))


# -- labels, output shapes, heads -------------------------------------------------------------

def test_label_checks():
    from calib.task_data import shapes_regression, shapes_segmentation
    seg = shapes_segmentation(train_size=16, test_size=16)
    task = make_task(TaskConfig(kind="segmentation"))
    task.check_labels(seg)
    seg.test.labels[0, 0, 0] = 7
    with pytest.raises(UserError, match="test masks hold 7, expected classes 0..2 or ignore_index 255"):
        task.check_labels(seg)
    reg = shapes_regression(train_size=16, test_size=16)
    make_task(TaskConfig(kind="regression")).check_labels(reg)
    reg.train.labels[3, 1] = float("nan")
    with pytest.raises(UserError, match="train labels hold NaN"):
        make_task(TaskConfig(kind="regression")).check_labels(reg)
    reg.train.labels = reg.train.labels[:, :2]
    with pytest.raises(UserError, match=r"expected float \[N, 3\]"):
        make_task(TaskConfig(kind="regression")).check_labels(reg)


def test_output_shape_checked_at_preflight(tmp_path):
    from compress.preflight import preflight
    cfg = load_config(write(tmp_path, base("segmentation", teacher={"model": "segnet_small", "train": {}})))
    with pytest.raises(UserError) as e:
        preflight(cfg)
    assert str(e.value) == ("student.model=resnet_tiny: segmentation outputs of shape (2, 3) for a batch of 2, "
                            "expected (2, 3, 16, 16) (the data has 3 classes)")


class FCN(nn.Module):
    """Logits at half resolution, upsampled after the 1x1 head (FCN-style)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return nn.functional.interpolate(self.head(self.body(x)), scale_factor=2, mode="bilinear")


@pytest.mark.parametrize("model,head", [("segnet_tiny", "head"), ("regressor_tiny", "fc"), (FCN, "head")])
def test_task_heads_found(model, head):
    from compress.classifier import find_classifier
    from compress.models import ZOO
    m = model() if not isinstance(model, str) else ZOO[model](num_classes=3, in_channels=1)
    assert find_classifier(m, (1, 16, 16)) == (head, "traced")


# -- the whole chain -------------------------------------------------------------------------

def chain(task: str, out: Path, teacher: str, student: str, **extra) -> dict:
    return {
        "name": task, "seed": 0, "task": task, **extra,
        "data": {"dataset": f"calib.task_data:shapes_{task}", "batch_size": 32, "eval_batch_size": 64,
                 "calib_samples": 64},
        "teacher": {"model": teacher, "train": {"epochs": 4, "optimizer": "adamw", "lr": 0.01}},
        "student": {"model": student},
        "stages": [{"kind": "distill", "epochs": 3, "lr": 0.01},
                   {"kind": "prune", "ratio": 0.25, "round_to": 4, "epochs": 0.5},
                   {"kind": "quantize", "calib_batches": 2, "epochs": 0.5, "lr": 5e-4}],
        "export": {"stages": ["teacher", "quantize"]},
        "targets": [{"backend": "onnxruntime", "threads": 1}, {"backend": "openvino", "threads": 1}],
        "profile": {"warmup": 0, "max_warmup": 0, "runs": 100, "throughput_batch": 1, "throughput_runs": 1},
        "output": {"dir": str(out)},
    }


def run_chain(tmp_path: Path, cfg: dict) -> dict:
    from compress.pipeline import Pipeline
    return Pipeline(load_config(write(tmp_path, cfg)), log=lambda s: None).run()


def test_segmentation_chain(tmp_path):
    report = run_chain(tmp_path, chain("segmentation", tmp_path / "runs", "segnet_small", "segnet_tiny"))
    stages = {s["name"]: s for s in report["stages"]}
    # predicting background everywhere gives mIoU ~0.27 (one class of three right)
    assert stages["teacher"]["miou"] > 0.6 and stages["distill"]["miou"] > 0.5
    assert stages["prune"]["ignored"]["names"] == ["head"]
    assert report["columns"]["deployments"][:3] == ["miou", "pixel_accuracy", "agreement"]
    rows = {(d["stage"], d["backend"]): d for d in report["deployments"]}
    assert len(rows) == 4
    for (stage, backend), d in rows.items():
        assert d["status"] == "ok", (stage, backend, d["reason"])
        assert d["agreement"] >= 0.98 and d["miou"] > 0.5
        assert abs(d["miou"] - stages[stage]["miou"]) <= 0.01
    manifest = (tmp_path / "runs" / "segmentation" / "03-quantize" / "manifest.json").read_text()
    assert '"per-pixel logits"' in manifest and '"ignore_index": 255' in manifest


def test_regression_chain(tmp_path):
    from calib.task_data import shapes_regression
    data = shapes_regression()
    constant = float(((data.test.labels - data.train.labels.mean(0)) ** 2).mean().sqrt())  # ~0.16
    cfg = chain("regression", tmp_path / "runs", "regressor_small", "regressor_tiny",
                metric="tests.compress.test_tasks:max_error")
    report = run_chain(tmp_path, cfg)
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["teacher"]["rmse"] < 0.8 * constant and stages["quantize"]["rmse"] < 0.8 * constant
    assert stages["prune"]["ignored"]["names"] == ["fc"]
    assert "max_error" in report["columns"]["stages"] and stages["teacher"]["max_error"] > stages["teacher"]["mae"]
    for d in report["deployments"]:
        assert d["status"] == "ok", (d["stage"], d["backend"], d["reason"])
        assert d["agreement"] >= 0.98 and d["rmse"] == pytest.approx(stages[d["stage"]]["rmse"], rel=0.05)
    md = (tmp_path / "runs" / "regression" / "report.md").read_text()
    assert "| RMSE | MAE | agreement | max abs diff | mean abs diff | max_error |" not in md
    assert "| RMSE | MAE | max_error | agreement | max abs diff | mean abs diff |" in md


class Fixed(nn.Module):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def test_ensemble_of_per_pixel_teachers():
    from compress.distill.ensemble import Ensemble
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    out = Ensemble([Fixed(a), Fixed(b)], [1.0, 3.0])(None, "probs", 2.0)
    want = 0.25 * torch.softmax(a / 2, 1) + 0.75 * torch.softmax(b / 2, 1)  # per pixel, over the classes
    assert torch.allclose(torch.softmax(out / 2, 1), want, atol=1e-6)
    assert torch.allclose(Ensemble([Fixed(a), Fixed(b)], [1.0, 3.0])(None, "logits"), 0.25 * a + 0.75 * b)


def test_user_metric_named_when_missing(tmp_path):
    from compress.preflight import preflight
    with pytest.raises(ConfigError, match="metric: 'nocolon': expected 'pkg.module:fn'"):
        load_config(write(tmp_path, base("regression", metric="nocolon")))
    cfg = load_config(write(tmp_path, base("regression", metric="tests.compress.test_tasks:nope")))
    with pytest.raises(UserError, match="metric='tests.compress.test_tasks:nope': module .* has no callable 'nope'"):
        preflight(cfg)
