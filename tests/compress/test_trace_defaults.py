"""compress.quantize.graph.trace_with_defaults: a model whose forward takes optional arguments
besides the image (timm's ViTs: attn_mask=None, is_causal=False) quantizes into a graph of the
image alone, with the defaults' branch taken, and exports int8 (it used to fail: is_causal
reached scaled_dot_product_attention as a Tensor, and `if is_causal:` could not be traced)."""
import numpy as np
import torch
from torch import nn

from compress.export import export_qcdq
from compress.quantize import QuantizeConfig, prepare, settings


class OptionalArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, attn_mask=None, is_causal=False):
        y = torch.relu(self.conv(x)).mean((2, 3))
        if is_causal:  # not traceable while is_causal is a graph input
            y = -y
        if attn_mask is not None:
            y = y + attn_mask
        return self.fc(y)


def test_optional_arguments_are_fixed_to_their_defaults(tmp_path):
    import onnxruntime as ort
    from brevitas.graph.calibrate import calibration_mode
    torch.manual_seed(0)
    float_model = OptionalArgs().eval()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        ref = float_model(x)
    q = prepare(float_model, settings(QuantizeConfig())).eval()
    assert [n.name for n in q.graph.nodes if n.op == "placeholder"] == ["x"]
    assert not any("assert" in str(n.target) for n in q.graph.nodes)
    with torch.no_grad(), calibration_mode(q):
        q(x)
    with torch.no_grad():
        want = q(x)
    want = (want.value if hasattr(want, "value") else want).numpy()
    assert np.abs(want - ref.numpy()).max() < 0.05 * np.abs(ref.numpy()).max()  # the default branch
    export_qcdq(q, tmp_path / "m.onnx", (1, 8, 8), uint8_activations=True)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())
