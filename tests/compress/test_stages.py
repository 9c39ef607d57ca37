"""The Stage contract and the typed Structure, without running the pipeline: the table
refuses a kind twice and validates configs of kinds registered from outside; structure.json
round-trips, migrates the unversioned format and fails on a corrupt file with one line."""
import json
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from compress import stages
from compress.checkpoint import record_shapes, save_weights
from compress.config import ConfigError
from compress.config_load import load_config
from compress.models import build_model
from compress.prune import PruneConfig, prune_channels
from compress.stage import StageResult
from compress.structure import Structure, StructureError, rebuild
from tests.conftest import ROOT


class IdentityConfig(BaseModel):
    """Leaves the model as it is (a test of the stage contract)."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["identity"] = "identity"
    note: str = "unchanged"


class IdentityStage:
    config = IdentityConfig
    calibrates = False

    def check(self, model, ctx, cfg):
        pass

    def run(self, model, ctx, cfg):
        return StageResult(model, ctx.structure, metrics={"note": cfg.note})


@pytest.fixture
def identity_kind():
    stages.register(IdentityStage())
    yield
    stages.unregister("identity")


def test_a_kind_registered_twice_raises(identity_kind):
    with pytest.raises(ValueError, match="stage kind 'identity' is already registered"):
        stages.register(IdentityStage())
    with pytest.raises(ValueError, match="stage kind 'prune' is already registered"):
        stages.register(stages.get("prune"))


def test_the_config_validates_a_kind_registered_from_outside(identity_kind, tmp_path):
    tiny = ROOT / "examples" / "tiny.yaml"
    cfg = load_config(tiny, ["stages=[{kind: identity, note: hello}, {kind: prune, ratio: 0.2}]"])
    assert [type(s).__name__ for s in cfg.stages] == ["IdentityConfig", "PruneConfig"]
    assert cfg.stages[0].note == "hello"
    with pytest.raises(ConfigError, match=r"stages.0.nope: unknown key"):
        load_config(tiny, ["stages=[{kind: identity, nope: 1}]"])


def test_an_unregistered_kind_names_the_registered_ones():
    with pytest.raises(ConfigError, match=r"stages.0: .*'identity' .*'distill', 'prune', 'quantize'"):
        load_config(ROOT / "examples" / "tiny.yaml", ["stages=[{kind: identity}]"])


def pruned(tmp_path):
    torch.manual_seed(0)
    model = prune_channels(build_model("resnet_tiny", 10, 1), PruneConfig(ratio=0.5, round_to=4),
                           torch.zeros(1, 1, 28, 28)).eval()
    save_weights(model, tmp_path / "model.safetensors")
    return model


def test_structure_round_trips_and_rebuilds_the_same_outputs(tmp_path):
    model = pruned(tmp_path)
    s = Structure(model="resnet_tiny", num_classes=10, in_channels=1, input_shape=[1, 28, 28]).with_shapes(model)
    s.write(tmp_path / "structure.json")
    assert json.loads((tmp_path / "structure.json").read_text())["version"] == 1
    back = Structure.read(tmp_path / "structure.json")
    assert back == s and back.shapes["stem.0"].attrs["out_channels"] == 4
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(rebuild(back, tmp_path / "model.safetensors")(x), model(x))


def test_an_unversioned_structure_json_from_before_loads(tmp_path):
    """The format the pipeline wrote before the typed record: no version, plain dicts."""
    model = pruned(tmp_path)
    old = {"num_classes": 10, "in_channels": 1, "input_shape": [1, 28, 28], "model": "resnet_tiny",
           "shapes": record_shapes(model), "removed_blocks": [], "sparsity": {"layers.0.conv2": "2:4"}}
    (tmp_path / "structure.json").write_text(json.dumps(old, indent=2))
    s = Structure.read(tmp_path / "structure.json")
    assert s.version == 1 and s.is_float and s.sparsity == {"layers.0.conv2": "2:4"}
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(rebuild(s, tmp_path / "model.safetensors")(x), model(x))


@pytest.mark.parametrize("text, why", [
    ("{not json", "not readable JSON"),
    ('{"model": "resnet_tiny"}', r"num_classes: Field required"),
    ('{"version": 7, "model": "resnet_tiny"}', "version 7 is newer than this release reads"),
    ("[1, 2]", "expected a mapping"),
])
def test_a_corrupt_structure_json_is_one_line_naming_the_file(tmp_path, text, why):
    (tmp_path / "structure.json").write_text(text)
    with pytest.raises(StructureError, match=why) as e:
        Structure.read(tmp_path / "structure.json")
    assert str(e.value).startswith(str(tmp_path / "structure.json")) and "\n" not in str(e.value)
