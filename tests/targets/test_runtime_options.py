"""A backend option is checked where the runtime holds it (the ORT session, the compiled
OpenVINO model), not in the runner's own `info` dict, which only says what was asked."""
import numpy as np
import pytest

from targets import base
from tests.targets.test_backends import tiny_onnx


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("opts")
    tiny_onnx(d / "m.onnx", np.random.default_rng(0))
    from targets.openvino import to_ir
    to_ir(d / "m.onnx", d / "m.xml")
    return d


@pytest.mark.parametrize("level, inter", [("basic", 2), ("disable", 1), ("all", 1)])
def test_onnxruntime_session_holds_the_options(files, level, inter):
    import onnxruntime as ort
    target = base.get("onnxruntime")
    opts = base.CompileOptions(threads=1, work_dir=files,
                               options=target.Options(graph_optimization=level, inter_op_threads=inter))
    runner = target.compile(files / "m.onnx", opts)
    so = runner.session.get_session_options()
    want = {"basic": "ORT_ENABLE_BASIC", "disable": "ORT_DISABLE_ALL", "all": "ORT_ENABLE_ALL"}[level]
    assert so.graph_optimization_level == getattr(ort.GraphOptimizationLevel, want)
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, inter)
    assert so.execution_mode == (ort.ExecutionMode.ORT_PARALLEL if inter > 1 else ort.ExecutionMode.ORT_SEQUENTIAL)
    assert runner.session.get_providers() == ["CPUExecutionProvider"]
    # and what the report records is what the session has
    assert runner.info["graph_optimization"] == want and runner.info["threads"] == so.intra_op_num_threads
    # the level shows in what ran: with fusion off, no kernel is left out of the count
    assert runner.info["executed_precision"]["compute_layers"] == 2


@pytest.mark.parametrize("hint", ["LATENCY", "THROUGHPUT"])
def test_openvino_compiled_model_holds_the_options(files, hint):
    target = base.get("openvino")
    opts = base.CompileOptions(threads=1, work_dir=files, options=target.Options(performance_hint=hint))
    runner = target.compile(files / "m.xml", opts)
    prop = runner.compiled.get_property
    assert str(prop("PERFORMANCE_HINT")) == hint
    assert int(prop("INFERENCE_NUM_THREADS")) == 1
    assert prop("INFERENCE_PRECISION_HINT").to_string() == "f32"  # never bf16 behind the user's back
    assert runner.info["performance_hint"] == hint and runner.info["threads"] == 1
