"""A targets[] entry's backend options reach the runtime and are recorded in the row the
report is built from, with the profiler's statistics."""
import numpy as np
import pytest
import torch

from compress.config import ConfigError, TargetConfig, load_config
from compress.deploy import deploy_one
from compress.export import export_float, to_openvino
from tests.compress.test_parity import SHAPE, tiny_model
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage")
    model = tiny_model()
    export_float(model, d / "model.onnx", SHAPE, 17)
    to_openvino(d / "model.onnx", d / "model.xml")
    x = np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return d, x, ref


class P:  # the pipeline's view deploy_one needs
    cfg = load_config(ROOT / "examples" / "tiny.yaml", ["profile.runs=100", "profile.throughput_runs=2",
                                                         "profile.throughput_batch=8"])
    log = staticmethod(lambda s: None)


def deploy(stage, tcfg):
    d, x, ref = stage
    P.run_dir = d.parent
    manifest = {"precision": "fp32", "files": {"onnx": "model.onnx", "openvino": "model.xml"}}
    return deploy_one(P, "distill", d, manifest, tcfg, x, ref.argmax(1), ref)


def test_onnxruntime_options_are_applied_and_recorded(stage):
    row = deploy(stage, TargetConfig(backend="onnxruntime", threads=1, graph_optimization="basic",
                                     inter_op_threads=2))
    assert row["status"] == "ok", row["reason"]
    rt = row["runtime"]
    assert rt["graph_optimization"] == "ORT_ENABLE_BASIC" and rt["inter_op_threads"] == 2
    assert rt["providers"] == ["CPUExecutionProvider"]
    lat = row["latency_ms"]
    assert lat["threads"] == 1 and lat["ci95"] > 0 and lat["warmup"]["runs"] >= P.cfg.profile.warmup
    assert row["system"]["peak_rss_mb"] > 0 and row["throughput"]["batch"] == 8


def test_openvino_hint_and_fp16_weights_only_when_asked(stage):
    d = stage[0]
    plain = deploy(stage, TargetConfig(backend="openvino", threads=1))
    assert plain["runtime"]["artifact"] == "model.xml" and plain["runtime"]["performance_hint"] == "LATENCY"
    assert not (d / "model.fp16.xml").exists()
    row = deploy(stage, TargetConfig(backend="openvino", threads=1, performance_hint="THROUGHPUT",
                                     fp16_weights=True))
    assert row["status"] == "ok", row["reason"]
    assert row["runtime"]["artifact"] == "model.fp16.xml" and (d / "model.fp16.bin").is_file()
    assert (d / "model.fp16.bin").stat().st_size < 0.6 * (d / "model.bin").stat().st_size
    assert row["runtime"]["performance_hint"] == "THROUGHPUT" and row["runtime"]["inference_precision"] == "f32"
    assert row["throughput"]["infer_requests"] >= 1
    assert 0 < row["max_abs_diff"] < 1e-2  # fp16 weights: close, not identical


def test_cuda_device_without_the_provider_fails_with_the_reason(stage):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    row = deploy(stage, TargetConfig(backend="onnxruntime", device="cuda"))
    assert row["status"] == "failed" and "no CUDAExecutionProvider" in row["reason"]


def test_batch_profile_must_be_ordered(tmp_path):
    with pytest.raises(ConfigError, match=r"targets\.0\.batch_profile.*1 <= min <= opt <= max"):
        load_config(ROOT / "examples" / "tiny.yaml", ["targets=[{backend: tensorrt, batch_profile: [4, 2, 8]}]"])


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_where_present(stage):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()})")
    row = deploy(stage, TargetConfig(backend="onnxruntime", device="cuda"))
    assert row["status"] == "ok", row["reason"]
    assert row["runtime"]["providers"][0] == "CUDAExecutionProvider" and row["agreement"] >= 0.98


def test_tensorrt_row_is_skipped_here_but_says_whether_the_onnx_would_build(stage):
    ok, _ = __import__("targets.base", fromlist=["get"]).get("tensorrt").available()
    if ok:
        pytest.skip("tensorrt and a GPU are present here")
    row = deploy(stage, TargetConfig(backend="tensorrt", fp16_weights=True))
    assert row["status"] == "skipped" and row["reason"].startswith("tensorrt is not importable")
    assert "TRT-ready ONNX (fp16) passes onnx.checker and Q/DQ placement, max |diff| on ORT" in row["reason"]
    assert (stage[0] / "model.trt.onnx").is_file()
