"""ORT's exact rewrites (targets/ort_fusions.py): SiLU between Q/DQ as one QuickGelu gives
bit-identical logits on ONNX Runtime, touches no other Sigmoid, and `precision: speed` ships it
in ORT's own artifact even where every layer stays int8 (never in the shared ONNX). A ReLU read
by a zero-point-128 Q becomes a clip of the codes: same numbers, and its Conv runs QLinearConv."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress import keep_float as kf
from compress import speed_precision as sp
from compress.report import speed_markdown
from targets.ort_fusions import fuse_silu, relu_into_quantize
from tests.compress.test_export_qdq import ort_run
from tests.compress.test_parity import ort_ops
from tests.compress.test_speed_precision import fake_timer, int8  # noqa: F401 (the module fixture)

SILUS = 6  # mobilenet_tiny's first three inverted residuals: SiLU after expand and depthwise


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_silu_between_qdq_becomes_quickgelu_with_identical_logits(int8, tmp_path):  # noqa: F811
    path, x = int8
    model = onnx.load(str(path))
    fused, done = fuse_silu(model)
    assert done == {"SiLU as QuickGelu": SILUS} and ops(model).count("Sigmoid") == SILUS
    assert ops(fused).count("QuickGelu") == SILUS and "Sigmoid" not in ops(fused)
    assert ops(fused).count("Mul") == ops(model).count("Mul") - SILUS  # the SE gates' Muls stay
    onnx.checker.check_model(fused)
    out = tmp_path / "fused.onnx"
    onnx.save(fused, str(out))
    for optimized in (False, True):
        np.testing.assert_array_equal(ort_run(out, x, optimized), ort_run(path, x, optimized))


def _graph(nodes, outputs):
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in outputs]
    return helper.make_model(helper.make_graph(nodes, "g", vi, outs))


@pytest.mark.parametrize("nodes,outputs", [
    # a gate: x * Sigmoid(y) is not SiLU
    ([helper.make_node("Sigmoid", ["y"], ["s"]), helper.make_node("Mul", ["x", "s"], ["z"])], ["z"]),
    # the Sigmoid is read elsewhere too (a graph output): removing it would change the graph
    ([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["z"])], ["z", "s"]),
])
def test_only_x_times_its_own_sigmoid_is_fused(nodes, outputs):
    model = _graph(nodes, outputs)
    assert fuse_silu(model) == (model, {})


def test_precision_speed_ships_the_rewrite_in_orts_artifact_only(int8, tmp_path):  # noqa: F811
    path, x = int8
    names = kf.quantized_layers(onnx.load(str(path)))
    timer = fake_timer(dict.fromkeys(names, 1.0), dict.fromkeys(names, 1.5), [])  # float never faster
    out, choice = sp.speed_artifact(path, tmp_path / "ort", "onnxruntime", x, 1, (1, 4), lambda s: None, timer)
    assert choice["float_layers"] == [] and choice["fused"] == {"SiLU as QuickGelu": SILUS}
    assert out != path and ops(onnx.load(str(out))).count("QuickGelu") == SILUS
    np.testing.assert_array_equal(ort_run(out, x, True), ort_run(path, x, True))
    assert "Sigmoid" in ops(onnx.load(str(path)))  # the shared ONNX is untouched
    lines = speed_markdown([{"stage": "quantize", "backend": "onnxruntime", "speed_precision": choice}])
    assert any("exact rewrites" in s and f"{SILUS} x SiLU as QuickGelu" in s for s in lines)
    ov, ov_choice = sp.speed_artifact(path, tmp_path / "ov", "openvino", x, 1, (1, 4), lambda s: None, timer)
    assert ov == path and ov_choice["fused"] == {}  # OpenVINO fuses SiLU itself: nothing to rewrite


def test_a_choice_saved_by_an_older_release_is_searched_again(int8, tmp_path):  # noqa: F811
    import json
    path, x = int8
    names = kf.quantized_layers(onnx.load(str(path)))
    log = []
    timer = fake_timer(dict.fromkeys(names, 1.0), dict.fromkeys(names, 1.5), log)
    sp.speed_artifact(path, tmp_path, "onnxruntime", x, 1, (1, 4), lambda s: None, timer)
    record = tmp_path / "speed-onnxruntime.json"
    first = json.loads(record.read_text())
    for old in ({k: v for k, v in first.items() if k != "fused"},
                {**first, "whole_graph_rejected": "agreement"}):  # rejected before the whole graph was kept
        record.write_text(json.dumps(old))
        searched = len(log)
        again = sp.speed_artifact(path, tmp_path, "onnxruntime", x, 1, (1, 4), lambda s: None, timer)[1]
        assert len(log) > searched and again["fused"] and "whole_graph_rejected" not in again


def test_the_row_names_what_ort_ran_in_float_inside_the_int8_graph(int8, tmp_path):  # noqa: F811
    from compress.report import float_markdown
    from targets import base
    path, _ = int8
    ort = base.get("onnxruntime")
    ep = ort.compile(path, base.CompileOptions(threads=1, work_dir=tmp_path)).info["executed_precision"]
    between = ep["float_between_qdq"]
    # no int8 kernel for SiLU / Hardswish on ORT: each is DQ -> float -> Q in the optimized graph
    assert between["Sigmoid"] == SILUS and between["HardSigmoid"] >= 1 and "QLinearConv" not in between
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(kf.float_graph(onnx.load(str(path))), str(fp32))
    fp32_ep = ort.compile(fp32, base.CompileOptions(threads=1, work_dir=tmp_path)).info["executed_precision"]
    assert "float_between_qdq" not in fp32_ep  # no Q/DQ left: nothing ran "between" them
    row = {"stage": "quantize", "backend": "onnxruntime", "executed_precision": ep,
           "vs_float": {"stage": "distill", "latency_speedup": 0.6, "throughput_ratio": 0.8}}
    text = "\n".join(float_markdown([row]))
    assert f"{SILUS} Sigmoid" in text and "ran in float between DequantizeLinear" in text
    row["vs_float"].update(latency_speedup=1.2, throughput_ratio=1.7)  # not slower: no explanation owed
    assert "ran in float" not in "\n".join(float_markdown([row]))


def _conv_relu_q(zero_point: int, relu_is_output: bool = False) -> onnx.ModelProto:
    """input -> Q -> DQ -> Conv(int8 weight) -> Relu -> Q(zero_point, uint8) -> DQ: the Q/DQ
    brevitas writes where a ReLU's output shares a signed quantizer (zero point 128)."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(v, k) for k, v in {
        "sx": np.array(0.05, np.float32), "zx": np.array(128, np.uint8), "sy": np.array(0.02, np.float32),
        "zy": np.array(zero_point, np.uint8), "w": rng.integers(-127, 128, (6, 4, 3, 3)).astype(np.int8),
        "sw": np.array(0.01, np.float32), "zw": np.array(0, np.int8)}.items()]
    make = helper.make_node
    nodes = [make("QuantizeLinear", ["input", "sx", "zx"], ["xq"], name="qx"),
             make("DequantizeLinear", ["xq", "sx", "zx"], ["xf"], name="dqx"),
             make("DequantizeLinear", ["w", "sw", "zw"], ["wf"], name="dqw"),
             make("Conv", ["xf", "wf"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             make("Relu", ["c"], ["r"], name="relu"),
             make("QuantizeLinear", ["r", "sy", "zy"], ["yq"], name="qy"),
             make("DequantizeLinear", ["yq", "sy", "zy"], ["out"], name="dqy")]
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 6, 6, 6])]
    outs += [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 6, 6, 6])] if relu_is_output else []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4, 6, 6])],
                              outs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_relu_before_a_zero_point_128_quantizer_becomes_a_clip_and_the_conv_int8(tmp_path):
    model = _conv_relu_q(128)
    rewritten, done = relu_into_quantize(model)
    assert done == {"ReLU as a clip of its codes": 1} and "Relu" not in ops(rewritten)
    onnx.checker.check_model(rewritten)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(model, str(a))
    onnx.save(rewritten, str(b))
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32) * 3  # half the ReLU inputs < 0
    for optimized in (False, True):
        np.testing.assert_array_equal(ort_run(b, x, optimized), ort_run(a, x, optimized))
    assert (ort_run(a, x, True) == 0).mean() > 0.2  # the clip did work
    assert "QLinearConv" not in ort_ops(model, tmp_path / "a.opt.onnx")  # ORT cannot drop this ReLU: float Conv
    assert "QLinearConv" in ort_ops(rewritten, tmp_path / "b.opt.onnx")


@pytest.mark.parametrize("zero_point,relu_is_output", [(0, False), (128, True)])
def test_relu_left_where_ort_drops_it_itself_or_another_reads_it(zero_point, relu_is_output):
    model = _conv_relu_q(zero_point, relu_is_output)
    assert relu_into_quantize(model) == (model, {})


def test_a_plain_int8_row_that_fails_for_such_relus_names_precision_speed(tmp_path):
    from compress.deploy import speed_would_rewrite
    from targets import base
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    onnx.save(_conv_relu_q(128), str(bad))
    onnx.save(_conv_relu_q(0), str(good))
    ort = base.get("onnxruntime")
    hint = speed_would_rewrite(ort, bad)
    assert "`precision: speed`" in hint and "1 x ReLU as a clip of its codes" in hint
    assert speed_would_rewrite(ort, good) == "" and speed_would_rewrite(base.get("openvino"), bad) == ""
