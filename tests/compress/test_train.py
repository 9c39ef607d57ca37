import pytest
import torch
from torch.utils.data import DistributedSampler

from compress.distill.objectives import KL
from compress.models import build_model
from compress.train import TrainConfig, TrainEnv, accuracy, fit, predict

QUIET = dict(log=lambda s: None)


def test_fit_learns_the_synthetic_task(trained_tiny, tiny_data):
    acc = accuracy(predict(trained_tiny, tiny_data.test, tiny_data), tiny_data.test.labels)
    assert acc >= 0.9


def test_distillation_moves_student_toward_teacher(trained_tiny, tiny_data):
    student = build_model("resnet_tiny", 10, 1)
    before = predict(student, tiny_data.test, tiny_data).argmax(1)
    ref = predict(trained_tiny, tiny_data.test, tiny_data).argmax(1)
    hist = fit(student, tiny_data, TrainConfig(epochs=4, lr=1e-2, augment=False,
                                               loss=[KL(weight=1.0, temperature=2.0)]),
               TrainEnv(64, teacher=trained_tiny, **QUIET))
    after = predict(student, tiny_data.test, tiny_data).argmax(1)
    assert (after == ref).mean() > 0.85 > (before == ref).mean()
    assert hist[-1]["kl"] < hist[0]["kl"] and "ce" not in hist[-1]


def test_kd_without_teacher_is_an_error(tiny_data):
    with pytest.raises(ValueError, match=r"the loss uses a teacher \(\['kl'\]"):
        fit(build_model("resnet_tiny", 10, 1), tiny_data, TrainConfig(loss=[KL()]), TrainEnv(64))


def test_fit_is_seeded(tiny_data):
    outs = []
    for _ in range(2):
        torch.manual_seed(0)  # init; fit seeds shuffling and augmentation itself
        m = build_model("resnet_tiny", 10, 1)
        fit(m, tiny_data, TrainConfig(epochs=0.25, precision="fp32"), TrainEnv(64, seed=5, **QUIET))
        outs.append(predict(m, tiny_data.test, tiny_data))
    assert (outs[0] == outs[1]).all()


class Recorder:
    """A callback from outside the package: no base class, only some hooks."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def on_epoch_start(self, state):
        self.calls.append(("epoch", state.epoch))

    def on_step_end(self, state):
        self.calls.append(("step", state.step))
        if state.step == self.fail_at:
            raise RuntimeError("stop")

    def on_epoch_end(self, state):
        self.calls.append(("end", state.row["epoch"], "val_accuracy" in state.row))

    def on_train_end(self, state):
        self.calls.append(("done", state.step))


def test_callbacks_see_every_step_and_epoch(tiny_data):
    rec = Recorder()
    hist = fit(build_model("resnet_tiny", 10, 1), tiny_data, TrainConfig(epochs=1.25),
               TrainEnv(256, callbacks=[rec], **QUIET))  # 8 steps per epoch: 8 + 2
    steps = [("step", i) for i in range(1, 11)]
    # user callbacks run before the reporting ones: the row exists, val_accuracy not yet
    assert rec.calls == ([("epoch", 0)] + steps[:8] + [("end", 1, False), ("epoch", 1)] + steps[8:]
                         + [("end", 2, False), ("done", 10)])
    assert [h["steps"] for h in hist] == [8, 2]


def test_train_end_runs_after_a_failure_and_the_model_is_restored(tiny_data):
    rec, m = Recorder(fail_at=3), build_model("resnet_tiny", 10, 1)
    with pytest.raises(RuntimeError, match="stop"):
        fit(m, tiny_data, TrainConfig(epochs=1, channels_last=True), TrainEnv(256, callbacks=[rec], **QUIET))
    assert rec.calls[-1] == ("done", 3)
    assert m.stem[0].weight.is_contiguous()  # channels_last is undone for export


def test_a_distributed_sampler_drops_in(tiny_data):
    """torchrun's sampler through TrainEnv.sampler: this rank's half of the examples, a new
    shuffle each epoch (the loop calls set_epoch)."""
    orders = []

    class Rank0(DistributedSampler):
        def __iter__(self):
            orders.append(list(super().__iter__()))
            return iter(orders[-1])

    env = TrainEnv(128, sampler=lambda n, g: Rank0(range(n), num_replicas=2, rank=0, seed=7, drop_last=True), **QUIET)
    hist = fit(build_model("resnet_tiny", 10, 1), tiny_data, TrainConfig(epochs=2), env)
    n = len(tiny_data.train)
    assert [h["steps"] for h in hist] == [n // 2 // 128] * 2
    assert len(orders) == 2 and len(orders[0]) == n // 2 and orders[0] != orders[1]
