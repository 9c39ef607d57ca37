"""A backend added from outside the package, without editing it: registered here, accepted by
the config, deployed by a whole (shortened) run of examples/tiny.yaml next to a built-in
backend whose parity gate must fail, so the CLI's exit code says a deployment failed."""
import dataclasses
import json

import pytest
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from cli import app
from compress.config import ConfigError
from compress.config_load import load_config
from targets import base
from targets.onnxruntime import TARGET as ORT
from targets.onnxruntime import OrtRunner, read_tensors
from tests.conftest import ROOT

NAME = "ort-noopt"
TINY = str(ROOT / "examples" / "tiny.yaml")


class NoOptions(BaseModel):
    """ONNX Runtime with every graph optimization off: nothing to set."""
    model_config = ConfigDict(extra="forbid")


class OrtNoOptTarget:
    """ONNX Runtime with graph optimizations disabled (no fusion: Q/DQ stay float ops)."""
    name, artifact, suffixes, Options = NAME, "onnx", (".onnx",), NoOptions

    def _ort(self, cfg: base.CompileOptions) -> base.CompileOptions:
        return dataclasses.replace(cfg, options=ORT.Options(graph_optimization="disable"))

    def available(self):
        return ORT.available()

    def prepare(self, onnx_path, work_dir):
        return onnx_path

    def compile(self, artifact, cfg):
        return OrtRunner(artifact, self._ort(cfg))

    def intermediate_outputs(self, artifact, tensors, x, cfg):
        return read_tensors(artifact, tensors, x, self._ort(cfg))

    def check_offline(self, onnx_path, cfg, x):
        return ""

    def read_input(self, artifact):
        raise NotImplementedError("ONNX files only")


TARGET = OrtNoOptTarget()


@pytest.fixture(scope="module")
def registered():
    base.register(NAME, f"{__name__}:TARGET")
    yield NAME
    base._TABLE.pop(NAME)  # leave the table as the package defines it for other tests


def test_registration_is_checked_and_a_config_accepts_the_new_backend(registered):
    with pytest.raises(ValueError, match="already registered"):
        base.register(NAME, "elsewhere:TARGET")
    cfg = load_config(TINY, [f"targets=[{{backend: {NAME}, threads: 1}}]"])
    assert cfg.targets[0].backend == NAME and type(cfg.targets[0].options) is NoOptions
    with pytest.raises(ConfigError, match=rf"graph_optimization: an option of backend onnxruntime, not of {NAME} "
                                          r"\(its options: none\)"):
        load_config(TINY, [f"targets=[{{backend: {NAME}, graph_optimization: basic}}]"])


@pytest.mark.slow
def test_a_run_deploys_on_the_registered_backend_and_a_failed_gate_exits_1(registered, tmp_path):
    res = CliRunner().invoke(app, [
        "run", TINY, "--set", f"output.dir={tmp_path}", "--set", "teacher.train.epochs=1",
        "--set", "stages=[{kind: distill, epochs: 1, lr: 0.01, augment: false}]",
        "--set", f"targets=[{{backend: {NAME}, threads: 1}}, "
                 "{backend: onnxruntime, threads: 1, parity: {max_abs_diff: 1.0e-30}}]",
        "--set", "profile={warmup: 2, max_warmup: 0, runs: 100, throughput_batch: 8, throughput_runs: 2}"])
    assert res.exit_code == 1, res.output
    assert "error: at least one deployment failed (see the status/reason columns)\n" in res.output
    rows = json.loads((tmp_path / "tiny" / "report.json").read_text())["deployments"]
    assert [(r["stage"], r["backend"]) for r in rows] == [
        ("teacher", NAME), ("teacher", "onnxruntime"), ("distill", NAME), ("distill", "onnxruntime")]
    for mine, builtin in (rows[0:2], rows[2:4]):
        assert mine["status"] == "ok" and mine["agreement"] >= 0.98, mine
        assert mine["runtime"]["graph_optimization"] == "ORT_DISABLE_ALL"  # read back from its session
        assert builtin["runtime"]["graph_optimization"] == "ORT_ENABLE_ALL"
        assert builtin["status"] == "failed" and "max |delta logit|" in builtin["reason"]
        assert "every compute layer within layer_tolerance 0.02" in builtin["reason"]
        assert builtin["diverging_layers"]["mapped"] and builtin["diverging_layers"]["backend"] == "onnxruntime"


def test_user_mistakes_exit_2_with_one_line(tmp_path):
    res = CliRunner().invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and res.output.strip() == f"{tmp_path / 'missing.yaml'}: config file not found"
    res = CliRunner().invoke(app, ["run", TINY, "--set", "targets=[{backend: tflite}]"])
    assert res.exit_code == 2 and "targets.0.backend: unknown backend 'tflite'" in res.output
