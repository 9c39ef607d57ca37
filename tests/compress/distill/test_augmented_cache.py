"""The augmented teacher cache (FKD): R stored views per image, one replayed per epoch, and
ensemble caches that give every loss term the teachers' average at its own temperature."""
import dataclasses
import signal

import pytest
import torch

from compress import train_state
from compress.distill import cache as C
from compress.distill.ensemble import Ensemble, Members
from compress.distill.objectives import CE, DKD, KL, MSELogits, Objective
from compress.models import build_model
from compress.tasks import TaskConfig, _rule_errors, make_task
from compress.train import TrainConfig, TrainEnv, fit

CPU = torch.device("cpu")


def teacher(seed):
    torch.manual_seed(seed)
    return build_model("resnet_tiny", 10, 1).eval()


@pytest.fixture
def small(tiny_data):
    return dataclasses.replace(tiny_data, train=tiny_data.train.subset(torch.arange(256)))


def build(data, path, forward, views=3, targets="full", k=3, temperature=2.0, seed=0, log=lambda s: None, **kw):
    return C.build_or_load("augmented", k, temperature, forward, "t", "d", data, path, seed, CPU, log,
                           views=views, targets=targets, **kw)


def test_shift_flip_moves_a_pixel_where_the_hand_computed_crop_puts_it():
    x = torch.zeros(4, 1, 6, 6, dtype=torch.uint8)
    x[:, 0, 1, 1] = 255  # padded by 2: the pixel sits at (3, 3); the crop at (dy, dx) moves it to (3-dy, 3-dx)
    out = C.shift_flip(x, torch.tensor([0, 0, 1, 4]), torch.tensor([0, 0, 3, 4]), torch.tensor([0, 1, 0, 0]))
    where = [tuple(torch.nonzero(o[0]).flatten().tolist()) for o in out]
    assert where == [(3, 3), (3, 2), (2, 0), ()]  # mirrored: column 5-3; the last shifted out of the frame


def test_replaying_a_view_gives_the_image_the_teacher_saw(small, tmp_path):
    t = teacher(0)
    full = build(small, tmp_path, t, views=3, targets="full")
    top = build(small, tmp_path, t, views=3, targets="topk", k=3, temperature=2.0)
    images, idx = small.train.images, torch.arange(0, 256, 5)
    seen = []
    for epoch in range(3):
        full.epoch = top.epoch = epoch
        x = full.replay(images[idx], idx)
        assert torch.equal(x, top.replay(images[idx], idx))  # same seed: the same views
        with torch.no_grad():
            ref = t(small.normalize(x))
        assert torch.allclose(full(None, idx), ref, atol=2e-2, rtol=1e-2)  # float16 storage
        sparse = top(None, idx)
        p = torch.softmax(ref / 2.0, 1).topk(3, 1)
        assert torch.equal(sparse.index, p.indices)
        assert torch.allclose(sparse.prob, p.values / p.values.sum(1, keepdim=True), atol=2e-3)
        seen.append(x)
    # real augmentation: views differ from the image and from epoch to epoch
    assert not torch.equal(seen[0], images[idx]) and not torch.equal(seen[0], seen[1])
    v = full.t
    assert set(v["dy"].unique().tolist()) == {0, 1, 2, 3, 4} and 0.4 < v["flip"].float().mean() < 0.6
    assert full.epoch == 2 and torch.equal(full.views(idx), (2 + idx) % 3)


def test_size_is_what_the_docstring_states(small, tmp_path):
    n, r, k = len(small.train), 4, 3
    top = build(small, tmp_path, teacher(0), views=r, targets="topk", k=k)
    assert sum(x.nbytes for x in top.t.values()) == n * r * (k * 4 + 3)  # int16 id + fp16 prob, 3 B of view
    full = build(small, tmp_path, teacher(0), views=r, targets="full")
    assert sum(x.nbytes for x in full.t.values()) == n * r * (2 * 10 + 3)


