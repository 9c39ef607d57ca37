"""Issue 15 item 3: `teacher: self` for the quantize stage (BitDistiller's self-distillation).
The QAT's KD targets are the float model's own outputs (the model the stage received, before
BN merge), or its weighted mix with the run's teacher; a cached self-teacher is keyed by the
float weights; bad uses fail validation in one line naming the field."""
import re

import pytest
import torch
import torch.nn.functional as F

from calib.datasets import synthetic
from compress.distill.ensemble import Ensemble, Members
from compress.distill.teacher import LiveTeacher
from compress.errors import UserError
from compress.models import build_model
from compress.quantize import QuantizeConfig
from compress.quantize.self_teacher import qat_teacher, weights_key
from tests.conftest import make_ctx, run_stage
from tests.test_bad_inputs import base_config, invoke, outcome, write


@pytest.fixture(scope="module")
def data():
    return synthetic(num_classes=10, train_size=192, test_size=64, seed=0)


def net(seed: int) -> torch.nn.Module:
    """resnet_tiny with seeded weights and non-trivial BN statistics (BN merge must not show)."""
    torch.manual_seed(seed)
    m = build_model("resnet_tiny", 10, 1)
    for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x).float()


@pytest.fixture
def captured(monkeypatch):
    """Every (input, target) the live teacher hands the QAT objective."""
    seen = []
    call = LiveTeacher.__call__

    def record(self, x, idx):
        out = call(self, x, idx)
        seen.append((x.detach().clone(), out))
        return out
    monkeypatch.setattr(LiveTeacher, "__call__", record)
    return seen


def quantize(model, ctx, **cfg):
    cfg = {"epochs": 0.2, "augment": False, "calib_batches": 1, **cfg}
    return run_stage("quantize", model, ctx, QuantizeConfig(**cfg))


def test_self_teacher_targets_are_the_float_models_outputs(data, tmp_path, captured):
    student, external = net(0), net(1)
    reference = net(0)  # the float model as the stage receives it: the stage merges BN into its own copy
    ctx = make_ctx(data, external, tmp_path, calib=64)
    res = quantize(student, ctx, teacher="self")
    assert len(captured) == 1 and res.metrics["qat_teacher"] == {"self": 1.0}  # 192 / 64 * 0.2 -> 1 step
    x, target = captured[0]
    assert (target - outputs(reference, x)).abs().max() < 1e-5
    assert (target - outputs(external, x)).abs().max() > 0.1  # not the run's teacher


def test_default_still_distills_from_the_run_teacher(data, tmp_path, captured):
    external = net(1)
    quantize(net(0), make_ctx(data, external, tmp_path, calib=64))
    x, target = captured[0]
    assert (target - outputs(external, x)).abs().max() < 1e-5


def test_mix_averages_probabilities_by_weight_at_each_temperature(data, tmp_path, captured):
    external = net(1)
    ctx = make_ctx(data, external, tmp_path, calib=64)
    quantize(net(0), ctx, teacher={"self": 0.7, "configured": 0.3},
             loss=[{"kind": "kl", "temperature": 4.0, "weight": 1.0}])
    x, target = captured[0]
    assert isinstance(target, Members)
    f, e = outputs(net(0), x), outputs(external, x)
    for t in (1.0, 4.0):  # MEAL V2: t * log(0.7 softmax(f/t) + 0.3 softmax(e/t)), written out here
        want = t * torch.log(0.7 * F.softmax(f / t, 1) + 0.3 * F.softmax(e / t, 1))
        assert (target.at(t) - want).abs().max() < 1e-4, t


def test_mix_with_an_ensemble_run_teacher_is_flattened(data, tmp_path):
    ctx = make_ctx(data, Ensemble([net(1), net(2)], [1.0, 3.0]), tmp_path)
    teacher, key = qat_teacher(net(0), ctx, QuantizeConfig(teacher={"self": 0.6, "configured": 0.4}))
    assert len(teacher.members) == 3 and not any(isinstance(m, Ensemble) for m in teacher.members)
    assert teacher.weights.tolist() == pytest.approx([0.6, 0.1, 0.3])
    assert key.startswith("mix-") and key != ctx.teacher_key
    assert not any(p.requires_grad for p in teacher.members[0].parameters())  # the float model is frozen


