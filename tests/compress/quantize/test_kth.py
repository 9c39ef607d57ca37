"""The fast k-th value brevitas' percentile statistics use during calibration must give
torch.kthvalue's value exactly, at both tails, with ties (ReLU zeros), and fall back where its
shortcut does not hold (mid k, small tensors, NaN)."""
import math

import pytest
import torch

from compress.quantize.kth import MIN_SIZE, fast_percentiles, kthvalue

N = MIN_SIZE * 2


def tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=g)
    return {"randn": x, "relu": torch.relu(x), "minus relu": -torch.relu(x),
            "integer ties": torch.randint(0, 40, (N,), generator=g).float(),
            "float64": x.double() * 3, "small": x[:1000]}


@pytest.mark.parametrize("name", list(tensors()))
@pytest.mark.parametrize("q", [0.001, 0.01, 99.99, 99.999, 50.0])
def test_kthvalue_is_torchs(name, q):
    x = tensors()[name]
    for k in (max(1, math.ceil(0.01 * q * x.numel())), max(1, int(math.floor(0.01 * q * x.numel() + 0.5)))):
        assert kthvalue(x, k)[0].item() == torch.kthvalue(x, k)[0].item(), (name, q, k)


def test_extremes_and_nan():
    x = tensors()["randn"].clone()
    for k in (1, 2, N - 1, N):
        assert kthvalue(x, k)[0].item() == torch.kthvalue(x, k)[0].item()
    x[123] = float("nan")  # torch orders NaN last: the top value is NaN, and so must ours be
    assert math.isnan(kthvalue(x, N)[0].item()) and math.isnan(torch.kthvalue(x, N)[0].item())
    assert kthvalue(x, 5)[0].item() == torch.kthvalue(x, 5)[0].item()


def test_brevitas_percentile_statistics_unchanged_and_restored():
    from brevitas.core.stats import stats_op
    x = torch.relu(tensors()["randn"]) - 0.1
    stat = stats_op.PercentileInterval(low_percentile_q=0.001, high_percentile_q=99.999)
    want = stat(x)
    saved = stats_op.kthvalue
    with fast_percentiles():
        assert stats_op.kthvalue is kthvalue
        got = stat(x)
    assert stats_op.kthvalue is saved
    assert got.item() == want.item()
