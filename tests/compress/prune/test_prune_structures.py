"""Block removal (LAPTOP-Diff), 2:4 sparsity, and pruning the MobileNet- and ViT-style
zoo models: each changes structure, runs, and rebuilds from recorded data."""
import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compress.checkpoint import apply_shapes, load_into, read_state_dict, record_shapes, save_weights
from compress.errors import UserError
from compress.models import build_model, count_params
from compress.prune import PruneConfig, check, prune_channels, sparse
from compress.prune.blocks import candidates
from tests.conftest import make_ctx, run_stage

X = torch.zeros(1, 1, 28, 28)


def rebuilt_equal(model, spec, tmp_path, removed=()):
    save_weights(model, tmp_path / "m.safetensors")
    shapes = json.loads(json.dumps(record_shapes(model)))  # through JSON, as on disk
    fresh = apply_shapes(build_model(spec, 10, 1), shapes, list(removed))
    load_into(fresh, read_state_dict(tmp_path / "m.safetensors"), "m")
    x = torch.randn(4, 1, 28, 28)
    return torch.equal(model.eval()(x), fresh.eval()(x))


@pytest.mark.parametrize("spec", ["mobilenet_tiny", "vit_tiny"])
def test_zoo_models_prune_run_and_rebuild(spec, tmp_path):
    torch.manual_seed(0)
    model = build_model(spec, 10, 1).eval()
    before, fc = count_params(model), copy.deepcopy(model.fc)
    prune_channels(model, PruneConfig(ratio=0.5, round_to=4), X)
    assert count_params(model) < 0.75 * before
    # the ignored classifier keeps its inputs and its weights (keep_ignored_inputs)
    assert torch.equal(model.fc.weight, fc.weight) and torch.equal(model.fc.bias, fc.bias)
    assert rebuilt_equal(model, spec, tmp_path)


def test_mobilenet_depthwise_grouped_concat_and_se_stay_consistent():
    model = build_model("mobilenet_tiny", 10, 1).eval()
    prune_channels(model, PruneConfig(ratio=0.5, round_to=1, ignored=["fc"]), X)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and "depthwise" in name:
            assert m.groups == m.in_channels == m.out_channels, name  # still depthwise
    assert model.mix[0].groups == 4 and model.mix[0].in_channels % 4 == 0
    se = model.blocks[3].se
    assert se.expand.out_channels == model.blocks[3].depthwise[0].out_channels
    # the concat: the ghost block's two halves add up to what the grouped conv takes
    g = model.ghost
    assert g.primary[0].out_channels + g.cheap[0].out_channels == model.mix[0].in_channels


def test_vit_loses_whole_heads():
    model = build_model("vit_tiny", 10, 1).eval()
    prune_channels(model, PruneConfig(ratio=0.5, round_to=1), X)
    for b in model.blocks:
        assert b.attn.num_heads == 2 and b.attn.head_dim == 8  # 4 heads of 8 -> 2 heads of 8
        assert b.attn.qkv.out_features == 3 * 2 * 8 and b.attn.proj.in_features == 16
    assert model.norm.normalized_shape == (32,)  # the residual stream feeds fc: kept (#341)
    assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()