def test_cache_is_keyed_by_the_float_weights(data, tmp_path):
    ctx = make_ctx(data, net(1), tmp_path, calib=64)
    logs = []
    ctx.log = logs.append
    cfg = {"teacher": "self", "cache": "full"}
    quantize(net(0), ctx, **cfg)
    quantize(net(2), ctx, **cfg)  # another float model: its own cache
    files = sorted((tmp_path / "cache").glob("teacher-float-*-full.safetensors"))
    assert len(files) == 2
    assert {weights_key(net(0)), weights_key(net(2))} == {re.match(r"teacher-(float-\w+)-", f.name)[1] for f in files}
    from safetensors.torch import load_file
    cached = load_file(str(next(f for f in files if weights_key(net(0)) in f.name)))["logits"].float()
    want = outputs(net(0), data.normalize(data.train.images))
    assert (cached - want).abs().max() < 2e-2 * want.abs().max()  # fp16 storage
    logs.clear()
    quantize(net(0), ctx, **cfg)  # the same float model again: its cache is read, not rebuilt
    assert any("teacher cache: reusing" in line and weights_key(net(0)) in line for line in logs)
    assert len(list((tmp_path / "cache").glob("teacher-*"))) == 2


def test_weights_key_sees_buffers():
    a, b = net(0), net(0)
    assert weights_key(a) == weights_key(b)
    b.layers[0].bn1.running_var.mul_(1.01)  # a buffer, not a parameter: still another float model
    assert weights_key(a) != weights_key(b)


@pytest.mark.parametrize("stage, expect", [
    ({"kind": "distill", "epochs": 1, "teacher": "self"}, "stages.0.teacher"),
    ({"kind": "prune", "epochs": 1, "teacher": "self"}, "stages.0.teacher"),
    ({"kind": "quantize", "epochs": 0, "teacher": "self"}, "stages.0.teacher"),
    ({"kind": "quantize", "epochs": 1, "teacher": "self", "loss": [{"kind": "ce"}]}, "stages.0.teacher"),
    ({"kind": "quantize", "epochs": 1, "teacher": {"self": 0.5, "external": 0.5}}, "stages.0.teacher"),
    ({"kind": "quantize", "epochs": 1, "teacher": {"self": -1}}, "stages.0.teacher"),
    ({"kind": "quantize", "epochs": 1, "teacher": "myself"}, "stages.0.teacher"),
])
def test_validate_rejects_teacher_self_where_it_makes_no_sense(stage, expect, tmp_path):
    cfg = base_config(tmp_path)
    cfg["stages"] = [stage]
    res = invoke(["validate", write(tmp_path, cfg)])
    assert outcome(res, expect) == "clear", res.output


@pytest.mark.parametrize("teacher", ["self", {"self": 0.7, "configured": 0.3}])
def test_validate_accepts_teacher_self_on_quantize(teacher, tmp_path):
    cfg = base_config(tmp_path)
    cfg["stages"] = [{"kind": "distill", "epochs": 1}, {"kind": "quantize", "epochs": 1, "teacher": teacher}]
    res = invoke(["validate", write(tmp_path, cfg)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("teacher, ok", [("self", True), ({"self": 0.5, "configured": 0.5}, True),
                                         ("configured", False)])
def test_feature_names_of_a_self_teacher_are_the_students(teacher, ok, tmp_path):
    """With self in the teacher, feature terms hook the float model: preflight checks their names on
    the student (whose layers.0 the run's vit teacher lacks), as for prune's recovery_teacher: unpruned."""
    from compress.preflight import preflight
    from tests.compress.test_preflight import config
    stage = {"kind": "quantize", "epochs": 1, "teacher": teacher,
             "features": [{"student": "layers.0", "teacher": "layers.0", "kind": "normalized"}]}
    cfg = config(tmp_path, teacher={"model": "vit_tiny", "train": {"epochs": 1}}, stages=[stage])
    if ok:
        preflight(cfg)
        return
    with pytest.raises(UserError) as e:
        preflight(cfg)
    assert str(e.value).startswith("stages.0.features.0") and "layers.0" in str(e.value)
