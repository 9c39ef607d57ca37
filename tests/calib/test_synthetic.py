"""Data-free calibration: synthesized images move the BN batch statistics toward the running
ones, are valid uint8 inputs, are cached, and calibrate a quantized model that still works."""
import copy

import pytest
import torch
from torch import nn

from calib.synthetic import SynthesisConfig, bn_distance, load_or_synthesize, synthesize
from compress.errors import UserError
from compress.quantize import QuantizeConfig
from compress.train import accuracy, predict
from tests.conftest import make_ctx, run_stage

CFG = SynthesisConfig(steps=40, batch_size=64)  # ZeroQ objective, its Adam lr 0.5


@pytest.fixture(scope="module")
def synth(trained_tiny, tiny_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("synth")
    logs = []
    split = load_or_synthesize(cache, ["t"], copy.deepcopy(trained_tiny), 128, tiny_data.input_shape,
                               tiny_data.normalize, CFG, 0, logs.append)
    return split, cache, logs


def test_synthetic_images_move_bn_statistics_toward_running_ones(synth, trained_tiny, tiny_data):
    split, _, _ = synth
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (128, *tiny_data.input_shape), generator=g, dtype=torch.uint8)
    before = bn_distance(trained_tiny, tiny_data.normalize(noise))
    after = bn_distance(trained_tiny, tiny_data.normalize(split.images))
    assert after < 0.5 * before, (before, after)
    assert split.bn_distance[1] < split.bn_distance[0]  # recorded per optimization, too
    # ZeroQ's objective on the stored uint8 images: 125.7 at the start, 0.87 after 40 steps (the pixels are
    # kept in the valid range while optimizing, so rounding to uint8 loses little of the fit)
    assert split.bn_distance[1] < 0.02 * split.bn_distance[0], split.bn_distance
    assert split.images.dtype == torch.uint8 and split.images.shape == (128, *tiny_data.input_shape)
    assert set(split.labels.tolist()) <= set(range(10)) and len(set(split.labels.tolist())) > 1


def test_synthesis_is_cached_and_seeded(synth, trained_tiny, tiny_data):
    split, cache, _ = synth
    logs = []
    again = load_or_synthesize(cache, ["t"], trained_tiny, 128, tiny_data.input_shape, tiny_data.normalize,
                               CFG, 0, logs.append)
    assert torch.equal(again.images, split.images) and "from synthetic-calib-" in logs[-1]
    assert again.key == split.key and again.synthetic


def test_a_model_without_batchnorm_is_a_user_error(tiny_data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    with pytest.raises(UserError, match="needs a model with BatchNorm"):
        synthesize(model, 4, tiny_data.input_shape, tiny_data.normalize, CFG, 0, lambda s: None)


def test_quantize_calibrates_and_distills_on_synthetic_data(synth, trained_tiny, tiny_data, tmp_path):
    split, _, _ = synth
    ctx = make_ctx(tiny_data, trained_tiny, tmp_path)
    ctx.calib = split
    seen = []
    ctx.log = seen.append
    res = run_stage("quantize", copy.deepcopy(trained_tiny), ctx,
                    QuantizeConfig(epochs=1, augment=False, calib_batches=2, cache="none"))
    q = res.model
    acc_f = accuracy(predict(trained_tiny, tiny_data.test, tiny_data), tiny_data.test.labels)
    assert res.metrics["calibration"] == "synthetic"
    assert res.metrics["ptq_accuracy"] >= acc_f - 0.1
    assert accuracy(predict(q, tiny_data.test, tiny_data), tiny_data.test.labels) >= acc_f - 0.1
    # one epoch of QAT over the 128 synthetic images at batch 64 is 2 steps, not the real
    # training split's 32: the real data was never used
    assert [h["steps"] for h in res.history] == [2] and "synthetic images" in " ".join(seen)
