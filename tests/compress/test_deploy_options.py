"""A targets[] entry's backend options reach the runtime (read back from the ONNX Runtime
session / the OpenVINO compiled model, not from our own records) and the row the report is
built from carries the profiler's statistics."""
import numpy as np
import pytest
import torch

from compress.config import ConfigError, TargetConfig
from compress.config_load import load_config
from compress.deploy import deploy_one
from compress.export import export_float
from compress.plan import deployment_plan, target_spec
from targets import base
from tests.compress.test_parity import SHAPE, tiny_model
from tests.conftest import ROOT

CFG = load_config(ROOT / "examples" / "tiny.yaml", ["profile.runs=100", "profile.throughput_runs=2",
                                                     "profile.throughput_batch=8", "profile.throughput_search=true"])


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage")
    model = tiny_model()
    export_float(model, d / "model.onnx", SHAPE, 17)
    base.get("openvino").prepare(d / "model.onnx", d)
    x = np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return d, x, ref


class Spy:
    """Wraps a built-in target and keeps the runner it compiled, to read the runtime's own state."""

    def __init__(self, target):
        self.target, self.runners = target, []

    def __getattr__(self, name):
        return getattr(self.target, name)

    def compile(self, artifact, cfg):
        self.runners.append(self.target.compile(artifact, cfg))
        return self.runners[-1]


def deploy(stage, entry: TargetConfig, monkeypatch=None):
    """Deploy the stage's export on one entry; with monkeypatch, also the runner compiled."""
    d, x, ref = stage
    spy = Spy(base.get(entry.backend))
    if monkeypatch is not None:
        get = base.get
        monkeypatch.setattr(base, "get", lambda n: spy if n == entry.backend else get(n))
    plan = deployment_plan(CFG, [], {}, None, d.parent, log=lambda s: None)
    manifest = {"precision": "fp32", "files": {"onnx": "model.onnx", "openvino": "model.xml"}}
    row = deploy_one(plan, "distill", d, manifest, target_spec(entry), x, ref.argmax(1), ref)
    return row, (spy.runners[0] if spy.runners else None)


def test_onnxruntime_options_reach_the_session(stage, monkeypatch):
    import onnxruntime as ort
    row, runner = deploy(stage, TargetConfig(backend="onnxruntime", threads=1, graph_optimization="basic",
                                             inter_op_threads=2), monkeypatch)
    assert row["status"] == "ok", row["reason"]
    so = runner.session.get_session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.inter_op_num_threads == 2 and so.intra_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert runner.session.get_providers() == ["CPUExecutionProvider"]
    assert row["runtime"]["graph_optimization"] == "ORT_ENABLE_BASIC"  # the report says what ran
    lat = row["latency_ms"]
    assert lat["threads"] == 1 and lat["ci95"] > 0 and lat["warmup"]["runs"] >= CFG.profile.warmup
    assert row["system"]["peak_rss_mb"] > 0 and row["throughput"]["batch"] == 8


def test_options_written_nested_or_flat_are_the_same_entry():
    flat = TargetConfig(backend="onnxruntime", graph_optimization="basic")
    nested = TargetConfig.model_validate({"backend": "onnxruntime", "options": {"graph_optimization": "basic"}})
    assert flat.options.graph_optimization == nested.options.graph_optimization == "basic"
    assert type(flat.options) is base.get("onnxruntime").Options


def test_openvino_hint_and_fp16_weights_only_when_asked(stage, monkeypatch):
    d = stage[0]
    plain, runner = deploy(stage, TargetConfig(backend="openvino", threads=1), monkeypatch)
    assert plain["status"] == "ok", plain["reason"]
    assert str(runner.compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert not (d / "model.fp16.xml").exists()
    monkeypatch.undo()
    row, runner = deploy(stage, TargetConfig(backend="openvino", threads=1, performance_hint="THROUGHPUT",
                                             fp16_weights=True), monkeypatch)
    assert row["status"] == "ok", row["reason"]
    assert str(runner.compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert runner.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    assert row["runtime"]["artifact"] == "model.fp16.xml" and (d / "model.fp16.bin").is_file()
    assert (d / "model.fp16.bin").stat().st_size < 0.6 * (d / "model.bin").stat().st_size
    assert row["throughput"]["infer_requests"] >= 1
    assert 0 < row["max_abs_diff"] < 1e-2  # fp16 weights: close, not identical


def test_cuda_device_without_the_provider_fails_with_the_reason(stage):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    row, _ = deploy(stage, TargetConfig(backend="onnxruntime", device="cuda"))
    assert row["status"] == "failed" and "no CUDAExecutionProvider" in row["reason"]


def test_batch_profile_must_be_ordered():
    with pytest.raises(ConfigError, match=r"targets\.0\.batch_profile.*1 <= min <= opt <= max"):
        load_config(ROOT / "examples" / "tiny.yaml", ["targets=[{backend: tensorrt, batch_profile: [4, 2, 8]}]"])


def test_another_backends_option_says_whose_it_is():
    with pytest.raises(ConfigError, match=r"targets\.0\.performance_hint: an option of backend openvino, "
                                          r"not of onnxruntime \(its options: graph_optimization, inter_op_threads\)"):
        load_config(ROOT / "examples" / "tiny.yaml", ["targets=[{backend: onnxruntime, performance_hint: LATENCY}]"])
    with pytest.raises(ConfigError, match=r"targets\.0\.backend: unknown backend 'tflite': expected one of "):
        load_config(ROOT / "examples" / "tiny.yaml", ["targets=[{backend: tflite}]"])
    with pytest.raises(ConfigError, match=r"export.openvino_ir: moved: each target converts the ONNX"):
        load_config(ROOT / "examples" / "tiny.yaml", ["export.openvino_ir=false"])


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_where_present(stage):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()})")
    row, _ = deploy(stage, TargetConfig(backend="onnxruntime", device="cuda"))
    assert row["status"] == "ok", row["reason"]
    assert row["runtime"]["providers"][0] == "CUDAExecutionProvider" and row["agreement"] >= 0.98


def test_tensorrt_row_is_skipped_here_but_says_whether_the_onnx_would_build(stage):
    ok, _ = base.get("tensorrt").available()
    if ok:
        pytest.skip("tensorrt and a GPU are present here")
    row, _ = deploy(stage, TargetConfig(backend="tensorrt", fp16_weights=True))
    assert row["status"] == "skipped" and row["reason"].startswith("tensorrt is not importable")
    assert "TRT-ready ONNX (fp16) passes onnx.checker and Q/DQ placement, max |diff| on ORT" in row["reason"]
    assert (stage[0] / "model.trt.onnx").is_file()
