"""Preflight (compress/preflight.py): what `compress validate` and `compress run` reject
before any training, each as one line naming the field (and both sides of a mismatch)."""
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli import app
from compress.config_load import load_config
from compress.distill.features import FeatureTerm
from compress.distill.objectives import KL
from compress.errors import UserError
from compress.models import ResNet, build_model
from compress.nets.vit import ViT
from compress.preflight import preflight
from compress.train import TrainConfig, TrainEnv, fit
from tests.conftest import ROOT

HERE = "tests.compress.test_preflight"
TINY = ROOT / "examples" / "tiny.yaml"


# factories a user might write (referred to as 'tests.compress.test_preflight:<name>')
def rgb_only(num_classes: int = 10, in_channels: int = 1):
    return ResNet((8, 16), (1, 1), num_classes, 3)  # ignores in_channels


def seven_classes(num_classes: int = 10, in_channels: int = 1):
    return ResNet((8, 16), (1, 1), 7, in_channels)  # ignores num_classes


def vit_patch7(num_classes: int = 10, in_channels: int = 1):
    return ViT(num_classes, in_channels, dim=32, depth=2, heads=4, patch=7)  # 16 tokens, vit_tiny has 49


def rgb_data():
    from calib.datasets import synthetic
    return synthetic(num_classes=5, train_size=16, test_size=16, image_size=16, channels=3)


def config(tmp_path, **over):
    """A tiny synthetic run (nothing to load), with top-level sections replaced."""
    raw = {"name": "pf", "data": {"dataset": "synthetic", "synthetic": {"train_size": 64, "test_size": 32}},
           "teacher": {"model": "resnet_tiny_teacher", "train": {"epochs": 1}},
           "student": {"model": "resnet_tiny"}, "stages": [{"kind": "distill"}],
           "output": {"dir": str(tmp_path / "runs")}, **over}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_config(p)


def failure(cfg) -> list[str]:
    with pytest.raises(UserError) as e:
        preflight(cfg)
    return str(e.value).splitlines()


def validate(*args):
    res = CliRunner().invoke(app, ["validate", *map(str, args)])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def test_vit_feature_distillation_trains_between_transformer_layers(tiny_data):
    """The old crash: `mat1 and mat2 shapes cannot be multiplied (6272x64 and 49x50)`."""
    torch.manual_seed(0)
    student, teacher = build_model("vit_tiny", 10, 1), build_model("vit_tiny", 10, 1).eval()
    cfg = TrainConfig(epochs=2, lr=3e-3, augment=False, loss=[KL()],
                      features=[FeatureTerm(student="blocks.0", teacher="blocks.1", weight=10.0),
                                FeatureTerm(student="blocks.1", teacher="blocks.1", kind="attention")])
    small = type(tiny_data)(tiny_data.name, tiny_data.train.subset(torch.arange(128)), tiny_data.test,
                            tiny_data.num_classes, tiny_data.mean, tiny_data.std)
    rows = fit(student, small, cfg, TrainEnv(32, teacher=teacher, log=lambda s: None))
    assert [r["steps"] for r in rows] == [4, 4]
    assert rows[1]["feat0_hint"] < 0.9 * rows[0]["feat0_hint"]  # the adapter over C learns
    assert torch.isfinite(torch.tensor(rows[1]["feat1_attention"]))


def test_vit_feature_pairs_pass_preflight(tmp_path):
    cfg = config(tmp_path, teacher={"model": "vit_small", "train": {"epochs": 1}}, student={"model": "vit_tiny"},
                 stages=[{"kind": "distill", "features": [{"student": "blocks.1", "teacher": "blocks.3"},
                                                          {"student": "blocks.1.fc1", "teacher": "blocks.3.fc1",
                                                           "kind": "normalized"}]}])
    assert preflight(cfg) < 10


def test_conv_map_against_tokens_is_one_line_naming_both(tmp_path):
    cfg = config(tmp_path, teacher={"model": "vit_tiny", "train": {"epochs": 1}},
                 stages=[{"kind": "distill", "features": [{"student": "layers.0", "teacher": "blocks.0"}]}])
    assert failure(cfg) == [
        "stages.0.features.0: student layers.0 output (8, 28, 28) cannot be matched to teacher blocks.0 output "
        "(49, 32): ranks differ or are not 2 ([B, C]), 3 ([B, N, C] tokens) or 4 ([B, C, H, W]); "
        "pick layers of the same kind"]


def test_token_counts_that_differ_are_one_line_naming_both(tmp_path):
    cfg = config(tmp_path, teacher={"model": f"{HERE}:vit_patch7", "train": {"epochs": 1}},
                 student={"model": "vit_tiny"},
                 stages=[{"kind": "distill", "features": [{"student": "blocks.0", "teacher": "blocks.0"}]}])
    (line,) = failure(cfg)
    assert line.startswith("stages.0.features.0: student blocks.0 output (49, 32) cannot be matched to "
                           "teacher blocks.0 output (16, 32): token counts differ (49 vs 16")


def test_vit_at_the_wrong_image_size_fails_before_the_teacher_trains(tmp_path):
    cfg = config(tmp_path, data={"dataset": "synthetic", "synthetic": {"image_size": 32}},
                 teacher={"model": "vit_tiny", "train": {"epochs": 1}}, student={"model": "vit_tiny"})
    lines = failure(cfg)
    assert len(lines) == 2  # teacher and student, each named
    for role, line in zip(("teacher", "student"), lines):
        assert line.startswith(f"{role}.model=vit_tiny: a batch of shape (2, 1, 32, 32) fails in forward "
                               f"(RuntimeError: The size of tensor a (64) must match the size of tensor b (49)")


