"""Golden values for the objectives against the authors' reference code, re-implemented here
in numpy float64 (never by calling compress's own functions), on the edge cases where a
departure from the reference shows: identical logits, a very peaked teacher, a very
over-confident student, and C up to 50,000 for the sparse caches."""
import numpy as np
import pytest
import torch

from compress.distill import objectives as O


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _xlogy_kl(p, log_p, log_q):  # sum p (log p - log q), 0 where p == 0 (as F.kl_div does)
    return np.where(p > 0, p * (log_p - log_q), 0.0).sum()


# DKD: mdistiller/distillers/DKD.py, dkd_loss, megvii-research/mdistiller commit
# e8c5bb331e78c9d79a8894ca233caae78531cf7f: softmax at T, (target, sum of others) binary
# probabilities, torch.log of the student's, kl_div summed / batch * T^2 (TCKD); the non-target
# distributions are softmax(logits/T - 1000*gt) (NCKD); alpha*TCKD + beta*NCKD. In float64.
def ref_dkd(s, t, y, alpha, beta, temp):
    b, c = s.shape
    gt = np.zeros((b, c), bool)
    gt[np.arange(b), y] = True
    ps, pt = np.exp(_log_softmax(s / temp)), np.exp(_log_softmax(t / temp))
    bs = np.stack([ps[gt], np.where(gt, 0, ps).sum(1)], 1)
    bt = np.stack([pt[gt], np.where(gt, 0, pt).sum(1)], 1)
    tckd = _xlogy_kl(bt, np.log(bt), np.log(bs)) * temp ** 2 / b
    ls2, lt2 = _log_softmax(s / temp - 1000.0 * gt), _log_softmax(t / temp - 1000.0 * gt)
    nckd = _xlogy_kl(np.exp(lt2), lt2, ls2) * temp ** 2 / b
    return alpha * tckd + beta * nckd


def ref_grad(fn, s, idx, h=1e-5):
    """Central finite differences of a float64 reference at the (row, class) entries idx."""
    out = []
    for r, c in idx:
        up, dn = s.copy(), s.copy()
        up[r, c] += h
        dn[r, c] -= h
        out.append((fn(up) - fn(dn)) / (2 * h))
    return np.array(out)


def ours_dkd(s, t, y, term):
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    loss = O.dkd(st, torch.tensor(t, dtype=torch.float32), torch.tensor(y), term, {})
    loss.backward()
    return loss.item(), st.grad.double().numpy()


def _case(c, student_margin, teacher_margin, seed=0):
    rng = np.random.default_rng(seed)
    y = np.array([3, c - 1])
    s, t = rng.normal(size=(2, c)), rng.normal(size=(2, c))
    s[np.arange(2), y] += student_margin
    t[np.arange(2), y] += teacher_margin
    return s, t, y


def test_dkd_identical_logits_zero_loss_zero_gradient():
    s, _, y = _case(100, 3.0, 0.0)
    loss, grad = ours_dkd(s, s.copy(), y, O.DKD(temperature=4.0))
    assert loss == pytest.approx(0.0, abs=1e-6)
    assert np.abs(grad).max() < 1e-6


@pytest.mark.parametrize("temp,c,student_margin,teacher_margin", [
    (4.0, 10, 1.0, 2.0),        # ordinary
    (1.0, 1000, 0.0, 60.0),     # very peaked teacher (its rest mass ~1e-23)
    (1.0, 1000, 40.0, 7.0),     # over-confident student: margin/T = 40 > 27.6 + ln(999) = 34.5
    (2.0, 100, 150.0, 5.0),     # margin/T = 75, far past the old 1e-12 clamp
])
def test_dkd_matches_mdistiller_float64(temp, c, student_margin, teacher_margin):
    s, t, y = _case(c, student_margin, teacher_margin)
    term = O.DKD(temperature=temp, alpha=1.0, beta=8.0)
    loss, grad = ours_dkd(s, t, y, term)
    ref = ref_dkd(s, t, y, 1.0, 8.0, temp)
    assert loss == pytest.approx(ref, rel=1e-4, abs=1e-5)
    idx = [(0, 3), (0, 0), (1, c - 1), (1, 1)]
    want = ref_grad(lambda z: ref_dkd(z, t, y, 1.0, 8.0, temp), s, idx)
    got = np.array([grad[r, k] for r, k in idx])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
    if student_margin / temp > 27.6 + np.log(c - 1):
        # the TCKD pull on the target logit stays: (p_s,y - p_t,y) * T / batch, about 0.5 * T / 2 here
        assert abs(got[0]) > 0.1 and abs(want[0]) > 0.1


