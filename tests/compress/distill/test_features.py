import pytest
import torch

from compress.config_load import load_config
from compress.distill.features import FeatureDistiller, FeatureTerm, attention_map
from compress.distill.objectives import KL
from compress.errors import UserError
from compress.models import build_model
from compress.preflight import preflight
from compress.train import TrainConfig, TrainEnv, fit

X = torch.randn(4, 1, 28, 28)


def models():
    torch.manual_seed(0)
    return build_model("resnet_tiny", 10, 1), build_model("resnet_tiny_teacher", 10, 1)


def test_gradients_reach_only_student_and_adapters():
    student, teacher = models()
    fd = FeatureDistiller([FeatureTerm(student="layers.0", teacher="layers.0", kind="hint"),
                           FeatureTerm(student="layers.1", teacher="layers.1", kind="normalized"),
                           FeatureTerm(student="layers.1.conv1", teacher="layers.1.conv1", kind="attention")],
                          student, teacher, X[:2])
    assert fd.adapters["0"].weight.shape == (16, 8, 1, 1)  # student width 8 -> teacher width 16
    student.train()
    with torch.no_grad():
        teacher(X)
    student(X)
    losses = fd.losses()
    assert set(losses) == {"feat0_hint", "feat1_normalized", "feat2_attention"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.layers[0].conv1.weight.grad.abs().sum() > 0
    assert fd.adapters["0"].weight.grad.abs().sum() > 0
    fd.close()


def test_feature_formulas():
    student, teacher = models()
    fd = FeatureDistiller([FeatureTerm(student="layers.1", teacher="layers.1", kind="normalized"),
                           FeatureTerm(student="layers.1", teacher="layers.1", kind="attention")],
                          student, teacher, X[:2])
    with torch.no_grad():
        s_feat, t_feat = {}, {}
        student.layers[1].register_forward_hook(lambda m, i, o: s_feat.setdefault("x", o))
        teacher.layers[1].register_forward_hook(lambda m, i, o: t_feat.setdefault("x", o))
        student(X)
        teacher(X)
        losses = fd.losses()
        s, t = fd.adapters["0"](s_feat["x"]), t_feat["x"]
        # LAPTOP-Diff: ||s - t||^2 / ||t||^2 per example, averaged
        want = torch.stack([((a - b) ** 2).sum() / (b ** 2).sum() for a, b in zip(s, t)]).mean()
        assert float(losses["feat0_normalized"]) == pytest.approx(float(want), rel=1e-4)
        # attention transfer: || Q_s/|Q_s| - Q_t/|Q_t| ||^2 / (H*W), Q = mean over channels of f^2
        # (averaged over positions as the official at_loss does: issue 15 item 5)
        qs = s_feat["x"].pow(2).mean(1).flatten(1)
        qt = t.pow(2).mean(1).flatten(1)
        want = ((qs / qs.norm(dim=1, keepdim=True) - qt / qt.norm(dim=1, keepdim=True)) ** 2).mean()
        assert float(losses["feat1_attention"]) == pytest.approx(float(want), rel=1e-4)
        assert torch.allclose(attention_map(t).norm(dim=1), torch.ones(4))
    fd.close()


def test_hooks_are_removed_after_the_stage(tiny_data):
    student, teacher = models()
    cfg = TrainConfig(epochs=0.1, augment=False, loss=[KL()],
                      features=[FeatureTerm(student="layers.1", teacher="layers.1")])
    fit(student, tiny_data, cfg, TrainEnv(64, teacher=teacher, log=lambda s: None))
    for m in list(student.modules()) + list(teacher.modules()):
        assert not m._forward_hooks
    assert not any("adapter" in k for k in student.state_dict())


def test_unmatched_shapes_fail_naming_both():
    student, teacher = models()
    msg = r"student layers.0 output \(8, 28, 28\) .*teacher layers.1 output \(32, 14, 14\)"
    with pytest.raises(UserError, match=msg):
        FeatureDistiller([FeatureTerm(student="layers.0", teacher="layers.1")], student, teacher, X[:1])


def test_bad_module_name_fails_preflight(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("""
name: t
data: {dataset: synthetic}
teacher: {model: resnet_tiny_teacher, train: {epochs: 1}}
student: {model: resnet_tiny}
stages:
  - kind: distill
    features: [{student: layers.1.conv, teacher: layers.1}]
""")
    msg = r"stages.0.features.0.student: no module named 'layers.1.conv' \(closest: .*layers.1.conv1"
    with pytest.raises(UserError, match=msg):  # checked against the models built for the real data
        preflight(load_config(p))


def test_cache_with_augmentation_is_rejected_with_reason():
    with pytest.raises(ValueError, match="with augment: true they would be stale"):
        TrainConfig(loss=[KL()], cache="full", augment=True)
    with pytest.raises(ValueError, match="need full logits"):
        TrainConfig(loss=[KL(), {"kind": "dkd"}], cache="topk", augment=False)


def test_token_features_get_a_linear_over_channels_never_over_tokens():
    torch.manual_seed(0)
    student, teacher = build_model("vit_tiny", 10, 1), build_model("vit_small", 10, 1)  # width 32 -> 64
    fd = FeatureDistiller([FeatureTerm(student="blocks.1", teacher="blocks.3", kind="hint"),
                           FeatureTerm(student="blocks.0", teacher="blocks.0", kind="attention")],
                          student, teacher, X[:2])
    a = fd.adapters["0"]
    assert isinstance(a, torch.nn.Linear) and a.weight.shape == (64, 32)  # over C; N = 49 tokens stay
    assert "1" not in fd.adapters
    with torch.no_grad():
        s_feat, t_feat = {}, {}
        student.blocks[0].register_forward_hook(lambda m, i, o: s_feat.setdefault("x", o))
        teacher.blocks[0].register_forward_hook(lambda m, i, o: t_feat.setdefault("x", o))
        student(X)
        teacher(X)
        losses = fd.losses()
        # attention over tokens: Q = mean over C of f^2, one value per token, L2-normalized;
        # the squared difference averaged over tokens as the official at_loss (issue 15 item 5)
        qs, qt = s_feat["x"].pow(2).mean(2), t_feat["x"].pow(2).mean(2)
        assert qs.shape == (4, 49)
        want = ((qs / qs.norm(dim=1, keepdim=True) - qt / qt.norm(dim=1, keepdim=True)) ** 2).mean()
        assert float(losses["feat1_attention"]) == pytest.approx(float(want), rel=1e-4)
        assert float(losses["feat0_hint"]) > 0
    fd.close()


def test_attention_on_vectors_is_rejected_naming_both():
    student, teacher = models()
    with pytest.raises(UserError, match=r"features.0: student fc output \(10,\) .*teacher fc output \(10,\): "
                                        r"attention transfer needs a spatial or token map"):
        FeatureDistiller([FeatureTerm(student="fc", teacher="fc", kind="attention")], student, teacher, X[:2])
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))
