"""The `compress` command's exit codes as CI reads them: 0 all good, 1 a deployment failed
(after writing the whole report), 2 a user mistake, told in one line without a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from tests.conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it: its own process, its real exit code and stderr."""
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def invoke(*args: str):
    """In-process (fast); an exception that escaped the command is a bug, never a user error."""
    res = CliRunner().invoke(app, [*map(str, args)])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def teacher_only(out: Path, **extra) -> Path:
    """A run of one barely trained tiny teacher, deployed on ONNX Runtime and OpenVINO."""
    cfg = {"name": "gate", "seed": 0,
           "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64,
                    "synthetic": {"train_size": 128, "test_size": 64, "image_size": 16}},
           "teacher": {"model": "resnet_tiny_teacher",
                       "train": {"epochs": 0.25, "lr": 0.01, "optimizer": "adamw", "augment": False}},
           "stages": [],
           "targets": [{"backend": "onnxruntime", "threads": 1}, {"backend": "openvino", "threads": 1}],
           "profile": {"warmup": 0, "max_warmup": 0, "runs": 100, "throughput_batch": 1, "throughput_runs": 1},
           "output": {"dir": str(out)}, **extra}
    (out / "gate.yaml").write_text(yaml.safe_dump(cfg))
    return out / "gate.yaml"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_validate_accepts_every_example(path):
    if "torchvision:" in path.read_text():  # the vision extra and the folder `make example-folder` writes
        pytest.importorskip("torchvision", reason=f"{path.name} needs the vision extra")
        if not (ROOT / "runs" / "data" / "fashion_mnist_folder" / "train").is_dir():
            pytest.skip(f"{path.name}: its image folder is not written (make example-folder)")
    res = invoke("validate", path)
    assert res.exit_code == 0, res.output
    resolved = yaml.safe_load(res.output)  # the resolved config, as YAML a user can keep
    assert resolved["name"] == yaml.safe_load(path.read_text())["name"]


def test_validate_names_a_bad_key_in_one_line_without_traceback(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text((ROOT / "examples" / "tiny.yaml").read_text().replace("seed: 0", "sed: 0"))
    res = cli("validate", p)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    # a header naming the file and the count, then one line per error
    assert lines == [f"{p}: invalid config (1 error)", "  sed: unknown key"], res.stderr


@pytest.mark.parametrize("args, message", [
    (["validate", "{tmp}/missing.yaml"], "missing.yaml: config file not found"),
    (["validate", "{tmp}/broken.yaml"], "broken.yaml: not valid YAML"),
    (["run", "{tiny}", "--set", "seed"], "--set 'seed': expected KEY.PATH=VALUE"),
    (["run", "{tiny}", "--set", "stages.7.lr=1"], "list index out of range"),
    (["run", "{tiny}", "--set", "student.model=no_such_pkg:make"], "cannot import module 'no_such_pkg'"),
    (["run", "{tiny}", "--set", "output.dir={tmp}", "--set", "data.dataset=no_such_pkg:data"],
     "data.dataset='no_such_pkg:data': cannot import module"),
    (["run", "{tiny}", "--set", "output.dir={tmp}", "--set", "teacher.train=null",
      "--set", "teacher.checkpoint={tmp}/none.safetensors"], "none.safetensors"),
    (["profile", "{tmp}/broken.yaml"], "broken.yaml: onnxruntime compiles .onnx files, not .yaml"),
], ids=["missing-file", "bad-yaml", "set-syntax", "set-index", "model-import", "dataset-import",
        "checkpoint-missing", "profile-not-onnx"])
def test_user_mistakes_exit_2_with_the_reason_and_no_traceback(args, message, tmp_path):
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    args = [a.format(tmp=tmp_path, tiny=ROOT / "examples" / "tiny.yaml") for a in args]
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not any(tmp_path.glob("*/00-teacher"))  # nothing ran


@pytest.fixture(scope="module")
def failed_gate(tmp_path_factory):
    """OpenVINO with FP16-compressed weights differs from torch by ~1e-4 on every logit,
    whatever the model (ORT's int8 kernels, by contrast, often match brevitas exactly, so
    a tight gate on an int8 stage does not fail reliably); max_abs_diff 1e-6 fails it."""
    out = tmp_path_factory.mktemp("gate")
    cfg = teacher_only(out)
    res = cli("run", cfg, "--set", "targets.1.fp16_weights=true", "--set", "targets.1.parity.max_abs_diff=1e-6")
    return out, cfg, res


def test_run_exits_1_when_a_deployment_fails_its_gate_after_writing_the_report(failed_gate):
    out, _, res = failed_gate
    assert res.returncode == 1, res.stderr[-3000:]
    assert "error: at least one deployment failed" in res.stderr and "Traceback" not in res.stderr
    report = json.loads((out / "gate" / "report.json").read_text())
    rows = {d["backend"]: d for d in report["deployments"]}
    assert rows["onnxruntime"]["status"] == "ok"
    bad = rows["openvino"]
    assert bad["status"] == "failed" and "max_abs_diff 1e-06" in bad["reason"]
    assert 1e-6 < bad["max_abs_diff"] < 1e-2  # fp16 rounding, not a broken model
    assert "| teacher | openvino | fp32 | failed |" in (out / "gate" / "report.md").read_text()


def test_run_exits_0_when_every_deployment_passes(failed_gate):
    out, cfg, _ = failed_gate
    res = cli("run", cfg)  # the same run without the tight gate: the teacher is reused
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[teacher] up to date, skipped" in res.stdout
    report = json.loads((out / "gate" / "report.json").read_text())
    assert [d["status"] for d in report["deployments"]] == ["ok", "ok"]
    assert max(d["max_abs_diff"] for d in report["deployments"]) < 1e-4


def test_unknown_export_stage_is_a_user_error(tmp_path):
    res = invoke("run", teacher_only(tmp_path), "--set", "export.stages=[teacher, distil]")
    assert res.exit_code == 2 and "export.stages: ['distil'] are not stages of this run" in res.output
    assert "Traceback" not in res.output
