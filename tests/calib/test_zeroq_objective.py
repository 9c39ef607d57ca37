"""ZeroQ's objective (Cai et al., CVPR 2020, eq. 2) golden values: computed by hand from the
equation on tiny hand-built inputs, and against a transcription of the authors' loss code,
amirgholami/ZeroQ classification/distill_data.py (getDistilData, own_loss), commit
9715739b8731a44d064901b50260aeebbe9a10bc."""
import math

import pytest
import torch
from torch import nn

from calib.synthetic import SynthesisConfig, bn_distance, round_robin, synthesize

EPS = 1e-6  # distill_data.py's eps, in sqrt(var + eps) on both sides


def bn(c, mean, var, cls=nn.BatchNorm2d):
    m = cls(c).double()
    m.running_mean.copy_(torch.as_tensor(mean, dtype=torch.float64))
    m.running_var.copy_(torch.as_tensor(var, dtype=torch.float64))
    return m


def test_flat_plus_minus_one_images_are_not_a_perfect_score():
    # one BN (running mean 0, var 1) directly on the input; image 0 all +1, image 1 all -1.
    # The batch has mean 0 and (biased) variance 1, so matching batch statistics scores 0;
    # each image on its own has mean +-1 and std sqrt(0 + eps).
    model = nn.Sequential(bn(1, [0.0], [1.0])).eval()
    x = torch.cat([torch.ones(1, 1, 4, 4), -torch.ones(1, 1, 4, 4)]).double()
    s = math.sqrt(EPS)
    # eq. 2 with i = 0 (input: targets mean 0, std 1) and i = 1 (the BN), ||.||^2 averaged over the 2 images
    layer = ((1 - 0) ** 2 + (-1 - 0) ** 2) / 2 + ((s - math.sqrt(1 + EPS)) ** 2 * 2) / 2
    inp = ((1 - 0) ** 2 + (-1 - 0) ** 2) / 2 + ((s - 1) ** 2 * 2) / 2
    assert bn_distance(model, x) == pytest.approx(layer + inp, rel=1e-12)
    assert layer + inp == pytest.approx(3.996003, abs=1e-6)
    assert bn_distance(model, x, objective="batch") < 1e-5  # the old objective's blind spot


def test_one_image_through_conv_bn_uses_the_bn_input_and_unbiased_variance():
    conv = nn.Conv2d(1, 1, 1, bias=False).double()
    conv.weight.data.fill_(2.0)
    model = nn.Sequential(conv, bn(1, [1.0], [4.0]), nn.ReLU()).eval()
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]], dtype=torch.float64)
    # the BN sees 2x = [0, 2, 4, 6]: mean 3, unbiased var (9 + 1 + 1 + 9) / 3 = 20/3
    layer = (3 - 1) ** 2 + (math.sqrt(20 / 3 + EPS) - math.sqrt(4 + EPS)) ** 2
    # the input [0, 1, 2, 3]: mean 1.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    inp = 1.5 ** 2 + (math.sqrt(5 / 3 + EPS) - 1) ** 2
    assert bn_distance(model, x) == pytest.approx(layer + inp, rel=1e-12)
    assert layer + inp == pytest.approx(6.6734, abs=1e-4)  # 4 + 0.3387 + 2.25 + 0.0847


