import copy

import torch
from torch import nn

from compress import batchnorm
from compress.train import TrainConfig, TrainEnv, fit

QUIET = dict(log=lambda s: None)


def _net(momentum: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_refresh_is_the_cumulative_average_of_batch_statistics():
    """Golden values from the definition (PyTorch's momentum=None: the plain average of each
    batch's mean and unbiased variance), computed on the BatchNorm's inputs directly."""
    net = _net(0.01)
    batches = [torch.randn(16, 1, 6, 6) * (i + 1) + i for i in range(3)]
    with torch.no_grad():
        feats = [net[0](x) for x in batches]
    want_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.transpose(0, 1).reshape(8, -1).var(1, unbiased=True) for f in feats]).mean(0)
    net.eval()
    assert batchnorm.refresh(net, batches, "cpu") == 48
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, want_var, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.01 and not net.training  # settings and mode kept


def test_auto_refreshes_slow_batchnorms_only(tiny_data):
    cfg = dict(epochs=0.25, precision="fp32", augment=False)
    # PyTorch's default momentum: auto changes nothing, bit for bit
    a, b = _net(0.1), _net(0.1)
    fit(a, tiny_data, TrainConfig(**cfg), TrainEnv(64, **QUIET))
    fit(b, tiny_data, TrainConfig(**cfg, bn_refresh="never"), TrainEnv(64, **QUIET))
    assert torch.equal(a[1].running_mean, b[1].running_mean) and torch.equal(a[0].weight, b[0].weight)
    # momentum 0.01: after fit, the statistics are those of the refresh images under the final weights
    slow, stale = _net(0.01), _net(0.01)
    fit(slow, tiny_data, TrainConfig(**cfg), TrainEnv(64, **QUIET))
    fit(stale, tiny_data, TrainConfig(**cfg, bn_refresh="never"), TrainEnv(64, **QUIET))
    assert torch.equal(slow[0].weight, stale[0].weight)  # training itself is unchanged
    again = copy.deepcopy(slow)
    batchnorm.refresh(again, batchnorm.refresh_batches(tiny_data.train.images, tiny_data.normalize, 64, 32, 0)(), "cpu")
    torch.testing.assert_close(slow[1].running_mean, again[1].running_mean)
    assert (slow[1].running_mean - stale[1].running_mean).abs().max() > 1e-3  # the stale ones lag
