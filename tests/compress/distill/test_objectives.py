"""Golden values: each objective on fixed tensors against the paper's formula written out
by hand here (plain Python math, not the implementation's code path)."""
import math

import pytest
import torch
import torch.nn.functional as F

from compress.distill import objectives as O

S = torch.tensor([[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]])
T = torch.tensor([[2.0, 0.5, 1.0], [0.0, 0.5, 2.5]])
Y = torch.tensor([0, 2])


def softmax(row, temp=1.0):
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def kl_rows(p_rows, q_rows):  # mean over rows of sum_i p_i log(p_i / q_i)
    return sum(sum(p * math.log(p / q) for p, q in zip(pr, qr))
               for pr, qr in zip(p_rows, q_rows)) / len(p_rows)


def probs(x, temp=1.0):
    return [softmax(r, temp) for r in x.tolist()]


def call(term, s=S, t=T, y=Y, state=None):
    return float(O.FUNCTIONS[term.kind](s, t, y, term, state if state is not None else {}))


def test_kl_at_t1_equals_torch_kl():
    ref = F.kl_div(F.log_softmax(S, 1), F.softmax(T, 1), reduction="batchmean")
    assert call(O.KL(temperature=1.0)) == pytest.approx(float(ref), rel=1e-6)


def test_kl_hinton():  # KL(p_t^T || p_s^T) * T^2
    assert call(O.KL(temperature=2.0)) == pytest.approx(kl_rows(probs(T, 2), probs(S, 2)) * 4, rel=1e-5)


def test_reverse_kl():  # KL(p_s^T || p_t^T) * T^2
    assert call(O.ReverseKL(temperature=2.0)) == pytest.approx(kl_rows(probs(S, 2), probs(T, 2)) * 4, rel=1e-5)


def test_js():  # (KL(p||m) + KL(q||m)) / 2 * T^2, m = (p + q) / 2
    p, q = probs(T, 3), probs(S, 3)
    m = [[(a + b) / 2 for a, b in zip(pr, qr)] for pr, qr in zip(p, q)]
    want = 0.5 * (kl_rows(p, m) + kl_rows(q, m)) * 9
    assert call(O.JS(temperature=3.0)) == pytest.approx(want, rel=1e-5)


def test_mse_logits():
    sq = sum((a - b) ** 2 for ra, rb in zip(S.tolist(), T.tolist()) for a, b in zip(ra, rb))
    # Ba & Caruana eq. 1: 1/2 * sum over classes, mean over the 2 examples (issue 15 item 6)
    assert call(O.MSELogits()) == pytest.approx(sq / 2 / 2, rel=1e-6)
    assert call(O.MSELogits(reduction="mean")) == pytest.approx(sq / 6, rel=1e-6)  # element-wise MSE


def test_cakld_fixed_and_teacher_confidence():
    p, q = probs(T), probs(S)
    fkl, rkl = kl_rows(p, q), kl_rows(q, p)
    assert call(O.CAKLD(confidence=0.25)) == pytest.approx(0.25 * rkl + 0.75 * fkl, rel=1e-5)
    gamma = (p[0][0] + p[1][2]) / 2  # teacher probability of the true labels (0 and 2)
    state = {}
    assert call(O.CAKLD(), state=state) == pytest.approx(gamma * rkl + (1 - gamma) * fkl, rel=1e-5)
    assert state["gamma"] == pytest.approx(gamma, rel=1e-6)


def test_taid_target_and_schedule():
    c = O.TAID(t_start=0.4, t_end=1.0, alpha=0.1)
    mix = [[0.6 * a + 0.4 * b for a, b in zip(ra, rb)] for ra, rb in zip(S.tolist(), T.tolist())]
    state = {"progress": 0.0}
    assert call(c, state=state) == pytest.approx(kl_rows([softmax(r) for r in mix], probs(S)), rel=1e-5)
    ts = [state["t"]]
    for i, s in enumerate([S * 0.9, S * 0.8, S * 0.5, T * 0.99]):  # the student moves toward T
        state["progress"] = (i + 1) / 5
        call(c, s=s, state=state)
        ts.append(state["t"])
    assert all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] <= 1.0
    assert ts[-1] >= 0.4 + 0.6 * 4 / 5 - 1e-9  # never behind the linear floor


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist():  # beta * (1 - rho) over classes per example + gamma * (1 - rho) over the batch per class
    ps, pt = probs(S), probs(T)
    inter = sum(1 - pearson(a, b) for a, b in zip(ps, pt)) / 2
    intra = sum(1 - pearson([r[c] for r in ps], [r[c] for r in pt]) for c in range(3)) / 3
    assert call(O.DIST(inter=1.0, intra=2.0)) == pytest.approx(inter + 2 * intra, rel=1e-4)


def test_dkd():
    temp, alpha, beta = 2.0, 1.0, 8.0
    total = 0.0
    for srow, trow, y in zip(S.tolist(), T.tolist(), Y.tolist()):
        ps, pt = softmax(srow, temp), softmax(trow, temp)
        tckd = kl_rows([[pt[y], 1 - pt[y]]], [[ps[y], 1 - ps[y]]])
        nts = softmax([v for i, v in enumerate(srow) if i != y], temp)
        ntt = softmax([v for i, v in enumerate(trow) if i != y], temp)
        total += (alpha * tckd + beta * kl_rows([ntt], [nts])) * temp * temp
    assert call(O.DKD(temperature=temp, alpha=alpha, beta=beta)) == pytest.approx(total / 2, rel=1e-4)


@pytest.mark.parametrize("term", [O.KL(), O.ReverseKL(), O.JS(), O.MSELogits(), O.CAKLD(),
                                  O.TAID(), O.DIST(), O.DKD()], ids=lambda t: t.kind)
def test_zero_when_student_equals_teacher(term):
    assert call(term, s=T.clone(), t=T) == pytest.approx(0.0, abs=1e-5)


def test_objective_sums_weighted_terms_and_reports_parts():
    obj = O.Objective([O.KL(weight=0.9, temperature=4.0), O.CE(weight=0.1)])
    total, parts = obj(S, T, Y, 0.0)
    assert set(parts) == {"kl", "ce"}
    assert float(total) == pytest.approx(0.9 * float(parts["kl"]) + 0.1 * float(parts["ce"]), rel=1e-6)
    assert float(parts["ce"]) == pytest.approx(float(F.cross_entropy(S, Y)), rel=1e-6)
