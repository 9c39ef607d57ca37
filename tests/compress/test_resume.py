"""Resume, per stage kind: a finished stage is reused bit for bit, a changed stage reruns
with every stage after it and none before, an interrupted stage (no metrics.json) reruns
alone and reproduces its weights; and data-free (synthetic) calibration through a run."""
import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file

from compress.config_load import load_config
from compress.pipeline import Pipeline

KINDS = ["distill", "prune", "quantize"]
FOLDERS = {"teacher": "00-teacher", "distill": "01-distill", "prune": "02-prune", "quantize": "03-quantize"}


def config(out, **data):
    return {"name": "res", "seed": 0,
            "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 64,
                     "synthetic": {"train_size": 128, "test_size": 64, "image_size": 16}, **data},
            "teacher": {"model": "resnet_tiny_teacher",
                        "train": {"epochs": 0.5, "lr": 0.01, "optimizer": "adamw", "augment": False}},
            "student": {"model": "resnet_tiny"},
            "stages": [{"kind": "distill", "epochs": 0.5, "lr": 0.01, "augment": False},
                       {"kind": "prune", "ratio": 0.5, "round_to": 4, "epochs": 0.5, "augment": False},
                       {"kind": "quantize", "calib_batches": 2, "epochs": 0.5, "augment": False}],
            "export": {"stages": ["quantize"]},
            "targets": [{"backend": "onnxruntime", "threads": 1}],
            "profile": {"warmup": 0, "max_warmup": 0, "runs": 100, "throughput_batch": 1, "throughput_runs": 1},
            "output": {"dir": str(out)}}


def run(out, overrides=(), **data):
    (out / "c.yaml").write_text(yaml.safe_dump(config(out, **data)))
    logs = []
    report = Pipeline(load_config(out / "c.yaml", list(overrides)), log=logs.append).run()
    ran = [s for s in FOLDERS if f"[{s}] up to date, skipped" not in logs]
    return report, ran, logs


def weights(run_dir, stage):
    return load_file(str(run_dir / FOLDERS[stage] / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    report, ran, _ = run(out)
    assert ran == list(FOLDERS)
    return out, report, {s: weights(out / "res", s) for s in FOLDERS}


def copy_of(first, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(first[0], out)
    return out


def test_unchanged_rerun_reuses_every_stage_and_reports_the_same_numbers(first, tmp_path):
    out = copy_of(first, tmp_path)
    report, ran, _ = run(out)
    assert ran == []
    stage_keys = ("name", "accuracy", "params", "macs", "size_bytes")
    assert [[s[k] for k in stage_keys] for s in report["stages"]] == \
        [[s[k] for k in stage_keys] for s in first[1]["stages"]]
    # the quantize stage was rebuilt from its folder: its ORT row is the same, to the bit
    a, b = first[1]["deployments"][0], report["deployments"][0]
    assert (a["accuracy"], a["agreement"], a["max_abs_diff"]) == (b["accuracy"], b["agreement"], b["max_abs_diff"])


@pytest.mark.parametrize("i, kind", list(enumerate(KINDS)))
def test_a_changed_stage_reruns_with_those_after_it(i, kind, first, tmp_path):
    out = copy_of(first, tmp_path)
    _, ran, logs = run(out, [f"stages.{i}.lr=0.003"])
    assert ran == KINDS[i:]
    # each rerun stage says why, in one line
    assert [line.split("]")[0][1:] for line in logs if "rerunning: its settings" in line] == KINDS[i:]
    for s in ["teacher", *KINDS[:i]]:  # untouched on disk
        assert same_weights(weights(out / "res", s), first[2][s]), s
    assert not same_weights(weights(out / "res", kind), first[2][kind])


@pytest.mark.parametrize("kind", ["distill", "prune", "quantize"])
def test_an_interrupted_stage_reruns_and_reproduces_its_weights(kind, first, tmp_path):
    """metrics.json is written last: without it the stage is not complete. Its rerun must give
    the same weights, since the stages after it are kept on the strength of the config hash."""
    out = copy_of(first, tmp_path)
    (out / "res" / FOLDERS[kind] / "metrics.json").unlink()
    _, ran, _ = run(out)
    assert ran == [kind]
    assert same_weights(weights(out / "res", kind), first[2][kind])


def test_synthetic_calibration_through_a_run(first, tmp_path):
    """data.calibration: synthetic reruns only the quantize stage, calibrating on images
    fitted to the teacher's BatchNorm statistics, cached under the run's cache/."""
    out = copy_of(first, tmp_path)
    synth = {"calibration": "synthetic", "synthesis": {"steps": 5, "batch_size": 32}}
    report, ran, logs = run(out, **synth)
    assert ran == ["quantize"]
    q = json.loads((out / "res" / FOLDERS["quantize"] / "metrics.json").read_text())
    assert q["calibration"] == "synthetic"
    assert any("data.calibration: synthetic" in line for line in logs)
    cached = list((out / "res" / "cache").glob("synthetic-calib-*.safetensors"))
    assert len(cached) == 1 and len(load_file(str(cached[0]))["labels"]) == 64  # calib_samples
    row = report["deployments"][0]
    assert row["status"] == "ok" and row["executed_precision"]["int8_layers"] == 7, row["reason"]
    # a changed synthesis reruns the quantize stage and synthesizes again; the rest is kept
    _, ran, _ = run(out, **{**synth, "synthesis": {"steps": 6, "batch_size": 32}})
    assert ran == ["quantize"] and len(list((out / "res" / "cache").glob("synthetic-calib-*"))) == 2