def test_a_factory_ignoring_in_channels_is_named_with_the_channels_expected(tmp_path):
    cfg = config(tmp_path, teacher={"model": f"{HERE}:rgb_only", "train": {"epochs": 1}})
    assert failure(cfg) == [f"teacher.model={HERE}:rgb_only: its first conv stem.0 takes 3 input channels, "
                            f"the data has 1 (the factory must build its stem from in_channels)"]


def test_logits_must_match_the_classes_of_the_data(tmp_path):
    cfg = config(tmp_path, student={"model": f"{HERE}:seven_classes"})
    assert failure(cfg) == [f"student.model={HERE}:seven_classes: logits of shape (2, 7) for a batch of 2, "
                            f"expected (2, 10) (the data has 10 classes)"]


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = config(tmp_path, export={"stages": ["nope"]},
                 stages=[{"kind": "prune", "ignored": ["fcc"]}, {"kind": "quantize", "layer_bits": {"stem.1": 4}}])
    lines = failure(cfg)
    assert len(lines) == 3, lines
    assert lines[0].startswith("export.stages: ['nope'] are not stages of this run (its stages: teacher, prune, ")
    assert lines[1] == "stages.0.ignored: no module named 'fcc' (closest: fc)"
    assert lines[2].startswith("stages.1.layer_bits: no quantizable compute layer (Conv/Linear) named 'stem.1'")


@pytest.mark.parametrize("sets, message", [
    (["teacher.train=null", "teacher.checkpoint={tmp}/none.safetensors"],
     "teacher.checkpoint: {tmp}/none.safetensors: checkpoint file not found"),
    (["data.dataset=fashion_mnist", "data.root={tmp}/nowhere"],
     "data.root={tmp}/nowhere: Fashion-MNIST files missing: train-images-idx3-ubyte.gz"),
    (["stages.1.ignored=[fcc]"], "stages.1.ignored: no module named 'fcc' (closest: fc)"),
    (["stages.2.layer_bits={stem.9: 4}"], "stages.2.layer_bits: no quantizable compute layer (Conv/Linear) named "
                                          "'stem.9'"),
    (["export.stages=[distil]"], "export.stages: ['distil'] are not stages of this run (its stages: teacher, "
                                 "distill, prune, quantize)"),
    (["stages=[{kind: quantize}, {kind: quantize}]"], "stages.1: a second quantize stage after the quantize "
                                                      "stage stages.0"),
    (["stages=[{kind: quantize}, {kind: prune}]"], "stages.1: prune after the quantize stage stages.0: the model "
                                                   "is quantized from there on"),
], ids=["checkpoint-missing", "data-root-missing", "prune-ignored", "layer-bits", "export-stages",
        "two-quantize", "prune-after-quantize"])
def test_validate_rejects_what_run_would_reject(sets, message, tmp_path):
    args = [a for s in sets for a in ("--set", s.replace("{tmp}", str(tmp_path)))]
    res = validate(TINY, *args)
    assert res.exit_code == 2, res.output
    assert "error: " + message.replace("{tmp}", str(tmp_path)) in res.output and "Traceback" not in res.output


def test_validate_reports_preflight_as_a_yaml_comment():
    res = validate(TINY)
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["name"] == "tiny"
    assert "# preflight: teacher resnet_tiny_teacher, student resnet_tiny: a batch of (2, 1, 28, 28) -> " \
           "logits (2, 10)" in res.output


def test_preflight_of_the_demo_is_fast():
    path = ROOT / "examples" / "fashion_mnist.yaml"
    cfg = load_config(path)
    if not cfg.resolve_path(cfg.data.root).is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {cfg.data.root}")
    preflight(cfg)  # the first call imports torch-pruning and brevitas for the stage checks
    t0 = time.perf_counter()
    preflight(cfg)
    # ~0.2 s warm on 2 shared CPU cores: two ResNets built, a checkpoint loaded, batch 2 through each
    assert time.perf_counter() - t0 < 3


def test_a_checkpoint_of_another_model_is_named_with_what_does_not_fit(tmp_path):
    torch.save(build_model("resnet_tiny_teacher", 10, 1).state_dict(), tmp_path / "other.pt")
    cfg = config(tmp_path, student={"model": "resnet_tiny", "checkpoint": str(tmp_path / "other.pt")})
    (line,) = failure(cfg)
    assert line.startswith(f"student.checkpoint={tmp_path / 'other.pt'}: does not fit the model: shape mismatch: "
                           f"stem.0.weight: checkpoint (16, 1, 3, 3) vs model (8, 1, 3, 3)")


def test_a_factory_dataset_is_loaded_for_its_classes_and_shape(tmp_path):
    cfg = config(tmp_path, data={"dataset": f"{HERE}:rgb_data"}, student={"model": f"{HERE}:seven_classes"})
    assert failure(cfg) == [f"student.model={HERE}:seven_classes: logits of shape (2, 7) for a batch of 2, "
                            f"expected (2, 5) (the data has 5 classes)"]
    # 3 channels: the factory that always builds an RGB stem fits this data
    cfg = config(tmp_path, data={"dataset": f"{HERE}:rgb_data"}, teacher={"model": f"{HERE}:rgb_only",
                                                                         "train": {"epochs": 1}})
    assert preflight(cfg) < 10
