"""`teacher: self` through a run: a finished quantize stage is reused, an interrupted one reruns
and reproduces its weights from the same float model (reading its self-teacher cache), and
switching the teacher reruns the quantize stage alone (tests/compress/test_resume.py's style)."""
import shutil

import pytest
import yaml
from safetensors.torch import load_file

from compress.config_load import load_config
from compress.pipeline import Pipeline
from tests.compress.test_resume import same_weights

STAGES = {"teacher": "00-teacher", "distill": "01-distill", "quantize": "02-quantize"}


def config(out):
    return {"name": "selfq", "seed": 0,
            "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 64,
                     "synthetic": {"train_size": 128, "test_size": 64, "image_size": 16}},
            "teacher": {"model": "resnet_tiny_teacher",
                        "train": {"epochs": 0.5, "lr": 0.01, "optimizer": "adamw", "augment": False}},
            "student": {"model": "resnet_tiny"},
            "stages": [{"kind": "distill", "epochs": 0.5, "lr": 0.01, "augment": False},
                       {"kind": "quantize", "calib_batches": 2, "epochs": 0.5, "augment": False,
                        "cache": "full", "teacher": "self"}],
            "export": {"stages": ["quantize"]},
            "targets": [{"backend": "onnxruntime", "threads": 1}],
            "profile": {"warmup": 0, "max_warmup": 0, "runs": 100, "throughput_batch": 1, "throughput_runs": 1},
            "output": {"dir": str(out)}}


def run(out, overrides=()):
    (out / "c.yaml").write_text(yaml.safe_dump(config(out)))
    logs = []
    report = Pipeline(load_config(out / "c.yaml", list(overrides)), log=logs.append).run()
    ran = [s for s in STAGES if f"[{s}] up to date, skipped" not in logs]
    return report, ran, logs


def weights(out, stage="quantize"):
    return load_file(str(out / "selfq" / STAGES[stage] / "model.safetensors"))


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("selfq")
    report, ran, logs = run(out)
    assert ran == list(STAGES)
    assert any("QAT teacher: self" in line for line in logs)
    return out, report, weights(out)


def copy_of(first, tmp_path):
    shutil.copytree(first[0], tmp_path / "runs")
    return tmp_path / "runs"


def test_the_self_distilled_run_deploys_int8(first):
    row = first[1]["deployments"][0]
    assert row["status"] == "ok" and row["executed_precision"]["int8_layers"] == 7, row.get("reason")
    caches = list((first[0] / "selfq" / "cache").glob("teacher-float-*-full.safetensors"))
    assert len(caches) == 1  # keyed by the distilled student's weights, not the run's teacher


def test_unchanged_rerun_skips_and_interrupted_quantize_reproduces(first, tmp_path):
    out = copy_of(first, tmp_path)
    _, ran, _ = run(out)
    assert ran == []
    (out / "selfq" / STAGES["quantize"] / "metrics.json").unlink()
    _, ran, logs = run(out)
    assert ran == ["quantize"]
    assert any("teacher cache: reusing teacher-float-" in line for line in logs)
    assert same_weights(weights(out), first[2])


def test_switching_the_teacher_reruns_quantize_alone(first, tmp_path):
    out = copy_of(first, tmp_path)
    _, ran, _ = run(out, ["stages.1.teacher=configured"])
    assert ran == ["quantize"]
    assert not same_weights(weights(out), first[2])
    assert same_weights(weights(out, "distill"), weights(first[0], "distill"))