def test_the_file_name_changes_with_every_setting_that_changes_the_views_or_targets(monkeypatch):
    base = dict(kind="augmented", k=8, temperature=4.0, teacher_key="t", data_key="d", seed=0, views=8,
                targets="topk")
    changes = [dict(views=4), dict(targets="sampled"), dict(targets="full"), dict(k=4), dict(temperature=2.0),
               dict(seed=1), dict(teacher_key="u"), dict(data_key="e"), dict(kind="topk")]
    names = [C.cache_name(**base)] + [C.cache_name(**{**base, **c}) for c in changes]
    assert len(set(names)) == len(names)
    assert C.cache_name(**{**base, "targets": "full"}) == C.cache_name(**{**base, "targets": "full", "k": 3})
    monkeypatch.setattr(C, "AUGMENT", "shift3flip")  # another augmentation: another file
    assert C.cache_name(**base) not in names


def test_changed_views_build_a_new_file_and_a_damaged_one_is_rebuilt_with_one_line(small, tmp_path):
    t, logs = teacher(0), []
    first = build(small, tmp_path, t, views=2, log=logs.append).t
    build(small, tmp_path, t, views=3, log=logs.append)
    assert sum("wrote" in s for s in logs) == 2 and len(list(tmp_path.iterdir())) == 2
    path = next(tmp_path.glob("*-r2-*"))
    path.write_bytes(path.read_bytes()[:-11])  # truncated
    logs.clear()
    again = build(small, tmp_path, t, views=2, log=logs.append).t
    assert [s for s in logs if "building it again" in s] == [f"  teacher cache: {path.name} is unreadable "
                                                             f"(SafetensorError): building it again"]
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_config_rules():
    with pytest.raises(ValueError, match="cache: augmented"):
        TrainConfig(loss=[KL()], cache="topk")  # augment: true by default
    with pytest.raises(ValueError, match="with augment: false use cache: full"):
        TrainConfig(loss=[KL()], cache="augmented", augment=False)
    with pytest.raises(ValueError, match=r"cache_targets: topk keeps 8 .* \['dkd'\] need full logits \(use "
                                         r"cache_targets: full\)"):
        TrainConfig(loss=[DKD()], cache="augmented")
    assert TrainConfig(loss=[DKD(), KL(temperature=1.0)], cache="augmented", cache_targets="full").replays_views
    assert not TrainConfig(loss=[CE()], cache="augmented").replays_views  # no teacher: augment_batch as ever
    seg = make_task(TaskConfig(kind="segmentation"))
    errs = _rule_errors(seg, ("stages", 0), TrainConfig(loss=[KL()], cache="augmented"))
    assert any(loc[-1] == "cache" and "classification only" in msg for loc, msg in errs)


def _fit(data, t, tmp_path, epochs=3, callbacks=()):
    torch.manual_seed(1)
    s = build_model("resnet_tiny", 10, 1)
    cfg = TrainConfig(epochs=epochs, loss=[KL(temperature=2.0), CE(weight=0.1)], cache="augmented", cache_views=2,
                      cache_k=3, precision="fp32")
    fit(s, data, cfg, TrainEnv(32, teacher=t, cache_dir=tmp_path, seed=3, log=lambda m: None,
                               callbacks=list(callbacks)))
    return s


def test_training_replays_the_view_whose_targets_it_reads_and_never_runs_the_teacher(small, tmp_path, monkeypatch):
    t, calls, views = teacher(0), [], {}
    t.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))  # images per teacher call
    real = C.AugmentedCache.__call__

    def check(self, x, idx):  # the student's input is the stored view whose targets are returned
        v = self.views(idx)
        want = small.normalize(C.shift_flip(small.train.images[idx], self.t["dy"][idx, v], self.t["dx"][idx, v],
                                            self.t["flip"][idx, v]))
        assert torch.equal(x.contiguous(), want)
        views.setdefault(self.epoch, {}).update(zip(idx.tolist(), v.tolist()))
        return real(self, x, idx)

    monkeypatch.setattr(C.AugmentedCache, "__call__", check)
    _fit(small, t, tmp_path)
    assert sum(calls) == 2 * 256  # the build: 2 views of the 256 images; training itself never runs the teacher
    assert sorted(views) == [0, 1, 2]
    assert all(views[e][i] == (e + i) % 2 for e in views for i in views[e])  # every view once per R epochs
    _fit(small, t, tmp_path, epochs=1)
    assert sum(calls) == 2 * 256  # the re-run reads the cache


