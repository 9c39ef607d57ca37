"""Which IR of a Q/DQ graph OpenVINO gets (targets.openvino._read): the one read as is unless it
computes wrong (then the one read as is with the Conv biases split out, if that is right and as
int8); convert_model's where it runs as many layers int8 and is no farther from ONNX Runtime,
since it is the smaller file (deployments are judged on size too)."""
import numpy as np
import openvino as ov
import pytest

from compress.export import export_qcdq
from targets import openvino as ovt
from tests.compress.test_parity import SHAPE, quantized, tiny_model


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("irchoice")
    x = np.random.default_rng(0).standard_normal((16, *SHAPE)).astype(np.float32)
    export_qcdq(quantized(tiny_model(), x), d / "int8.onnx", SHAPE)
    return d / "int8.onnx"


def _size(model, path):
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path.stat().st_size + path.with_suffix(".bin").stat().st_size


def test_a_conv_net_ships_the_smaller_ir_with_the_same_int8_layers(int8_onnx, tmp_path):
    read, conv = ov.Core().read_model(str(int8_onnx)), ov.convert_model(str(int8_onnx))
    ref, _ = ovt._reference(int8_onnx, read)
    (d_read, n_read), (d_conv, n_conv) = ovt._compare(ov, read, ref), ovt._compare(ov, conv, ref)
    assert n_read == n_conv == 4 and d_conv <= d_read
    chosen = ovt._read(ov, int8_onnx)
    assert len(chosen.get_ops()) == len(conv.get_ops()) < len(read.get_ops())  # convert_model's
    assert _size(chosen, tmp_path / "c.xml") < 0.8 * _size(read, tmp_path / "r.xml")


@pytest.mark.parametrize("read,conv,split,want", [
    ((0.5, 10), (0.0, 7), None, "converted"),  # read as is computes wrong: right numbers win over int8 count
    ((0.5, 10), (0.0, 7), (0.0, 10), "split"),  # ... unless the split-bias graph is right and int8
    ((0.5, 10), (0.0, 7), (0.5, 10), "converted"),  # the split-bias graph computes wrong too
    ((0.5, 10), (0.0, 10), (0.0, 7), "converted"),  # the split-bias graph runs fewer layers int8
    ((0.05, 10), (0.04, 7), None, "read"),  # both off by rounding alike: the int8 one (ConvNeXt-tiny)
    ((0.0, 10), (0.0, 7), (0.0, 10), "read"),  # convert_model's runs fewer layers int8
    ((0.0, 10), (0.001, 10), None, "read"),  # convert_model's is farther from ONNX Runtime
    ((0.001, 10), (0.001, 10), None, "converted"),
])
def test_the_rule(int8_onnx, monkeypatch, read, conv, split, want):
    answers = iter([read, conv, split])
    monkeypatch.setattr(ovt, "_reference", lambda *a: (None, 1.0))
    monkeypatch.setattr(ovt, "_compare", lambda *a: next(answers))
    monkeypatch.setattr(ovt, "_read_split_bias", lambda *a: None if split is None else "split")
    chosen = ovt._read(ov, int8_onnx)
    n_conv = len(ov.convert_model(str(int8_onnx)).get_ops())
    got = "split" if chosen == "split" else "converted" if len(chosen.get_ops()) == n_conv else "read"
    assert got == want
