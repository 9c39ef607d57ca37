"""`compress profile` on files we did not export: shapes inferred or given, both CPU
backends, and one clear error for each kind of bad input."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from cli import app
from tests.targets.test_backends import tiny_onnx


def dynamic_onnx(path):
    """Every input dimension symbolic, as many downloaded models are: Relu(MatMul(x, w))."""
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])], "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def profile(*args):
    return CliRunner().invoke(app, ["profile", *map(str, args), "--threads", "1", "--runs", "100",
                                    "--throughput-runs", "2", "--warmup", "2"])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_dynamic_model_runs_with_the_shape_given(backend, tmp_path):
    dynamic_onnx(tmp_path / "d.onnx")
    res = profile(tmp_path / "d.onnx", "--backend", backend, "--shape", "6", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["input_shape"] == [1, 6] and out["input_dtype"] == "float32"
    lat = out["latency_ms"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"] and lat["ci95"] > 0 and lat["warmup"]["runs"] >= 2
    assert out["system"]["peak_rss_mb"] > 0 and out["system"]["threads"] == 1
    assert out["throughput"]["batch"] == 64 and out["throughput"]["items_per_s"] > 0
    if backend == "openvino":  # the throughput mode is the plugin's own
        assert out["throughput"]["infer_requests"] >= 1 and "THROUGHPUT" in out["throughput"]["mode"]


@pytest.mark.parametrize("level, kernel", [("disable", "MatMul"), ("basic", "Gemm"), (None, "FusedGemm")])
def test_graph_optimization_level_changes_the_kernels_run(level, kernel, tmp_path):
    """MatMul + Add + Relu: left alone, fused to Gemm (basic), then with its Relu to FusedGemm
    (extended and above, the default): the executed graph shows which level ran."""
    w = numpy_helper.from_array(np.ones((6, 3), np.float32), "w")
    b = numpy_helper.from_array(np.ones(3, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    res = profile(tmp_path / "g.onnx", "--backend", "onnxruntime", "--json",
                  *(("--graph-opt", level) if level else ()))
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["executed_precision"]["detail"] == {kernel: 1}


def test_dynamic_model_without_shape_says_what_to_give(tmp_path):
    dynamic_onnx(tmp_path / "d.onnx")
    res = profile(tmp_path / "d.onnx")
    assert res.exit_code == 2 and "d.onnx: input shape [None, None] has dynamic dimensions" in res.output
    assert "--shape" in res.output and "Traceback" not in res.output


def test_wrong_shape_names_the_option_and_the_file(tmp_path):
    tiny_onnx(tmp_path / "m.onnx", np.random.default_rng(0))
    for bad in ("3x8x8", "8x8", "1xAx8"):
        res = profile(tmp_path / "m.onnx", "--shape", bad)
        assert res.exit_code == 2 and f"--shape {bad}" in res.output, res.output
        assert "Traceback" not in res.output
    assert "m.onnx takes input [None, 1, 8, 8]" in profile(tmp_path / "m.onnx", "--shape", "3x8x8").output


def test_fixed_batch_file_and_wrong_backend_are_clear_errors(tmp_path):
    tiny_onnx(tmp_path / "m.onnx", np.random.default_rng(0))
    m = onnx.load(str(tmp_path / "m.onnx"))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(m, str(tmp_path / "fixed.onnx"))
    res = profile(tmp_path / "fixed.onnx", "--batch", "1")
    assert res.exit_code == 2 and "fixed.onnx has a fixed batch of 2; use --batch 2" in res.output
    ok = profile(tmp_path / "fixed.onnx", "--batch", "2", "--json")
    assert ok.exit_code == 0 and json.loads(ok.output)["throughput"]["batch"] == 2
    (tmp_path / "m.xml").write_text("<net/>")
    res = profile(tmp_path / "m.xml", "--backend", "onnxruntime")
    assert res.exit_code == 2 and "m.xml: onnxruntime compiles .onnx files, not .xml" in res.output
    res = profile(tmp_path / "m.xml", "--backend", "openvino")
    assert res.exit_code == 2 and "m.xml: not a readable OpenVINO IR" in res.output, res.output


def test_backend_options_are_checked_by_the_backend(tmp_path):
    """--option KEY=VALUE (and the --hint/--inter-op/--graph-opt shorthands) go through the
    backend's own options model: applied where they belong, one clear error where not."""
    tiny_onnx(tmp_path / "m.onnx", np.random.default_rng(0))
    ok = profile(tmp_path / "m.onnx", "--backend", "openvino", "--option", "performance_hint=THROUGHPUT", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["runtime"]["performance_hint"] == "THROUGHPUT"  # read from the compiled model
    res = profile(tmp_path / "m.onnx", "--backend", "onnxruntime", "--hint", "THROUGHPUT")
    assert res.exit_code == 2 and "--option: performance_hint: Extra inputs are not permitted" in res.output
    assert "(options of onnxruntime: graph_optimization, inter_op_threads)" in res.output
    res = profile(tmp_path / "m.onnx", "--graph-opt", "fastest")
    assert res.exit_code == 2 and "graph_optimization: Input should be 'disable', 'basic'" in res.output
    res = profile(tmp_path / "m.onnx", "--backend", "tflite")
    assert res.exit_code == 2 and "--backend: unknown backend 'tflite'" in res.output
