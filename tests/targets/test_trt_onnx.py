"""The TensorRT-ready ONNX, checked without a GPU: onnx.checker, Q/DQ placement as
TensorRT's explicit quantization expects (offending node named), fp16 conversion that
still computes the same outputs on ORT; and the engine itself where TensorRT exists."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets import base
from targets.trt_onnx import TrtOnnxError, make_trt_ready, max_diff_in_ort
from tests.targets.test_backends import tiny_onnx


def qdq_onnx(path, int32_bias=False, drop_weight_dq=False, dangling_q=False):
    """Q/DQ as TensorRT wants it: int8, zero zero-points, every Conv/Gemm input and weight
    dequantized. The flags break one thing each."""
    rng = np.random.default_rng(0)
    init = lambda a, n: numpy_helper.from_array(np.asarray(a), n)  # noqa: E731
    w = rng.integers(-127, 128, (4, 1, 3, 3)).astype(np.int8)
    inits = [init(np.float32(0.05), "s"), init(np.int8(0), "z"), init(w, "w_q"),
             init(np.full(4, 0.01, np.float32), "w_s"), init(np.zeros(4, np.int8), "w_z"),
             init(rng.integers(-127, 128, (3, 4)).astype(np.int8), "fw_q"), init(np.float32(0.02), "fw_s"),
             init(rng.standard_normal(3).astype(np.float32), "fb")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"], name="in_q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="in_dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], name="w_dq", axis=0)]
    if int32_bias:  # brevitas' form: int32 bias at scale s * w_s
        inits += [init(rng.integers(-500, 500, 4).astype(np.int32), "b_q"),
                  init(np.full(4, 0.05 * 0.01, np.float32), "b_s"), init(np.zeros(4, np.int32), "b_z")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"], name="b_dq", axis=0))
    else:
        inits.append(init(rng.standard_normal(4).astype(np.float32), "b"))
    weight = "w_f" if drop_weight_dq else "wd"
    if drop_weight_dq:
        inits.append(init(w.astype(np.float32) * 0.01, "w_f"))
    nodes += [helper.make_node("Conv", ["xd", weight, "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"], name="relu_q"),
              helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["rd"], name="relu_dq"),
              helper.make_node("GlobalAveragePool", ["rd"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("QuantizeLinear", ["f", "s", "z"], ["fq"], name="fc_in_q"),
              helper.make_node("DequantizeLinear", ["fq", "s", "z"], ["fd"], name="fc_in_dq"),
              helper.make_node("DequantizeLinear", ["fw_q", "fw_s", "z"], ["fwd"], name="fw_dq"),
              helper.make_node("Gemm", ["fd", "fwd", "fb"], ["logits"], name="fc", transB=1)]
    if dangling_q:
        nodes.insert(1, helper.make_node("QuantizeLinear", ["input", "s", "z"], ["lost"], name="stray_q"))
        nodes.insert(2, helper.make_node("Cast", ["lost"], ["lost_f"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


X = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)


def test_float_onnx_is_ready_unchanged(tmp_path):
    tiny_onnx(tmp_path / "m.onnx", np.random.default_rng(0))
    info = make_trt_ready(tmp_path / "m.onnx", tmp_path / "m.trt.onnx")
    assert info["precision"] == "fp32"
    assert max_diff_in_ort(tmp_path / "m.onnx", tmp_path / "m.trt.onnx", X) == 0.0


def test_fp16_conversion_keeps_io_float32_and_outputs_close(tmp_path):
    tiny_onnx(tmp_path / "m.onnx", np.random.default_rng(0))
    info = make_trt_ready(tmp_path / "m.onnx", tmp_path / "m16.onnx", fp16=True)
    m = onnx.load(str(tmp_path / "m16.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert info["precision"] == "fp16"
    assert {i.data_type for i in m.graph.initializer} == {TensorProto.FLOAT16}
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    diff = max_diff_in_ort(tmp_path / "m.onnx", tmp_path / "m16.onnx", X)
    assert 0 < diff < 1e-2  # fp16 rounding, not a different model


def test_qdq_as_tensorrt_expects_passes_and_int32_bias_is_folded(tmp_path):
    info = make_trt_ready(qdq_onnx(tmp_path / "q.onnx"), tmp_path / "q.trt.onnx")
    assert info == {**info, "precision": "int8", "bias_dequantize_folded": 0}
    src = qdq_onnx(tmp_path / "qb.onnx", int32_bias=True)
    info = make_trt_ready(src, tmp_path / "qb.trt.onnx")
    assert info["bias_dequantize_folded"] == 1
    ops = [n.op_type for n in onnx.load(str(tmp_path / "qb.trt.onnx")).graph.node]
    assert ops.count("DequantizeLinear") == 5  # input, weight, relu, fc input, fc weight
    assert max_diff_in_ort(src, tmp_path / "qb.trt.onnx", X) < 1e-5


@pytest.mark.parametrize("flag, message", [
    ("drop_weight_dq", "Conv 'conv': weight 'w_f' does not come from a DequantizeLinear"),
    ("dangling_q", "QuantizeLinear 'stray_q': dangling, its output feeds ['Cast']"),
])
def test_misplaced_qdq_names_the_node(tmp_path, flag, message):
    src = qdq_onnx(tmp_path / "bad.onnx", **{flag: True})
    with pytest.raises(TrtOnnxError) as e:
        make_trt_ready(src, tmp_path / "bad.trt.onnx")
    assert str(e.value).startswith(f"{src}: Q/DQ placement") and message in str(e.value)
    assert not (tmp_path / "bad.trt.onnx").exists()


def test_brevitas_unsigned_activations_are_named(tmp_path):
    """Our QCDQ export quantizes ReLU outputs to uint8, which TensorRT cannot take."""
    from compress.export import export_qcdq
    from tests.compress.test_parity import SHAPE, quantized, tiny_model
    x = np.random.default_rng(0).standard_normal((8, *SHAPE)).astype(np.float32)
    export_qcdq(quantized(tiny_model(), x), tmp_path / "q.onnx", SHAPE)
    with pytest.raises(TrtOnnxError, match=r"QuantizeLinear '/relu1/act_quant/export_handler/QuantizeLinear': "
                                           r"zero point type UINT8"):
        make_trt_ready(tmp_path / "q.onnx", tmp_path / "q.trt.onnx")
    # a skipped TensorRT row carries the same verdict, first offending node named
    verdict = base.get("tensorrt").check_offline(tmp_path / "q.onnx", base.CompileOptions(work_dir=tmp_path), x)
    assert verdict.startswith("TRT-ready ONNX check FAILED: QuantizeLinear '/") and "UINT8" in verdict


def test_signed_activations_make_a_trt_ready_int8_export(tmp_path):
    """quantize.activations: signed -> int8 Q/DQ everywhere: the checks pass and the
    TRT-ready graph computes what the export does (on ORT)."""
    import torch
    from brevitas.graph.calibrate import calibration_mode

    from compress.export import export_qcdq
    from compress.quantize import QuantizeConfig, prepare, settings
    from tests.compress.test_parity import SHAPE, tiny_model
    x = np.random.default_rng(0).standard_normal((8, *SHAPE)).astype(np.float32)
    q = prepare(tiny_model(), settings(QuantizeConfig(activations="signed")))
    with torch.no_grad(), calibration_mode(q):
        q(torch.from_numpy(x))
    export_qcdq(q.eval(), tmp_path / "q.onnx", SHAPE)
    zps = [i for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert not zps
    make_trt_ready(tmp_path / "q.onnx", tmp_path / "q.trt.onnx")
    verdict = base.get("tensorrt").check_offline(tmp_path / "q.onnx", base.CompileOptions(work_dir=tmp_path), x)
    assert verdict.startswith("TRT-ready ONNX (int8) passes onnx.checker and Q/DQ placement"), verdict


def test_tensorrt_target_is_skipped_here_with_the_precise_reason():
    ok, reason = base.get("tensorrt").available()
    if ok:
        pytest.skip("tensorrt and a GPU are present here")
    import importlib.util
    if importlib.util.find_spec("tensorrt") is None:
        assert reason.startswith("tensorrt is not importable (No module named 'tensorrt')")
    else:
        assert reason == "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_engine_builds_runs_and_is_timed_on_the_gpu(tmp_path, fp16):
    ok, reason = base.get("tensorrt").available()
    if not ok:
        pytest.skip(reason)
    ref = tiny_onnx(tmp_path / "m.onnx", np.random.default_rng(0))
    target = base.get("tensorrt")
    runner = target.compile(tmp_path / "m.onnx", base.CompileOptions(
        work_dir=tmp_path, options=target.Options(fp16_weights=fp16, batch_profile=(1, 4, 8))))
    np.testing.assert_allclose(runner(X), ref(X), atol=1e-2 if fp16 else 1e-3, rtol=1e-2)
    assert (tmp_path / "m.engine").is_file()
    shapes = runner.engine.get_tensor_profile_shape(runner.input_name, 0)  # the engine's own (min, opt, max)
    assert [tuple(s)[0] for s in shapes] == [1, 4, 8]
    assert runner.info["trt_onnx"]["precision"] == ("fp16" if fp16 else "fp32")
    assert len(runner.inner_ms) == 1 and runner.inner_ms[0] > 0
