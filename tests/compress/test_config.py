from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from compress.config import ConfigError
from compress.config_load import load_config
from tests.conftest import ROOT

MINIMAL = """
name: t
teacher:
  model: resnet_tiny_teacher
  train: {epochs: 1}
stages:
  - kind: distill
    epochs: 1
"""


def write(tmp_path, text, name="c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_names_path_and_file(tmp_path):
    p = write(tmp_path, MINIMAL + "    epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "stages.0.epochz: unknown key" in msg  # pastes back into --set


def test_a_stage_teacher_outside_quantize_says_where_teachers_go(tmp_path):
    p = write(tmp_path, MINIMAL + "    teacher: self\n")
    with pytest.raises(ConfigError, match=r"stages\.0\.teacher: unknown key \(.*quantize-stage key.*recovery_teacher"):
        load_config(p)


def test_unknown_stage_kind_and_bad_values(tmp_path):
    p = write(tmp_path, MINIMAL.replace("kind: distill", "kind: distil"))
    with pytest.raises(ConfigError, match="stages.0"):
        load_config(p)
    p = write(tmp_path, MINIMAL + "  - kind: prune\n    ratio: 1.5\n")
    with pytest.raises(ConfigError, match="stages.1.ratio"):
        load_config(p)


def test_teacher_needs_exactly_one_source(tmp_path):
    p = write(tmp_path, "name: t\nteacher: {model: resnet8}\n")
    with pytest.raises(ConfigError, match="teacher.checkpoint.*teacher.train"):
        load_config(p)


def test_unknown_model_name_lists_zoo(tmp_path):
    p = write(tmp_path, MINIMAL.replace("resnet_tiny_teacher", "resnet999"))
    with pytest.raises(ConfigError, match="teacher.model: unknown model 'resnet999'.*resnet8"):
        load_config(p)


def test_set_overrides(tmp_path):
    p = write(tmp_path, MINIMAL)
    cfg = load_config(p, ["stages.0.epochs=2.5", "data.batch_size=32", "seed=7"])
    assert cfg.stages[0].epochs == 2.5 and cfg.data.batch_size == 32 and cfg.seed == 7
    with pytest.raises(ConfigError, match="list index out of range"):
        load_config(p, ["stages.3.epochs=1"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(p, ["seed"])
    with pytest.raises(ConfigError, match="data.bogus: unknown key"):
        load_config(p, ["data.bogus=1"])


def test_yaml_tags_do_not_execute(tmp_path):
    p = write(tmp_path, MINIMAL + "seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(path):
    import yaml
    if "torchvision:" in path.read_text():
        pytest.importorskip("torchvision", reason=f"{path.name} needs the vision extra")
    raw, cfg = yaml.safe_load(path.read_text()), load_config(path)
    # the file's own values arrive, and the resolved config survives its own dump
    assert cfg.name == raw["name"] and cfg.teachers[0].model == raw["teacher"]["model"]
    assert len(cfg.stages) == len(raw["stages"]) and [s.kind for s in cfg.stages] == [s["kind"] for s in raw["stages"]]
    assert type(cfg).model_validate(cfg.model_dump()).model_dump() == cfg.model_dump()


def test_cli_validate_misspelled_key_no_traceback(tmp_path):
    p = write(tmp_path, MINIMAL.replace("name: t", "name: t\nsed: 1"))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 2
    assert "sed: unknown key" in res.output and "Traceback" not in res.output


def test_cli_validate_prints_resolved_and_explains(tmp_path):
    p = write(tmp_path, MINIMAL)
    res = CliRunner().invoke(app, ["validate", str(p), "--set", "stages.0.lr=0.5"])
    assert res.exit_code == 0 and "lr: 0.5" in res.output
    res = CliRunner().invoke(app, ["validate", "--explain", str(p), "--set",
                                   "stages=[{kind: distill, epochs: 1}, {kind: prune, round_to: 4}]"])
    assert res.exit_code == 0, res.output
    assert "stages.0.loss.0.kind = 'kl'" in res.output
    assert "dkd: Decoupled KD (Zhao et al. 2022" in res.output  # every objective is documented
    assert "stages.1.round_to = 4  # kept channel counts" in res.output  # the value set, not the default 8
