import pytest
import torch

from compress.models import build_model
from compress.distill.objectives import KL
from compress.train import TrainConfig, accuracy, fit, predict


def test_fit_learns_the_synthetic_task(trained_tiny, tiny_data):
    acc = accuracy(predict(trained_tiny, tiny_data.test, tiny_data), tiny_data.test.labels)
    assert acc >= 0.9


def test_distillation_moves_student_toward_teacher(trained_tiny, tiny_data):
    student = build_model("resnet_tiny", 10, 1)
    before = predict(student, tiny_data.test, tiny_data).argmax(1)
    ref = predict(trained_tiny, tiny_data.test, tiny_data).argmax(1)
    hist = fit(student, tiny_data, TrainConfig(epochs=4, lr=1e-2, augment=False,
                                               loss=[KL(weight=1.0, temperature=2.0)]), batch_size=64,
               teacher=trained_tiny, log=lambda s: None)
    after = predict(student, tiny_data.test, tiny_data).argmax(1)
    assert (after == ref).mean() > 0.85 > (before == ref).mean()
    assert hist[-1]["kl"] < hist[0]["kl"] and "ce" not in hist[-1]


def test_kd_without_teacher_is_an_error(tiny_data):
    with pytest.raises(ValueError, match=r"the loss uses a teacher \(\['kl'\]"):
        fit(build_model("resnet_tiny", 10, 1), tiny_data, TrainConfig(loss=[KL()]),
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