# Sparse caches past 32,767 classes (issue 15 item 3): int16 ids wrapped negative. Reference:
# top-k of the float64 softmax at T, renormalised; KD against it is -sum_k p_k log q_{i_k} * T^2
# (Sparse Logit Sampling, arXiv:2503.16870, eq. for the sparse cross-entropy).
class _Split:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)


class _Data:
    def __init__(self, images):
        self.train = _Split(images)

    def normalize(self, x):
        return x


def _big_teacher(c, n, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c))
    hot = np.array([40_000, 49_999, 32_768, 12, 33_000, 45_000])  # ids past int16's range on top
    logits[np.arange(n)[:, None], hot[None, :]] += np.array([30.0, 28.0, 26.0, 24.0, 22.0, 20.0])
    table = torch.tensor(logits, dtype=torch.float32)
    images = torch.arange(n, dtype=torch.float32)[:, None]  # the "image" is its own row number
    return logits, (lambda x: table[x[:, 0].long()]), _Data(images)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_sparse_cache_keeps_class_ids_past_32767(kind, tmp_path):
    from compress.distill.cache import build_or_load
    c, n, k, temp = 50_000, 6, 4, 2.0
    logits, forward, data = _big_teacher(c, n)
    cache = build_or_load(kind, k, temp, forward, "t", "d", data, tmp_path, 0, torch.device("cpu"), lambda s: None)
    tgt = cache.lookup(torch.arange(n))
    assert int(tgt.index.min()) >= 0 and int(tgt.index.max()) < c
    p = np.exp(_log_softmax(logits / temp))
    if kind == "topk":
        want = np.argsort(-p, 1)[:, :k]
        np.testing.assert_array_equal(tgt.index.numpy(), want)
        assert (want > 32_767).sum() >= n  # the ids int16 could not hold
        # KD against the cache at C = 50,000, against the float64 reference
        s = np.random.default_rng(1).normal(size=(n, c))
        pk = np.take_along_axis(p, want, 1)
        pk = pk / pk.sum(1, keepdims=True)
        ref = -(pk * np.take_along_axis(_log_softmax(s / temp), want, 1)).sum(1).mean() * temp ** 2
        got = O.sparse_kl(torch.tensor(s, dtype=torch.float32), tgt, O.KL(temperature=temp)).item()
        assert got == pytest.approx(ref, rel=1e-3)  # float16 stored probabilities
    else:
        # every drawn class has real teacher mass (a wrapped id would land on a near-zero class)
        drawn = np.take_along_axis(p, tgt.index.numpy(), 1)
        assert drawn.min() > 1e-3


def test_sparse_cache_written_with_int16_past_32767_is_rebuilt(tmp_path):
    from compress.checkpoint import save_sealed_tensors
    from compress.distill.cache import build_or_load
    c, n, k, temp = 50_000, 6, 4, 2.0
    logits, forward, data = _big_teacher(c, n)
    path = tmp_path / f"teacher-t-d-topk-k{k}-T{temp:g}.safetensors"
    bad = torch.tensor(np.argsort(-logits, 1)[:, :k]).to(torch.int16)  # the old, wrapped ids
    assert int(bad.min()) < 0
    save_sealed_tensors(path, {"index": bad, "prob": torch.full((n, k), 0.25).half()})
    logs = []
    cache = build_or_load("topk", k, temp, forward, "t", "d", data, tmp_path, 0, torch.device("cpu"), logs.append)
    assert any("rebuilding" in s for s in logs)
    assert int(cache.lookup(torch.arange(n)).index.min()) >= 0


