import pytest
import torch

from compress.models import build_model
from compress.train import TrainConfig, accuracy, fit, kd_loss, predict


def test_fit_learns_the_synthetic_task(trained_tiny, tiny_data):
    acc = accuracy(predict(trained_tiny, tiny_data.test, tiny_data), tiny_data.test.labels)
    assert acc >= 0.9


def test_kd_loss_zero_for_identical_logits_and_scaled_by_t2():
    a = torch.randn(8, 10)
    assert float(kd_loss(a, a, 4.0)) == pytest.approx(0.0, abs=1e-6)
    b = torch.randn(8, 10)
    raw = torch.nn.functional.kl_div(torch.log_softmax(a / 2, 1), torch.softmax(b / 2, 1),
                                     reduction="batchmean")
    assert float(kd_loss(a, b, 2.0)) == pytest.approx(4 * float(raw), rel=1e-5)


def test_distillation_moves_student_toward_teacher(trained_tiny, tiny_data):
    student = build_model("resnet_tiny", 10, 1)
    before = predict(student, tiny_data.test, tiny_data).argmax(1)
    ref = predict(trained_tiny, tiny_data.test, tiny_data).argmax(1)
    hist = fit(student, tiny_data, TrainConfig(epochs=4, lr=1e-2, augment=False, ce_weight=0.0,
                                               kd_weight=1.0, temperature=2.0), batch_size=64,
               teacher=trained_tiny, log=lambda s: None)
    after = predict(student, tiny_data.test, tiny_data).argmax(1)
    assert (after == ref).mean() > 0.85 > (before == ref).mean()
    assert hist[-1]["kd"] < hist[0]["kd"] and hist[-1]["ce"] > 0


def test_kd_without_teacher_is_an_error(tiny_data):
    with pytest.raises(ValueError, match="kd_weight=0.5 but no teacher"):
        fit(build_model("resnet_tiny", 10, 1), tiny_data, TrainConfig(kd_weight=0.5),
            batch_size=64)


def test_fit_is_seeded(tiny_data):
    outs = []
    for _ in range(2):
        torch.manual_seed(0)  # init; fit seeds shuffling and augmentation itself
        m = build_model("resnet_tiny", 10, 1)
        fit(m, tiny_data, TrainConfig(epochs=0.25, precision="fp32"), batch_size=64, seed=5,
            log=lambda s: None)
        outs.append(predict(m, tiny_data.test, tiny_data))
    assert (outs[0] == outs[1]).all()
