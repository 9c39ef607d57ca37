import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets import base


def tiny_onnx(path, rng):
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, built by hand."""
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    fw = rng.standard_normal((3, 4)).astype(np.float32)
    fb = rng.standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (fw, "fw"), (fb, "fb"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))

    def reference(x):
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        conv = np.zeros((len(x), 4, 8, 8), np.float32)
        for i in range(3):
            for j in range(3):
                conv += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 8, j:j + 8], w[:, :, i, j])
        pooled = np.maximum(conv + b[None, :, None, None], 0).mean((2, 3))
        return pooled @ fw.T + fb
    return reference


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_cpu_backends_run_a_handmade_onnx(backend, tmp_path):
    rng = np.random.default_rng(0)
    ref = tiny_onnx(tmp_path / "m.onnx", rng)
    target = base.get(backend)
    path = target.prepare(tmp_path / "m.onnx", tmp_path)  # the backend's own format
    assert path.suffix in target.suffixes and path.is_file()
    runner = target.compile(path, base.CompileOptions(threads=1, work_dir=tmp_path))
    x = rng.standard_normal((5, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(runner(x), ref(x), atol=1e-4, rtol=1e-4)
    ep = runner.info["executed_precision"]
    assert ep["int8_layers"] == 0 and ep["compute_layers"] == 2
    if backend == "openvino":  # f32 asked for explicitly, never bf16 behind our back
        assert path.suffix == ".xml" and path.with_suffix(".bin").is_file()
        assert runner.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
        assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    else:
        assert path == tmp_path / "m.onnx"
        assert runner.session.get_session_options().intra_op_num_threads == 1


def test_tensorrt_reports_why_it_is_unavailable():
    ok, reason = base.get("tensorrt").available()
    if ok:
        pytest.skip("tensorrt and a GPU are present here")
    assert reason and ("tensorrt is not importable" in reason or "no CUDA GPU" in reason)


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnx(tmp_path):
    ok, reason = base.get("tensorrt").available()
    if not ok:
        pytest.skip(reason)
    rng = np.random.default_rng(0)
    ref = tiny_onnx(tmp_path / "m.onnx", rng)
    runner = base.get("tensorrt").compile(tmp_path / "m.onnx", base.CompileOptions(work_dir=tmp_path))
    x = rng.standard_normal((5, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(runner(x), ref(x), atol=1e-3, rtol=1e-3)
    assert (tmp_path / "m.engine").is_file()


def test_registry_is_explicit():
    assert base.names()[:3] == base.builtin() == ["onnxruntime", "openvino", "tensorrt"]
    with pytest.raises(ValueError, match="unknown backend 'tflite'"):
        base.get("tflite")
    with pytest.raises(ValueError, match="already registered"):
        base.register("openvino", "x:y")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_compress_profile_on_any_onnx_file(backend, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli import app
    tiny_onnx(tmp_path / "m.onnx", np.random.default_rng(0))
    res = CliRunner().invoke(app, ["profile", str(tmp_path / "m.onnx"), "--backend", backend,
                                   "--threads", "1", "--runs", "100", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["input_shape"] == [1, 1, 8, 8] and out["latency_ms"]["runs"] == 100
    assert 0 < out["latency_ms"]["p50"] <= out["latency_ms"]["p99"]
    assert out["throughput"]["items_per_s"] > 0
    assert out["executed_precision"]["compute_layers"] == 2


def test_compress_profile_bad_file_is_one_clear_error(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    res = CliRunner().invoke(app, ["profile", str(tmp_path / "bad.onnx")])
    assert res.exit_code == 2 and "bad.onnx: not a valid ONNX model" in res.output
    assert "Traceback" not in res.output
