"""compress.export_brevitas.exact_int32_biases: a layer whose weights are almost zero next to
its bias (timm's zero-initialised last BatchNorm of each ResNet block, merged into the conv,
after a short distillation) exports, and its int32 bias is the one torch computed."""
import numpy as np
import pytest
import torch
from torch import nn

from compress.export import export_qcdq
from compress.export_brevitas import exact_int32_biases
from compress.quantize import QuantizeConfig, prepare, settings


class DeadConv(nn.Module):
    """conv2's BatchNorm has gamma ~ 0 and beta != 0: after the merge its weights are ~1e-3
    of conv1's and its bias is ~6e6 bias quantization steps (float32 is exact to 2^21)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn2.weight.fill_(1e-2)
            self.bn2.bias.copy_(torch.linspace(-0.3, 0.3, 8))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(x.mean((2, 3)))


def quantized(x: torch.Tensor) -> nn.Module:
    from brevitas.graph.calibrate import calibration_mode
    torch.manual_seed(0)
    q = prepare(DeadConv().eval(), settings(QuantizeConfig())).eval()
    with torch.no_grad(), calibration_mode(q):
        q(x)
    return q


def test_near_zero_weight_layer_exports_with_its_int32_bias(tmp_path):
    import onnx
    import onnxruntime as ort
    from brevitas.export import export_onnx_qcdq
    from onnx import numpy_helper
    x = torch.from_numpy(np.random.RandomState(0).rand(16, 1, 8, 8).astype(np.float32))
    q = quantized(x)
    with pytest.raises(RuntimeError, match="QuantTensor not valid"):  # brevitas on its own
        export_onnx_qcdq(q, args=x[:1], export_path=str(tmp_path / "raw.onnx"), dynamo=False)
    q = quantized(x)  # a failed export leaves export mode half set
    export_qcdq(q, tmp_path / "m.onnx", (1, 8, 8), uint8_activations=True)
    biases = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
              if i.data_type == onnx.TensorProto.INT32 and len(i.dims) == 1 and i.dims[0] == 8]
    assert max(np.abs(b).max() for b in biases) > 2 ** 21  # the dead conv's bias, in int32
    with torch.no_grad():
        want = q(x)
    want = (want.value if hasattr(want, "value") else want).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max(), np.abs(got - want).max()


def test_other_tensors_keep_brevitas_check():
    """Only >= 32-bit tensors (biases) take the float64 path; the patch is undone after."""
    from brevitas.quant_tensor import IntQuantTensor
    original = IntQuantTensor.int
    off = IntQuantTensor(torch.tensor([0.3]), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(8.0), True, False)
    with exact_int32_biases(), pytest.raises(RuntimeError, match="not valid"):
        off.int()
    assert IntQuantTensor.int is original
