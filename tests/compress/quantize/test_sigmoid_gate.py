"""A squeeze-excite gate Conv -> Sigmoid (EfficientNet's): brevitas quantizes the sigmoid's
output only, so ONNX Runtime ran the conv in float (no DQ -> Conv -> Q to fuse). A quantizer
between them (compress.quantize.graph._quantize_before_sigmoid) gives every conv an int8 kernel."""
import numpy as np
import torch
from torch import nn

from targets.base import CompileOptions
from targets.onnxruntime import OrtRunner
from tests.compress.quantize.test_quant_tensor_ops import quantized_export


class SE(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.reduce, self.expand = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.gate = nn.Sigmoid()
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        s = self.gate(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.head((x * s).mean((2, 3)))


def test_the_gate_conv_runs_int8_on_onnx_runtime_with_parity(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    q, want = quantized_export(SE().eval(), x, tmp_path / "m.onnx")
    assert any(n.endswith("_sigmoid_input_quant") for n, _ in q.named_modules())
    runner = OrtRunner(tmp_path / "m.onnx", CompileOptions(threads=1, precision="int8", work_dir=tmp_path))
    ep = runner.info["executed_precision"]
    assert (ep["int8_layers"], ep["compute_layers"]) == (4, 4), ep  # stem, reduce, expand, head
    got = runner(x.numpy())
    assert np.abs(got - want).max() < 0.02 * np.ptp(want) and (got.argmax(1) == want.argmax(1)).mean() == 1.0
