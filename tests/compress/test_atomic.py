"""Nothing half-written is trusted: metrics.json and manifest.json carry the sha256 of what they
describe and of themselves; a truncated, hand-edited or replaced artifact makes its stage rerun
(or its export redo) with one line saying why, never a traceback; the issue's scenario (a run
killed right after it replaced a finished stage's weights) included. Config hashes leave out
defaults, so a new field with its default keeps finished stages finished."""
import json
import shutil
from typing import Literal

import pytest
import torch
import yaml
from pydantic import BaseModel
from safetensors.torch import load_file

import compress.pipeline as pipeline_module
from compress.checkpoint import read_sealed, write_sealed
from compress.config import config_hash
from compress.config_load import load_config
from compress.pipeline import Pipeline


def config(out, **distill) -> dict:
    return {"name": "at", "seed": 1,
            "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 32,
                     "synthetic": {"train_size": 128, "test_size": 64, "image_size": 16}},
            "teacher": {"model": "resnet_tiny_teacher", "train": {"epochs": 0.5, "lr": 0.01, "augment": False}},
            "student": {"model": "resnet_tiny"},
            "stages": [{"kind": "distill", "epochs": 1, "lr": 0.01, "augment": False, **distill}],
            "export": {"stages": ["distill"]}, "targets": [{"backend": "onnxruntime", "threads": 1}],
            "profile": {"warmup": 0, "max_warmup": 0, "runs": 100, "throughput_batch": 1, "throughput_runs": 1},
            "output": {"dir": str(out)}}


def run(out, full=False, **distill):
    (out / "c.yaml").write_text(yaml.safe_dump(config(out, **distill)))
    logs = []
    p = Pipeline(load_config(out / "c.yaml"), log=logs.append)
    p.run() if full else p.run_stages()
    return logs


def why(logs, stage="distill"):
    lines = [s for s in logs if s.startswith(f"[{stage}] rerunning")]
    assert len(lines) == 1, logs
    return lines[0]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    run(out, full=True)
    return out


@pytest.fixture
def out(first, tmp_path):
    shutil.copytree(first, tmp_path / "r")
    return tmp_path / "r"


def weights(out):  # copies: load_file maps the file, which a test then truncates in place
    return {k: v.clone() for k, v in load_file(str(out / "at" / "01-distill" / "model.safetensors")).items()}


def test_an_intact_run_is_skipped_and_its_metrics_carry_digests(out):
    logs = run(out)
    assert "[distill] up to date, skipped" in logs and "[teacher] up to date, skipped" in logs
    rec, problem = read_sealed(out / "at" / "01-distill" / "metrics.json")
    assert problem == "" and set(rec["digests"]) == {"model.safetensors", "structure.json"}


def truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def hand_edit(p):
    rec = json.loads(p.read_text())
    rec["accuracy"], rec["params"] = 0.9999, 12
    p.write_text(json.dumps(rec))


@pytest.mark.parametrize("name, damage, expected", [
    ("metrics.json", truncate, "metrics.json is unreadable"),
    ("metrics.json", hand_edit, "metrics.json was changed after it was written"),
    ("model.safetensors", truncate, "model.safetensors is not the file metrics.json was written for"),
    ("structure.json", truncate, "structure.json is not the file metrics.json was written for"),
])
def test_a_damaged_artifact_reruns_its_stage_with_one_line(out, name, damage, expected):
    before = weights(out)
    damage(out / "at" / "01-distill" / name)
    logs = run(out)
    assert expected in why(logs)
    assert "[teacher] up to date, skipped" in logs
    after = weights(out)  # repaired: the rerun writes the same weights again
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "[distill] up to date, skipped" in run(out)


