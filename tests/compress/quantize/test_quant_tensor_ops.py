"""brevitas' IntQuantTensor is a tuple: no unbind/chunk, `q[:, 0]` fails and `q[0]` is its
whole value. Graph-mode models that split or index a quantized tensor (ShuffleNetV2's chunk of a
quantized cat; torchvision ViT's qkv unbind and class-token read-out: test_transformer.py) take
the float value there (compress.quantize.graph._float_where_quant_tensor_lacks), quantize, run and export."""
import copy

import numpy as np
import onnxruntime as ort
import torch
from brevitas.graph.calibrate import calibration_mode
from torch import nn

from compress.export import export_qcdq
from compress.quantize.config import QuantizeConfig, settings
from compress.quantize.graph import as_float, prepare


class Shuffle(nn.Module):
    """ShuffleNetV2's unit at toy size: chunk, branch, cat, channel shuffle, head."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c // 2, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU()) for _ in range(2))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:  # the second chunk splits a (quantized) cat, shuffled
            a, b = x.chunk(2, dim=1)
            x = torch.cat((a, branch(b)), dim=1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(x.mean((2, 3)))


def quantized_export(float_model: nn.Module, x: torch.Tensor, path):
    """W8A8 graph quantization as the stage prepares it, calibrated on x, exported as Q/DQ to
    path -> (the quantized model, its logits on x)."""
    q = prepare(float_model, settings(QuantizeConfig())).eval()
    with torch.no_grad(), calibration_mode(q):
        q(x)
    with torch.no_grad():
        want = as_float(q(x)).numpy()
    export_qcdq(q, path, tuple(x.shape[1:]), uint8_activations=True)
    return q, want


def ort_logits(path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def test_chunk_of_a_quantized_cat_runs_and_exports(tmp_path):
    torch.manual_seed(0)
    float_model = Shuffle().eval()
    x = torch.randn(8, 1, 8, 8)
    q, want = quantized_export(float_model, x, tmp_path / "m.onnx")
    assert any(n.target is as_float for n in q.graph.nodes)
    with torch.no_grad():
        ref = float_model(x).numpy()
    assert want.shape == (8, 10) and np.abs(want - ref).max() < 0.1 * np.ptp(ref)
    got = ort_logits(tmp_path / "m.onnx", x)
    assert np.abs(got - want).max() < 0.02 * np.ptp(want)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm subclass that checks `x.ndim` and applies its act; fx
    traces through it (not a torch.nn leaf), so the getattr stays after the BatchNorm is folded."""

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-d input")  # as timm does: traceable
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                     self.eps)
        return torch.relu(x)


def test_an_attribute_the_quant_tensor_lacks_reads_the_float_value(tmp_path):
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), BatchNormAct(8), nn.Conv2d(8, 8, 1),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.randn(8, 1, 8, 8)
    q, want = quantized_export(float_model, x, tmp_path / "m.onnx")  # failed: "... no attribute 'ndim'"
    assert any(n.target is as_float for n in q.graph.nodes)
    got = ort_logits(tmp_path / "m.onnx", x)
    assert np.abs(got - want).max() < 0.02 * np.ptp(want)


class TimmLinear(nn.Linear):
    """timm.layers.Linear: nn.Linear's numbers through its own forward (fx traces into it)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_a_linear_subclass_with_nn_linears_numbers_is_quantized_as_one(tmp_path):
    import onnx

    from compress.quantize.graph import plain_linears
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                TimmLinear(8, 10)).eval()
    x = torch.randn(8, 1, 8, 8)
    q, want = quantized_export(float_model, x, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    made = {o: n.op_type for n in graph.node for o in n.output}
    gemm = next(n for n in graph.node if n.op_type in ("Gemm", "MatMul"))
    assert made[gemm.input[1]] == "DequantizeLinear"  # an int8 weight: it was left float before
    assert np.abs(ort_logits(tmp_path / "m.onnx", x) - want).max() < 0.02 * np.ptp(want)
    other = nn.Sequential(ScaledLinear(4, 3))
    before = other(torch.ones(1, 4))
    plain_linears(other)
    assert type(other[0]) is ScaledLinear and torch.equal(other(torch.ones(1, 4)), before)


class TimmBatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d as it is built: `drop` and `act` children after F.batch_norm."""

    def __init__(self, c, act=nn.Hardswish):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), act()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-d input")
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class ShiftedBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


def test_a_batchnorm_act_subclass_is_folded_into_its_conv(tmp_path):
    import onnx

    from compress.quantize.graph import plain_batchnorms
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), TimmBatchNormAct(8), nn.Conv2d(8, 8, 1),
                                TimmBatchNormAct(8, nn.ReLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(8, 10))
    for bn in (float_model[1], float_model[3]):  # statistics that are not the identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    float_model.eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ref = float_model(x).numpy()
    unsplit = copy.deepcopy(float_model)  # prepare splits them in place
    q, want = quantized_export(float_model, x, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "BatchNormalization" not in ops  # each ran as a float BatchNormalization between Q/DQ before
    assert np.abs(want - ref).max() < 0.1 * np.ptp(ref)
    assert np.abs(ort_logits(tmp_path / "m.onnx", x) - want).max() < 0.02 * np.ptp(want)
    from compress.quantize.graph import prepare
    from compress.structure import QuantSettings
    # a structure recorded before the split rebuilds without it: its weights hold the BatchNorm
    recorded = QuantSettings(**{k: v for k, v in settings(QuantizeConfig()).items() if k != "plain_batchnorms"})
    assert "1.running_var" in prepare(unsplit, recorded.model_dump()).state_dict()
    other = nn.Sequential(ShiftedBatchNorm(4)).eval()
    before = other(torch.ones(2, 4, 3, 3))
    plain_batchnorms(other)
    assert type(other[0]) is ShiftedBatchNorm and torch.equal(other(torch.ones(2, 4, 3, 3)), before)
