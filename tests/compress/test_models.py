"""Model specs: factories called with what their signature names, kwargs from the config,
stem/head adapted to the data and recorded for rebuild; the classifier found, not assumed."""
import json
import sys
import textwrap

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from cli import app
from compress.checkpoint import save_weights
from compress.classifier import find_classifier
from compress.config import ConfigError, StudentConfig
from compress.config_load import load_config
from compress.errors import UserError
from compress.models import build
from compress.pipeline import Pipeline
from compress.prune.channels import ignored, prune_channels
from compress.prune.config import PruneConfig
from compress.structure import Structure, rebuild

# A user's modules, imported by name as a config would: MobileSE takes no in_channels (its
# stem is fixed at 3, like torchvision's), its head is called `classifier`; TimmStyle takes
# timm's in_chans; Headed calls its logits layer `head`; NoHead has no num_classes.
USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


    class MobileSE(nn.Module):
        def __init__(self, num_classes, width=16):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.Hardswish(),
                nn.Conv2d(width, width, 3, 1, 1, groups=width, bias=False), nn.BatchNorm2d(width), nn.Hardswish(),
                SE(width), nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.Hardswish())
            self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width, num_classes))
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.classifier(self.pool(self.features(x)))


    def timm_style(num_classes=1000, in_chans=3, depth=2):
        layers = [nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


    class Headed(nn.Module):
        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.head = nn.Linear(16, num_classes)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))


    def no_head_arg(width=8):
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, 1000, 1),
                             nn.Flatten())


    def two_args(num_classes, in_channels, extra):
        return nn.Linear(1, 1)