def test_block_removal_picks_least_distorting_block_and_rebuilds(tiny_data, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet_teacher", 10, 1)  # the blocks without a stride or width change
    assert candidates(model, X, []) == ["layers.0", "layers.1", "layers.3", "layers.5"]
    ctx = make_ctx(tiny_data, None, tmp_path, calib=64)
    # make layers.3 the obviously harmless one: its residual branch outputs zeros
    nn.init.zeros_(model.layers[3].bn2.weight)
    res = run_stage("prune", model, ctx, PruneConfig(ratio=0, remove_blocks=1, epochs=0))
    out = res.model
    assert res.structure.removed_blocks == ["layers.3"] == res.metrics["removed_blocks"]
    assert isinstance(out.layers[3], nn.Identity)
    assert res.metrics["block_distortion"]["layers.3"] < 1e-6 < res.metrics["block_distortion"]["layers.1"]
    assert rebuilt_equal(out, "resnet_teacher", tmp_path, res.structure.removed_blocks)


def test_block_removal_asks_for_more_blocks_than_exist(trained_tiny):
    with pytest.raises(UserError, match=r"remove_blocks=2, but the model has only 1 removable blocks \(layers.0\)"):
        check(trained_tiny, PruneConfig(remove_blocks=2), "stages.1")


def test_semi_structured_bad_pattern_names_eligible_layers(trained_tiny):
    with pytest.raises(UserError, match=r"'layers.\*.conv9' matches no .* \(eligible: .*layers.0.conv1"):
        check(trained_tiny, PruneConfig(semi_structured=["layers.*.conv9"]), "stages.1")


def test_2of4_masks_survive_training_quantization_and_export(trained_tiny, tiny_data, tmp_path):
    from compress import quantize
    from compress.export import export_model
    ctx = make_ctx(tiny_data, trained_tiny, tmp_path, calib=128)
    cfg = PruneConfig(ratio=0, semi_structured=["layers.*.conv2"], epochs=0.5, augment=False)
    res = run_stage("prune", copy.deepcopy(trained_tiny), ctx, cfg)
    model, names = res.model, list(res.structure.sparsity)
    assert names == ["layers.0.conv2", "layers.1.conv2"]
    mods = dict(model.named_modules())
    # trained for half an epoch with masks re-applied: still exactly the pattern
    assert all(sparse.holds(mods[n].weight.detach()) for n in names)
    assert not sparse.holds(model.layers[0].conv1.weight.detach())  # untouched layers stay dense
    # QAT (a later stage) keeps them too, through BN merging and fake quantization
    qcfg = quantize.QuantizeConfig(calib_batches=2, epochs=0.25, augment=False)
    ctx.structure = res.structure  # the next stage starts from this one's structure
    q = run_stage("quantize", copy.deepcopy(model), ctx, qcfg).model
    manifest = export_model(q, tmp_path / "q", tiny_data, 17, False, "quantize", sparse_layers=names)
    assert manifest["sparsity"]["pattern"] == "2:4" and len(manifest["sparsity"]["exported_nodes_holding"]) >= 2
    # and the int8 graph still runs, agreeing with the fake-quant model
    sess = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"))
    x = tiny_data.normalize(tiny_data.test.images[:64])
    got = sess.run(None, {"input": x.numpy()})[0]
    want = q.eval()(x)
    want = (want.value if hasattr(want, "value") else want).detach().numpy()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


def test_export_check_catches_a_broken_pattern(trained_tiny, tiny_data, tmp_path):
    from compress.export import export_model
    model = copy.deepcopy(trained_tiny).eval()
    sparse.apply(model, ["layers.1.conv2"])
    export_model(model, tmp_path / "ok", tiny_data, 17, False, "prune", sparse_layers=["layers.1.conv2"])
    model.layers[1].conv2.weight.data += 1e-3  # the zeros are gone
    with pytest.raises(UserError, match="1 layers were made 2:4 sparse .* only 0 exported weights hold"):
        export_model(model, tmp_path / "bad", tiny_data, 17, False, "prune", sparse_layers=["layers.1.conv2"])


def test_mask_2of4_keeps_the_two_largest_of_each_group():
    w = torch.tensor([[[[1.0]], [[-5.0]], [[0.5]], [[3.0]], [[2.0]], [[0.1]], [[-0.2]], [[4.0]]]]).reshape(1, 8, 1, 1)
    m = sparse.mask_2of4(w)
    assert m.flatten().tolist() == [False, True, False, True, True, False, False, True]
    assert sparse.holds(w * m) and not sparse.holds(w)
    assert np.array_equal(sparse.mask_2of4(torch.ones(2, 8)).sum(1).numpy(), [4, 4])


def test_block_removal_recovers_with_normalized_features_from_the_unpruned_model(tiny_data, tmp_path):
    from compress.distill.features import FeatureTerm
    torch.manual_seed(0)
    model = build_model("resnet_tiny", 10, 1)
    ctx = make_ctx(tiny_data, None, tmp_path, calib=64)  # no run teacher: the unpruned copy teaches
    cfg = PruneConfig(ratio=0, remove_blocks=1, epochs=0.25, augment=False, recovery_teacher="unpruned",
                      features=[FeatureTerm(student="layers", teacher="layers", kind="normalized")])
    res = run_stage("prune", model, ctx, cfg)
    out = res.model
    assert res.structure.removed_blocks == ["layers.0"] and isinstance(out.layers[0], nn.Identity)
    assert res.history[0]["feat0_normalized"] > 0  # the feature term trained, next to kl and ce
    assert not any(h for m in out.modules() for h in m._forward_hooks.values())  # hooks removed


def test_pruned_checkpoint_reloads_in_a_fresh_process(tiny_data, tmp_path):
    """structure.json + safetensors -> the same outputs in another interpreter (nothing
    pickled: the structure is data, the module comes from the factory)."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    torch.manual_seed(0)
    model = build_model("mobilenet_tiny", 10, 1)
    ctx = make_ctx(tiny_data, None, tmp_path, calib=64, model="mobilenet_tiny")
    res = run_stage("prune", model, ctx, PruneConfig(ratio=0.5, round_to=4, remove_blocks=1, epochs=0))
    model = res.model.eval()
    res.structure.write(tmp_path / "structure.json")
    save_weights(model, tmp_path / "model.safetensors")
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from pathlib import Path; from compress.structure import Structure, rebuild;"
            "d = Path(sys.argv[1]); m = rebuild(Structure.read(d / 'structure.json'), d / 'model.safetensors');"
            "torch.save(m(torch.load(d / 'x.pt', weights_only=True)).detach(), d / 'y.pt')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT)
    assert res.structure.removed_blocks and torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), model(x))


def test_timm_style_attn_dim_follows_pruned_heads():
    """timm >= 1.0's Attention reshapes its output by `attn_dim` (measured: a pruned timm
    vit_tiny failed with `shape '[64, 65, 192]' is invalid` until it followed the heads)."""
    from compress.checkpoint import _FORWARD_ATTRS
    from compress.nets.vit import Attention

    def forward(self, x):  # timm's: the output width is attn_dim, not num_heads * head_dim
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.attn_dim))

    model = build_model("vit_tiny", 10, 1).eval()
    for b in model.blocks:
        b.attn.attn_dim = b.attn.num_heads * b.attn.head_dim
        b.attn.forward = forward.__get__(b.attn, Attention)
    prune_channels(model, PruneConfig(ratio=0.5, round_to=1), X)
    assert all(b.attn.attn_dim == 16 for b in model.blocks)  # 4 heads of 8 -> 2 heads of 8
    assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()
    assert "attn_dim" in _FORWARD_ATTRS  # recorded in structure.json, so the rebuild follows too