# AT: mdistiller/distillers/AT.py, single_stage_at_loss, megvii-research/mdistiller commit
# e8c5bb331e78c9d79a8894ca233caae78531cf7f (as szagoruyko/attention-transfer's at_loss):
# at(f) = normalize(f^p .mean(1) .flatten), loss = (at_s - at_t)^2 .mean() over batch AND positions, p=2.
def ref_at(fs, ft):
    def at(f):
        q = (f ** 2).mean(1).reshape(f.shape[0], -1)
        return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return ((at(fs) - at(ft)) ** 2).mean()


def _at_loss(student, teacher, x):
    from compress.distill.features import FeatureDistiller, FeatureTerm
    fd = FeatureDistiller([FeatureTerm(student="0", teacher="0", kind="attention")], student, teacher, x[:1])
    with torch.no_grad():
        teacher(x)
    student(x)
    loss = fd.losses()["feat0_attention"]
    fd.close()
    return loss


@pytest.mark.parametrize("size", [7, 28])
def test_attention_transfer_matches_mdistiller(size):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1))
    x = torch.randn(3, 1, size, size)
    loss = _at_loss(student, teacher, x)
    with torch.no_grad():
        ref = ref_at(student[0](x).double().numpy(), teacher[0](x).double().numpy())
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    assert ref < 2.0 / size ** 2 + 1e-12  # unit maps: the per-position mean is at most 4 / (H*W)


def test_attention_transfer_identical_features_zero_loss_zero_gradient():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1))
    teacher.load_state_dict(student.state_dict())
    loss = _at_loss(student, teacher, torch.randn(2, 1, 14, 14))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert student[0].weight.grad.abs().max() < 1e-8


# mse_logits: Ba & Caruana 2014 ("Do deep nets need to be deep?"), eq. 1:
# L = 1/(2T) sum_t ||g(x_t) - z_t||_2^2 over the T training cases (no reference code published).
def test_mse_logits_is_ba_caruana_at_c1000_and_per_pixel():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 1000)), rng.normal(size=(4, 1000))
    ref = 0.5 * ((s - t) ** 2).sum(1).mean()
    got = O.mse_logits(torch.tensor(s), torch.tensor(t), None, O.MSELogits(), {}).item()
    assert got == pytest.approx(ref, rel=1e-9)
    assert got == pytest.approx(500 * ((s - t) ** 2).mean(), rel=1e-9)  # C/2 times the element-wise MSE
    s4, t4 = rng.normal(size=(2, 5, 3, 3)), rng.normal(size=(2, 5, 3, 3))
    ref4 = 0.5 * ((s4 - t4) ** 2).sum(1).mean()  # per pixel: classes on dim 1
    assert O.mse_logits(torch.tensor(s4), torch.tensor(t4), None, O.MSELogits(), {}).item() == pytest.approx(ref4)
    same = torch.tensor(s, requires_grad=True)
    loss = O.mse_logits(same, torch.tensor(s), None, O.MSELogits(), {})
    loss.backward()
    assert loss.item() == 0.0 and same.grad.abs().max() == 0.0


# normalized: LAPTOP-Diff (Zhang et al. 2024, arXiv:2404.11098) output-normalized feature loss,
# ||f_s - f_t||^2 / ||f_t||^2 per example, averaged; after block removal the student's blocks
# have the teacher's widths and are compared directly (no adapter).
def _normalized(student, teacher, x):
    from compress.distill.features import FeatureDistiller, FeatureTerm
    fd = FeatureDistiller([FeatureTerm(student="0", teacher="0", kind="normalized")], student, teacher, x[:1])
    with torch.no_grad():
        teacher(x)
    student(x)
    loss = fd.losses()["feat0_normalized"]
    n_adapters = len(fd.adapters)
    fd.close()
    return loss, n_adapters


def test_normalized_matching_shapes_have_no_adapter_identical_features_cost_zero():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1))
    teacher.load_state_dict(student.state_dict())
    x = torch.randn(2, 1, 8, 8)
    loss, n = _normalized(student, teacher, x)
    loss.backward()
    assert n == 0 and loss.item() == pytest.approx(0.0, abs=1e-10)  # was ~1.1 through a random adapter
    assert student[0].weight.grad.abs().max() < 1e-8
    torch.nn.init.normal_(teacher[0].weight)
    student.zero_grad()
    loss, _ = _normalized(student, teacher, x)
    with torch.no_grad():
        fs, ft = student[0](x).double().numpy(), teacher[0](x).double().numpy()
    ref = np.mean([((a - b) ** 2).sum() / (b ** 2).sum() for a, b in zip(fs, ft)])
    assert loss.item() == pytest.approx(ref, rel=1e-4)


