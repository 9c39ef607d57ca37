import copy

import pytest
import torch

from compress.checkpoint import apply_shapes, load_into, read_state_dict, record_shapes, save_weights
from compress.models import build_model, count_params
from compress.prune import PruneConfig, check, prune_channels
from tests.conftest import make_ctx, run_stage

X = torch.zeros(1, 1, 28, 28)


def test_pruning_removes_channels_and_model_still_works(trained_tiny, tiny_data):
    model = copy.deepcopy(trained_tiny)
    before = count_params(model)
    prune_channels(model, PruneConfig(ratio=0.5, round_to=4), X)
    assert count_params(model) < 0.7 * before
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs["stem.0"].out_channels == 4 and all(m.out_channels % 4 == 0 for m in convs.values())
    # ignored, and its inputs kept (keep_ignored_inputs): the classifier is untouched, weights
    # included, and the conv feeding it still matches it
    assert torch.equal(model.fc.weight, trained_tiny.fc.weight) and torch.equal(model.fc.bias, trained_tiny.fc.bias)
    assert model.fc.in_features == convs["layers.1.conv2"].out_channels
    out = model.eval()(tiny_data.normalize(tiny_data.test.images[:8]))
    assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_round_to_and_ignored_layers(trained_tiny):
    model = copy.deepcopy(trained_tiny)
    prune_channels(model, PruneConfig(ratio=0.5, round_to=8, ignored=["fc", "stem.0"]), X)
    assert model.stem[0].out_channels == 8 and model.stem[0].in_channels == 1
    assert model.layers[1].conv1.out_channels == 8  # 16 -> 8: a multiple of round_to


def test_pruned_model_rebuilds_from_factory_in_fresh_process_state(trained_tiny, tmp_path):
    model = copy.deepcopy(trained_tiny)
    prune_channels(model, PruneConfig(ratio=0.5, round_to=4), X)
    save_weights(model, tmp_path / "m.safetensors")
    shapes = record_shapes(model)
    rebuilt = apply_shapes(build_model("resnet_tiny", 10, 1), shapes)
    load_into(rebuilt, read_state_dict(tmp_path / "m.safetensors"), "m")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))


def test_unknown_ignored_name_suggests_closest(trained_tiny):
    with pytest.raises(ValueError, match=r"prune.ignored: no module named 'layers.0.conv' .*closest: .*layers.0.conv1"):
        check(trained_tiny, PruneConfig(ignored=["layers.0.conv"]), "prune")


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor", "hessian", "lamp", "random"])
def test_every_criterion_removes_channels_with_kd_recovery(criterion, trained_tiny, tiny_data, tmp_path):
    ctx = make_ctx(tiny_data, trained_tiny, tmp_path, calib=128)
    model = copy.deepcopy(trained_tiny)
    cfg = PruneConfig(ratio=0.5, round_to=4, importance=criterion, steps=2, epochs=0.5,
                      augment=False, importance_batches=1)
    res = run_stage("prune", model, ctx, cfg)
    out = res.model
    assert count_params(out) < 0.7 * count_params(trained_tiny)
    assert [h["prune_step"] for h in res.history] == [1, 2]
    assert res.structure.shapes["stem.0"].attrs["out_channels"] == out.stem[0].out_channels == 4
    assert out.fc.weight.shape == trained_tiny.fc.weight.shape == (10, out.layers[1].conv2.out_channels)
    y = out(torch.randn(2, 1, 28, 28))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_gradient_criteria_differ_from_magnitude(trained_tiny, tiny_data, tmp_path):
    """taylor scores by the objective's gradients: it must not just reproduce l2's choice."""
    kept = {}
    for crit in ("l2", "taylor"):
        ctx = make_ctx(tiny_data, trained_tiny, tmp_path, calib=128)
        m = run_stage("prune", copy.deepcopy(trained_tiny), ctx, PruneConfig(
            ratio=0.5, round_to=1, importance=crit, epochs=0, importance_batches=2)).model
        kept[crit] = m.layers[1].conv1.weight.detach().clone()
    assert kept["l2"].shape == kept["taylor"].shape and not torch.equal(kept["l2"], kept["taylor"])


def test_layer_ratio_and_ignored_input_channels(trained_tiny):
    model = copy.deepcopy(trained_tiny)
    prune_channels(model, PruneConfig(ratio=0.25, round_to=1, layer_ratios={"layers.1.conv1": 0.75},
                                      ignored=["fc", "layers.0.conv1"]), X)
    assert model.layers[1].conv1.out_channels == 4  # 16 * (1 - 0.75)
    # ignored layers keep outputs and inputs (Torch-Pruning #341): the stem and the whole
    # residual group feeding layers.0.conv1 stay whole, and so do fc's inputs
    assert (model.layers[0].conv1.in_channels, model.layers[0].conv1.out_channels) == (8, 8)
    assert model.stem[0].out_channels == 8 and model.fc.in_features == 16
    loose = copy.deepcopy(trained_tiny)
    prune_channels(loose, PruneConfig(ratio=0.25, round_to=1, ignored=["fc", "layers.0.conv1"],
                                      keep_ignored_inputs=False), X)
    assert loose.layers[0].conv1.in_channels < 8 and loose.fc.in_features < 16


def test_macs_fall_with_the_ratio_even_past_the_round_to_grid():
    """torch-pruning alone skips a layer whose kept channels would floor to 0 (32 channels
    at ratio 0.8, round_to 8): such layers keep one grid step instead."""
    import torch_pruning as tp
    macs = []
    for r in (0.3, 0.5, 0.7, 0.8, 0.9):
        m = build_model("resnet8_wide", 10, 1).eval()
        prune_channels(m, PruneConfig(ratio=r, round_to=8, max_layer_ratio=0.95), X)
        assert all(c.out_channels % 8 == 0 for c in m.modules() if isinstance(c, torch.nn.Conv2d))
        macs.append(tp.utils.count_ops_and_params(m, X)[0])
    assert m.stem[0].out_channels == 8  # pruned to one grid step, not left at 32
    assert macs == sorted(macs, reverse=True), macs
