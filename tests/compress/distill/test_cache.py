import torch

from compress.distill.cache import build_or_load
from compress.distill.ensemble import Ensemble
from compress.distill.objectives import KL, Objective
from compress.models import build_model
from compress.train import TrainConfig, TrainEnv, fit, predict


def teacher(seed):
    torch.manual_seed(seed)
    return build_model("resnet_tiny", 10, 1).eval()


def test_full_cache_round_trips_and_is_keyed_by_teacher(tiny_data, tmp_path):
    t = teacher(0)
    logs = []
    c1 = build_or_load("full", 8, 4.0, t, "tA", "d", tiny_data, tmp_path, 0, torch.device("cpu"), logs.append)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and "tA" in files[0].name and "wrote" in logs[-1]
    ref = torch.from_numpy(predict(t, tiny_data.train, tiny_data))
    idx = torch.tensor([0, 5, 17])
    assert torch.allclose(c1.lookup(idx), ref[idx], atol=1e-2, rtol=1e-2)  # float16 storage
    c2 = build_or_load("full", 8, 4.0, t, "tA", "d", tiny_data, tmp_path, 0, torch.device("cpu"), logs.append)
    assert "reusing" in logs[-1] and torch.equal(c1.lookup(idx), c2.lookup(idx))
    # a different teacher (or data) has another key: never the stale file
    build_or_load("full", 8, 4.0, teacher(1), "tB", "d", tiny_data, tmp_path, 0, torch.device("cpu"), logs.append)
    assert "wrote" in logs[-1] and len(list(tmp_path.iterdir())) == 2


def test_topk_and_sampled_targets(tiny_data, tmp_path):
    t = teacher(0)
    p = torch.softmax(torch.from_numpy(predict(t, tiny_data.train, tiny_data)) / 2.0, 1)
    top = build_or_load("topk", 3, 2.0, t, "t", "d", tiny_data, tmp_path, 0, torch.device("cpu"), print)
    tgt = top.lookup(torch.arange(10))
    assert torch.equal(tgt.index, p[:10].topk(3, 1).indices)
    assert torch.allclose(tgt.prob.sum(1), torch.ones(10), atol=1e-2)
    smp = build_or_load("sampled", 64, 2.0, t, "t", "d", tiny_data, tmp_path, 0, torch.device("cpu"), print)
    tgt = smp.lookup(torch.arange(len(tiny_data.train)))
    # unbiased: per example the weighted counts are a noisy estimate of p (std ~0.04 at
    # k=64); averaged over 2048 examples the noise cancels and no bias is left
    est = torch.zeros_like(p).scatter_add_(1, tgt.index, tgt.prob)
    assert torch.allclose(est.sum(1), torch.ones(len(p)), atol=1e-2)
    assert (est.mean(0) - p.mean(0)).abs().max() < 0.005


def test_sparse_kl_matches_full_kl_gradient_when_k_covers_all_classes(tiny_data, tmp_path):
    t = teacher(0)
    full = build_or_load("full", 10, 4.0, t, "t", "d", tiny_data, tmp_path, 0, torch.device("cpu"), print)
    topk = build_or_load("topk", 10, 4.0, t, "t", "d", tiny_data, tmp_path, 0, torch.device("cpu"), print)
    idx = torch.arange(8)
    grads = []
    for target in (full.lookup(idx), topk.lookup(idx)):
        s = torch.randn(8, 10, generator=torch.Generator().manual_seed(0), requires_grad=True)
        Objective([KL(temperature=4.0)])(s, target, tiny_data.train.labels[idx], 0.0)[0].backward()
        grads.append(s.grad)
    assert torch.allclose(grads[0], grads[1], atol=2e-3)


def test_training_from_cache_skips_the_teacher(tiny_data, tmp_path):
    calls = []
    t = teacher(0)
    t.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))  # images per teacher call
    cfg = TrainConfig(epochs=2, augment=False, loss=[KL()], cache="full")
    s = build_model("resnet_tiny", 10, 1)
    fit(s, tiny_data, cfg, TrainEnv(64, teacher=t, cache_dir=tmp_path, log=lambda m: None))
    assert sum(calls) == len(tiny_data.train)  # one pass over the training images builds the cache
    fit(s, tiny_data, cfg, TrainEnv(64, teacher=t, cache_dir=tmp_path, log=lambda m: None))
    assert sum(calls) == len(tiny_data.train)  # the re-run reads the cache


def test_ensemble_averages_probabilities_or_logits():
    a, b = teacher(0), teacher(1)
    ens = Ensemble([a, b], [3.0, 1.0])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        pa, pb = torch.softmax(a(x), 1), torch.softmax(b(x), 1)
        assert torch.allclose(torch.softmax(ens(x, "probs"), 1), 0.75 * pa + 0.25 * pb, atol=1e-6)
        mix4 = 0.75 * torch.softmax(a(x) / 4, 1) + 0.25 * torch.softmax(b(x) / 4, 1)
        assert torch.allclose(torch.softmax(ens(x, "probs", 4.0) / 4, 1), mix4, atol=1e-6)
        assert torch.allclose(ens(x, "logits"), 0.75 * a(x) + 0.25 * b(x), atol=1e-6)