''')


@pytest.fixture(scope="module")
def user_mod(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "tests_models_mod.py").write_text(USER_MODULE)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    yield root
    mp.undo()


def test_factory_gets_only_what_it_names(user_mod):
    b = build("tests_models_mod:timm_style", 7, 1, {"depth": 3})
    assert b.adapted == {}  # in_chans and num_classes passed: nothing to change
    assert b.model[0].in_channels == 1 and b.model[-1].out_features == 7
    assert sum(isinstance(m, nn.Conv2d) for m in b.model) == 3  # kwargs reached the factory
    b = build("tests_models_mod:MobileSE", 10, 1, {"width": 8}, (1, 16, 16))
    assert b.adapted == {"features.0": "stem: in_channels 3 -> 1"}
    assert b.model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_head_adapted_when_the_factory_takes_no_num_classes(user_mod):
    b = build("tests_models_mod:no_head_arg", 5, 3, {}, (3, 12, 12))
    assert b.adapted == {"3": "head (traced): 1000 -> 5 outputs"}
    assert b.model(torch.zeros(1, 3, 12, 12)).shape == (1, 5)


def test_stem_adaptation_keeps_a_gray_images_response(user_mod):
    """A 3-channel checkpoint loads before the stem is adapted: a gray image on the 1-channel
    model gives what the same image repeated over RGB gave the original (golden: the original)."""
    torch.manual_seed(0)
    original = build("tests_models_mod:MobileSE", 10, 3, {"width": 8}).model.eval()
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so BN cannot hide an error
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    b = build("tests_models_mod:MobileSE", 10, 1, {"width": 8}, (1, 16, 16), state=original.state_dict())
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(b.model.eval()(x), original(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_factory_type_error_is_one_line(user_mod):
    with pytest.raises(UserError, match=r"^model 'tests_models_mod:two_args': factory\(num_classes, in_channels, "
                                        r"extra\) rejected the arguments \['in_channels', 'num_classes'\]") as e:
        build("tests_models_mod:two_args", 10, 1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,match", [({"num_classes": 3}, "kwargs\n?.*num_classes: not a model argument"),
                                          ({"weights": "IMAGENET1K_V1"}, "weights: not a model argument"),
                                          ({"act": nn.ReLU}, "act: type is not plain data")])
def test_kwargs_are_plain_data_the_data_does_not_decide(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudentConfig(model="resnet_tiny", kwargs=kwargs)


def test_empty_kwargs_leave_the_hashed_dump_as_before():
    # the dump is hashed for resume: runs finished before kwargs existed stay finished
    assert StudentConfig().model_dump() == {"model": "resnet8", "checkpoint": None}
    assert StudentConfig(model="resnet8", weights="s.pt").checkpoint == "s.pt"


@pytest.mark.parametrize("spec,head", [("tests_models_mod:MobileSE", "classifier.2"),
                                       ("tests_models_mod:Headed", "head")])
def test_prune_finds_the_classifier_and_keeps_its_width(user_mod, spec, head):
    model = build(spec, 10, 1, {}, (1, 16, 16)).model.eval()
    info = ignored(model, PruneConfig(), (1, 16, 16))
    assert info == {"names": [head], "source": "classifier (traced)"}
    before = sum(p.numel() for p in model.parameters())
    prune_channels(model, PruneConfig(ratio=0.5, round_to=4), torch.zeros(1, 1, 16, 16))
    assert sum(p.numel() for p in model.parameters()) < 0.7 * before
    assert model.get_submodule(head).out_features == 10
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    # a user's list still wins
    assert ignored(model, PruneConfig(ignored=[]), (1, 16, 16)) == {"names": [], "source": "config"}


class Scaled(nn.Module):
    """Logits scaled after the head: tracing cannot see `fc` as the output's producer."""

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return 2 * self.fc(self.body(x).mean((2, 3)))


def test_get_classifier_wins_over_tracing():
    model = Scaled()
    assert find_classifier(model, (1, 8, 8)) == (None, "traced")
    model.get_classifier = lambda: model.fc  # what a timm model says about itself
    assert find_classifier(model, (1, 8, 8)) == ("fc", "get_classifier()")


def test_missing_torchvision_fails_validate_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "tv", "teacher": {"model": "resnet_tiny_teacher", "checkpoint": "t.pt"},
                                   "student": {"model": "torchvision:mobilenet_v3_small"}}))
    with pytest.raises(ConfigError, match=r"student.model: model 'torchvision:mobilenet_v3_small': torchvision "
                                          r"is not importable .*install it with: pip install torch==2.14.1 "
                                          r"torchvision==0.29.1 timm"):
        load_config(cfg)
    res = CliRunner().invoke(app, ["validate", str(cfg)])
    assert res.exit_code == 2 and "pip install torch==2.14.1 torchvision==0.29.1 timm" in res.output
    assert "Traceback" not in res.output


@pytest.fixture(scope="module")
def mobilese_run(user_mod):
    cfg = {"name": "mse", "seed": 0,
           "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 32,
                    "synthetic": {"train_size": 256, "test_size": 64, "image_size": 16}},
           "teacher": {"model": "tests_models_mod:Headed", "train": {"epochs": 0.5, "augment": False}},
           "student": {"model": "tests_models_mod:MobileSE", "kwargs": {"width": 8}},
           "stages": [{"kind": "distill", "epochs": 0.5, "augment": False},
                      {"kind": "prune", "ratio": 0.5, "round_to": 4, "epochs": 0.25, "augment": False}],
           "targets": [{"backend": "onnxruntime", "threads": 1}],
           "profile": {"warmup": 0, "max_warmup": 0, "runs": 100, "throughput_batch": 1, "throughput_runs": 1},
           "output": {"dir": str(user_mod / "runs")}}
    (user_mod / "c.yaml").write_text(yaml.safe_dump(cfg))
    report = Pipeline(load_config(user_mod / "c.yaml"), log=lambda s: None).run()
    return user_mod / "runs" / "mse", report


def test_mobilese_runs_prunes_and_rebuilds(mobilese_run):
    run_dir, report = mobilese_run
    prune = json.loads((run_dir / "02-prune" / "metrics.json").read_text())
    assert prune["ignored"] == {"names": ["classifier.2"], "source": "classifier (traced)"}
    assert prune["params"] < 0.7 * prune["params_before"]
    s = Structure.read(run_dir / "02-prune" / "structure.json")
    assert s.kwargs == {"width": 8} and s.adapted == {"features.0": "stem: in_channels 3 -> 1"}
    model = rebuild(s, run_dir / "02-prune" / "model.safetensors")
    x = torch.rand(3, 1, 16, 16)
    from compress.checkpoint import read_state_dict
    saved = read_state_dict(run_dir / "02-prune" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model(x).shape == (3, 10)
    rows = [d for d in report["deployments"] if d.get("stage") == "prune"]
    assert rows and all(d.get("status") != "failed" for d in rows), rows


def test_rebuild_refuses_a_model_that_now_adapts_differently(user_mod, tmp_path):
    b = build("tests_models_mod:MobileSE", 10, 1, {"width": 8}, (1, 16, 16))
    save_weights(b.model, tmp_path / "m.safetensors")
    s = Structure(model="tests_models_mod:MobileSE", kwargs={"width": 8}, adapted={}, num_classes=10,
                  in_channels=1, input_shape=[1, 16, 16])
    with pytest.raises(UserError, match="now adapts .*features.0.*recorded nothing"):
        rebuild(s, tmp_path / "m.safetensors")


# -- torchvision / timm, where the vision extra is installed -------------------------------

@pytest.mark.vision
@pytest.mark.parametrize("spec,kwargs,shape,adapted,head", [
    ("torchvision:resnet18", {}, (1, 32, 32), {"conv1": "stem: in_channels 3 -> 1"}, ("fc", "traced")),
    ("torchvision:mobilenet_v3_small", {}, (3, 32, 32), {}, ("classifier.3", "traced")),
    ("timm:resnet18", {}, (1, 32, 32), {}, ("fc", "get_classifier()")),
    ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, (3, 32, 32), {},
     ("head", "get_classifier()")),
])
def test_vision_models_build_rebuild_and_find_their_head(spec, kwargs, shape, adapted, head, tmp_path):
    pytest.importorskip(spec.split(":")[0])
    b = build(spec, 10, shape[0], kwargs, shape)
    assert b.adapted == adapted
    assert find_classifier(b.model, shape) == head
    save_weights(b.model, tmp_path / "m.safetensors")
    s = Structure(model=spec, kwargs=kwargs, adapted=b.adapted, num_classes=10, in_channels=shape[0],
                  input_shape=list(shape))
    x = torch.rand(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(rebuild(s, tmp_path / "m.safetensors")(x), b.model.eval()(x))