class _Stop:
    """Asks the run to stop after step `at` (as SIGTERM would): a checkpoint inside an epoch."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, state):
        if state.step == self.at:
            train_state._scope.signal = signal.SIGTERM


def test_an_interrupted_fit_resumes_bit_identical(small, tmp_path):
    t = teacher(0)
    whole = _fit(small, t, tmp_path / "c")
    with train_state.stage_checkpoints(tmp_path / "s", "h", "distill", lambda m: None):
        with pytest.raises(SystemExit):
            _fit(small, t, tmp_path / "c", callbacks=[_Stop(13)])  # 8 steps an epoch: inside epoch 2
    assert torch.load(tmp_path / "s" / ".resume" / "fit-0.pt", weights_only=True)["step"] == 13
    with train_state.stage_checkpoints(tmp_path / "s", "h", "distill", lambda m: None):
        resumed = _fit(small, t, tmp_path / "c")
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ensemble_caches_give_each_term_the_average_at_its_own_temperature(small, tmp_path):
    ens = Ensemble([teacher(0), teacher(1)], [1.0, 3.0])
    idx = torch.arange(0, 256, 9)
    terms = [KL(temperature=1.0), KL(temperature=4.0), DKD(temperature=2.0), MSELogits()]
    y = small.train.labels[idx]
    s = torch.randn(len(idx), 10, generator=torch.Generator().manual_seed(0))
    members = lambda x: ens(x, "members").logits.transpose(0, 1)  # noqa: E731  as compress.distill.teacher
    plain = C.build_or_load("full", 8, 4.0, members, "e", "d", small, tmp_path, 0, CPU, lambda m: None,
                            weights=ens.weights)
    aug = build(small, tmp_path, members, views=2, targets="full", temperature=4.0, weights=ens.weights)
    aug.epoch = 1
    for cache, x in ((plain, small.train.images[idx]), (aug, aug.replay(small.train.images[idx], idx))):
        got = cache(None, idx)
        assert isinstance(got, Members) and got.temperature == 4.0
        with torch.no_grad():
            live = ens(small.normalize(x), "members", 4.0)
        cached, ref = Objective(terms)(s, got, y, 0.0)[1], Objective(terms)(s, live, y, 0.0)[1]
        for name in ("kl", "kl1", "dkd", "mse_logits"):
            assert cached[name].item() == pytest.approx(ref[name].item(), rel=5e-3), name


def test_cached_targets_go_to_the_students_device():
    """On CUDA the objective got cpu targets beside cuda outputs; `meta` stands in for another device."""
    from compress.distill.cache import SparseTarget, TeacherCache
    from compress.distill.ensemble import Members
    idx, x = torch.tensor([0, 2]), torch.empty(2, 1, 4, 4, device="meta")
    full = TeacherCache("full", {"logits": torch.randn(3, 5).half()})(x, idx)
    assert full.device.type == "meta" and full.dtype == torch.float32
    sparse = TeacherCache("topk", {"index": torch.zeros(3, 2, dtype=torch.int16), "prob": torch.rand(3, 2)})(x, idx)
    assert isinstance(sparse, SparseTarget) and sparse.index.device.type == sparse.prob.device.type == "meta"
    members = TeacherCache("full", {"members": torch.randn(3, 2, 5), "weights": torch.tensor([0.5, 0.5])})(x, idx)
    assert isinstance(members, Members) and members.logits.device.type == "meta"