def zeroq_reference_loss(model: nn.Module, gaussian_data: torch.Tensor) -> torch.Tensor:
    """distill_data.py's loss for one iteration, transcribed (cuda and the optimizer left out;
    `view(N, 3, -1)` of the input generalized to the input's channel count)."""
    def own_loss(A, B):
        return (A - B).norm() ** 2 / B.size(0)

    hooks, bn_stats, outputs = [], [], {}
    layers = sum([1 if isinstance(layer, nn.BatchNorm2d) else 0 for layer in model.modules()])
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and len(hooks) < layers:
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, o)))
        if isinstance(m, nn.BatchNorm2d):
            bn_stats.append((m.running_mean.detach().clone().flatten(),
                             torch.sqrt(m.running_var + EPS).detach().clone().flatten()))
    model(gaussian_data)
    mean_loss, std_loss = 0, 0
    for bn_stat, tmp_output in zip(bn_stats, outputs.values()):
        bn_mean, bn_std = bn_stat[0], bn_stat[1]
        tmp_mean = torch.mean(tmp_output.view(tmp_output.size(0), tmp_output.size(1), -1), dim=2)
        tmp_std = torch.sqrt(torch.var(tmp_output.view(tmp_output.size(0), tmp_output.size(1), -1), dim=2) + EPS)
        mean_loss += own_loss(bn_mean, tmp_mean)
        std_loss += own_loss(bn_std, tmp_std)
    c = gaussian_data.size(1)
    tmp_mean = torch.mean(gaussian_data.view(gaussian_data.size(0), c, -1), dim=2)
    tmp_std = torch.sqrt(torch.var(gaussian_data.view(gaussian_data.size(0), c, -1), dim=2) + EPS)
    mean_loss += own_loss(torch.zeros(1, c, dtype=gaussian_data.dtype), tmp_mean)
    std_loss += own_loss(torch.ones(1, c, dtype=gaussian_data.dtype), tmp_std)
    for h in hooks:
        h.remove()
    return mean_loss + std_loss


def tiny_net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, stride=2), nn.BatchNorm2d(5), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 6), nn.BatchNorm1d(6)).double()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) * 3 + 0.1)
    return net.eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_transcription_of_zeroq_distill_data(seed):
    net = tiny_net(seed)
    g = torch.Generator().manual_seed(100 + seed)
    for x in (torch.randn(3, 3, 7, 7, generator=g, dtype=torch.float64) * 2 + 0.5,
              torch.cat([torch.ones(2, 3, 7, 7), -torch.ones(2, 3, 7, 7)]).double()):
        ref = float(zeroq_reference_loss(net, x))
        assert bn_distance(net, x) == pytest.approx(ref, rel=1e-12), seed
        assert ref > 0.1


def test_round_robin_targets_cover_every_class_and_continue_across_batches():
    assert round_robin(0, 7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert round_robin(7, 5, 3).tolist() == [1, 2, 0, 1, 2]


def test_old_configs_validate_and_the_learning_rate_follows_the_objective():
    old = SynthesisConfig.model_validate({"steps": 200, "lr": 0.1, "batch_size": 128})
    assert old.objective == "zeroq" and old.learning_rate() == 0.1 and old.ce_weight is None
    assert SynthesisConfig().learning_rate() == 0.5  # ZeroQ's Adam lr
    assert SynthesisConfig(objective="batch").learning_rate() == 0.1  # the pre-issue-15 default


def test_class_balanced_term_makes_every_class_appear(trained_tiny, tiny_data):
    def labels(ce_weight):
        split = synthesize(trained_tiny, 20, tiny_data.input_shape, tiny_data.normalize,
                           SynthesisConfig(steps=40, batch_size=20, ce_weight=ce_weight), 0, lambda s: None)
        assert split.bn_distance[1] < split.bn_distance[0]
        return set(split.labels.tolist())  # what the model predicts on the stored uint8 images
    assert labels(10.0) == set(range(10))
    assert len(labels(0.0)) <= 6  # ZeroQ alone: 4 classes here (0, 4, 5, 8), nothing asks for the others


def test_the_class_term_defaults_on_for_classifiers_and_off_for_segmentation_maps():
    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn, self.o = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            return self.o(torch.relu(self.bn(self.c(x))))

    def norm(u):
        return u.float() / 255
    torch.manual_seed(0)
    split = synthesize(Seg().eval(), 8, (1, 8, 8), norm, SynthesisConfig(steps=3, batch_size=4), 0, lambda s: None)
    assert split.labels.shape == (8, 8, 8)  # per-pixel argmax, no class term
    with pytest.raises(ValueError, match="ce_weight.*not \\(N, classes\\)"):
        synthesize(Seg().eval(), 4, (1, 8, 8), norm, SynthesisConfig(steps=1, ce_weight=1), 0, lambda s: None)