def test_new_weights_beside_old_metrics_are_not_trusted(out, monkeypatch):
    """The issue's scenario: a re-run with one changed value killed right after it replaced the
    stage's weights; the next run of the old config must not report or deploy the old metrics."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline_module, "write_sealed", killed)
    with pytest.raises(KeyboardInterrupt):
        run(out, lr=0.003)
    monkeypatch.undo()
    logs = run(out)
    assert "model.safetensors is not the file metrics.json was written for" in why(logs)


def test_legacy_metrics_without_digests_are_checked_against_the_weights_metadata(out, monkeypatch):
    m = out / "at" / "01-distill" / "metrics.json"
    rec = json.loads(m.read_text())
    legacy = {k: v for k, v in rec.items() if k not in ("digest", "digests")}
    m.write_text(json.dumps(legacy))  # as written before this change
    assert "[distill] up to date, skipped" in run(out)
    monkeypatch.setattr(pipeline_module, "write_sealed", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(out, lr=0.003)  # new weights (their metadata says another hash) beside legacy metrics
    monkeypatch.undo()
    m.write_text(json.dumps(legacy))
    assert "model.safetensors was written by another run" in why(run(out))


def test_a_damaged_manifest_or_onnx_exports_again(out):
    sdir = out / "at" / "01-distill"
    truncate(sdir / "model.onnx")
    logs = run(out, full=True)
    assert any(s.startswith("[distill] exporting again: model.onnx is not the file manifest.json") for s in logs)
    assert read_sealed(sdir / "manifest.json")[1] == ""
    (sdir / "manifest.json").write_text('{"files": {"onnx": "model.on')
    logs = run(out, full=True)
    assert any(s.startswith("[distill] exporting again: manifest.json is unreadable") for s in logs)


def test_an_unreadable_training_checkpoint_is_ignored_with_one_line(out):
    m = out / "at" / "01-distill" / "metrics.json"
    h = json.loads(m.read_text())["config_hash"]
    m.unlink()  # the stage was interrupted; its checkpoint is garbage
    resume = out / "at" / "01-distill" / ".resume"
    resume.mkdir()
    (resume / "stage.json").write_text(json.dumps({"config_hash": h}))
    (resume / "fit-0.pt").write_bytes(b"PK\x03\x04 truncated")
    logs = run(out)
    assert len([s for s in logs if "ignoring fit-0.pt: unreadable" in s]) == 1 and m.is_file()
    assert not resume.exists()


def test_sealed_records_cover_the_openvino_bin(tmp_path):
    (tmp_path / "model.xml").write_text("<net/>")
    (tmp_path / "model.bin").write_bytes(b"\0" * 8)
    write_sealed(tmp_path / "manifest.json", {"files": {"openvino": "model.xml"}}, ["model.xml"])
    assert read_sealed(tmp_path / "manifest.json")[1] == ""
    (tmp_path / "model.bin").write_bytes(b"\1" * 8)
    assert "model.bin is not the file" in read_sealed(tmp_path / "manifest.json")[1]


class Old(BaseModel):
    kind: Literal["distill"] = "distill"
    lr: float = 2e-3


class New(Old):
    sharpen: bool = False  # a field a later release adds, with a default that keeps behaviour


def test_a_new_field_with_its_default_keeps_the_hash():
    assert config_hash(Old(lr=0.01)) == config_hash(New(lr=0.01))
    assert config_hash(New(lr=0.01, sharpen=True)) != config_hash(Old(lr=0.01))
    assert config_hash(Old(lr=0.01)) != config_hash(Old(lr=0.02))
    # a value set to its default is the same behaviour, so the same hash
    assert config_hash(Old(lr=2e-3)) == config_hash(Old())


def test_setting_a_field_to_its_default_keeps_finished_stages(out):
    logs = run(out, warmup_epochs=0.0, channels_last=True)
    assert "[distill] up to date, skipped" in logs


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_teacher_cache_is_built_again_with_one_line(tmp_path, damage):
    from types import SimpleNamespace

    from calib.datasets import Split
    from compress.distill.cache import build_or_load
    data = SimpleNamespace(train=Split(torch.arange(40, dtype=torch.uint8).reshape(10, 1, 2, 2), torch.zeros(10)),
                           normalize=lambda x: x.float())
    forward = lambda x: x.flatten(1) * 2  # noqa: E731
    args = ("full", 8, 1.0, forward, "t", "d", data, tmp_path, 0, "cpu")
    first = build_or_load(*args, log=lambda s: None).t["logits"]
    path = next(tmp_path.glob("teacher-*.safetensors"))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-7]
    else:
        raw[-3] ^= 0xFF  # a flipped bit in the tensor data: safetensors itself reads it fine
    path.write_bytes(bytes(raw))
    logs = []
    again = build_or_load(*args, log=logs.append).t["logits"]
    assert torch.equal(first, again)
    assert len([s for s in logs if "teacher cache: teacher-" in s and "building it again" in s]) == 1, logs
    logs = []
    build_or_load(*args, log=logs.append)
    assert logs == [f"  teacher cache: reusing {path.name}"]