# Ensembles: MEAL V2 (Shen & Savvides 2020) averages the teachers' softmax probabilities; each
# term's target is that average at the term's own temperature: p_T = sum_i w_i softmax(z_i / T).
def test_ensemble_averaged_at_each_terms_temperature():
    from compress.distill.ensemble import Ensemble
    torch.manual_seed(0)
    members = [torch.nn.Linear(6, 10), torch.nn.Linear(6, 10)]
    ens = Ensemble(members, [1.0, 3.0])
    x, y = torch.randn(5, 6), torch.tensor([0, 3, 9, 2, 2])
    s = np.random.default_rng(0).normal(size=(5, 10))
    terms = [O.KL(temperature=1.0), O.KL(temperature=4.0), O.DKD(temperature=2.0), O.MSELogits()]
    with torch.no_grad():
        t = ens(x, "members", 4.0)
        z = [m(x).double().numpy() for m in members]
    _, parts = O.Objective(terms)(torch.tensor(s, dtype=torch.float32), t, y, 0.0)

    def avg(temp):
        return 0.25 * np.exp(_log_softmax(z[0] / temp)) + 0.75 * np.exp(_log_softmax(z[1] / temp))

    for name, temp in (("kl", 1.0), ("kl1", 4.0)):
        p = avg(temp)
        ref = (p * (np.log(p) - _log_softmax(s / temp))).sum(1).mean() * temp ** 2
        assert parts[name].item() == pytest.approx(ref, rel=1e-4)
    ref = ref_dkd(s, 2.0 * np.log(avg(2.0)), y.numpy(), 1.0, 8.0, 2.0)
    assert parts["dkd"].item() == pytest.approx(ref, rel=1e-4)
    # no temperature of its own: the average at the stage's KD temperature (4), as before
    ref = 0.5 * ((s - 4.0 * np.log(avg(4.0))) ** 2).sum(1).mean()
    assert parts["mse_logits"].item() == pytest.approx(ref, rel=1e-4)


# js: GKD (Agarwal et al. 2024, arXiv:2306.13649, eq. 1), generalized JSD with mixture
# M = beta*P + (1-beta)*Q; reference code: huggingface/trl, trl/trainer/gkd_trainer.py,
# generalized_jsd_loss (commit a9fa292c2d1df64c6f0189ebe32d37b46ce64438): temperature divides
# the logits, beta*KL(P_teacher || M) + (1-beta)*KL(P_student || M), batch mean, no T^2 factor.
def _gkd_jsd(s, t, beta, temp):
    log_q, log_p = _log_softmax(s / temp), _log_softmax(t / temp)
    p, q = np.exp(log_p), np.exp(log_q)
    log_m = np.log(beta * p + (1 - beta) * q)
    return (beta * _xlogy_kl(p, log_p, log_m) + (1 - beta) * _xlogy_kl(q, log_q, log_m)) / s.shape[0]


@pytest.mark.parametrize("beta,temp", [(0.5, 1.0), (0.1, 4.0), (0.9, 2.0)])
def test_js_matches_gkd_and_t_squared_is_our_convention(beta, temp):
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(6, 10)) * 3, rng.normal(size=(6, 10)) * 3
    t[0, 2] += 40.0  # a very peaked teacher
    ref = _gkd_jsd(s, t, beta, temp)
    paper = O.JS(beta=beta, temperature=temp, t_squared=False)
    got = O.js(torch.tensor(s), torch.tensor(t), None, paper, {}).item()
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
    ours = O.js(torch.tensor(s), torch.tensor(t), None, O.JS(beta=beta, temperature=temp), {}).item()
    assert ours == pytest.approx(ref * temp * temp, rel=1e-9, abs=1e-12)
    same = torch.tensor(s, requires_grad=True)
    loss = O.js(same, torch.tensor(s), None, paper, {})
    loss.backward()
    assert abs(loss.item()) < 1e-12 and same.grad.abs().max() < 1e-12
