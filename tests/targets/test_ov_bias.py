"""A ViT's patch embedding on OpenVINO (targets/ov_bias.py): an int8 Conv with a per-channel bias
whose quantized output reaches a Concat through Reshape and Transpose. Read as is, OpenVINO
2026.4 adds channel 0's bias to every channel; with the bias split out it computes what ONNX
Runtime does, int8. targets.openvino._read ships the right IR either way."""
import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from targets import openvino as ovt
from targets.ov_bias import split_conv_bias

C = 8


def patch_embed(concat: bool = True) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(4x4 stride 4, int8 W and int32 B per channel) -> Q/DQ -> Reshape ->
    Transpose [-> Concat with a class token expanded to the batch]."""
    rng = np.random.default_rng(0)
    arr = {"s_in": np.array(0.03, np.float32), "z": np.array(128, np.uint8), "s_out": np.array(0.05, np.float32),
           "w_q": rng.integers(-127, 128, (C, 1, 4, 4)).astype(np.int8), "s_w": np.full(C, 0.002, np.float32),
           "z_w": np.zeros(C, np.int8), "b_q": np.arange(-C // 2, C // 2).astype(np.int32) * 1000,
           "s_b": np.full(C, 0.03 * 0.002, np.float32), "z_b": np.zeros(C, np.int32),
           "shp": np.array([0, C, -1], np.int64), "cls": rng.standard_normal((1, 1, C)).astype(np.float32),
           "one": np.array([1], np.int64), "zero": np.array([0], np.int64)}

    def qdq(x, s, y):
        return [h.make_node("QuantizeLinear", [x, s, "z"], [y + "q"]),
                h.make_node("DequantizeLinear", [y + "q", s, "z"], [y])]
    nodes = [*qdq("x", "s_in", "xd"), h.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["w"], axis=0),
             h.make_node("DequantizeLinear", ["b_q", "s_b", "z_b"], ["b"], axis=0),
             h.make_node("Conv", ["xd", "w", "b"], ["c"], name="patch", strides=[4, 4], kernel_shape=[4, 4]),
             *qdq("c", "s_out", "cd"), h.make_node("Reshape", ["cd", "shp"], ["r"]),
             h.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1])]
    if concat:
        nodes += [h.make_node("Shape", ["t"], ["ts"]), h.make_node("Slice", ["ts", "zero", "one"], ["n"]),
                  h.make_node("Concat", ["n", "one", "one"], ["e"], axis=0),
                  h.make_node("Expand", ["cls", "e"], ["ce"]), h.make_node("Concat", ["ce", "t"], ["y"], axis=1)]
    out = "y" if concat else "t"
    g = h.make_graph(nodes, "patch_embed", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
                     [h.make_tensor_value_info(out, TensorProto.FLOAT, ["N", "L", C])],
                     [nh.from_array(v, k) for k, v in arr.items()])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def _x():
    return np.random.default_rng(1).standard_normal((2, 1, 16, 16)).astype(np.float32)


def _ort(model: onnx.ModelProto) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": _x()})[0]


def _ov(model) -> np.ndarray:
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(_x())[0]


def test_split_bias_gives_onnx_runtime_the_same_numbers():
    m = patch_embed()
    split = patch_embed()
    assert split_conv_bias(split) == 1
    onnx.checker.check_model(split)
    assert [n.op_type for n in split.graph.node if n.op_type in ("Conv", "Add")] == ["Conv", "Add"]
    assert np.array_equal(_ort(m), _ort(split))


def test_the_ir_openvino_gets_computes_the_patch_embedding_right_in_int8(tmp_path):
    path = tmp_path / "patch.onnx"
    onnx.save(patch_embed(), str(path))
    want = _ort(patch_embed())
    # the defect this works around, as measured on openvino 2026.4 (0.45 = 9 output steps)
    as_is = np.abs(_ov(ov.Core().read_model(str(path))) - want).max()
    chosen = ovt._read(ov, path)
    assert np.abs(_ov(chosen) - want).max() < 1e-5, as_is
    ref, _ = ovt._reference(path, chosen)
    assert ovt._compare(ov, chosen, ref)[1] == 1  # the patch conv runs int8
    if as_is > 0.02:  # OpenVINO still has the defect: the split-bias graph was chosen
        assert "patch/split_bias/add" in {op.get_friendly_name() for op in chosen.get_ops()}


def test_without_the_concat_openvino_is_right_as_read():
    m = patch_embed(concat=False)
    assert np.abs(_ov(ov.Core().read_model(m.SerializeToString(), b"")) - _ort(m)).max() < 1e-5
