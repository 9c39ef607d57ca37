"""The first diverging layer: a correct export matches torch layer by layer; one weight
scaled in the exported file is caught and that layer, not a neighbour, is named. On a
float export (module paths in node names) and a brevitas QCDQ export (flattened names),
on ONNX Runtime and on OpenVINO."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compress.export import export_float, export_qcdq
from compress.parity import diverging_layers, onnx_points
from targets.openvino import to_ir

SHAPE = (1, 12, 12)
NAMES = ["conv1", "block.0", "conv3", "fc"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        # nested, so float node names carry the path (/block/block.0/Conv) and QCDQ ones do not
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv3, self.relu3 = nn.Conv2d(8, 16, 3, stride=2), nn.ReLU()
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)

    def forward(self, x):
        x = self.block(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(self.relu3(self.conv3(x)))))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = Tiny()
    for bn in (m.bn1, m.block[1]):  # non-trivial statistics, so BN folding is exercised
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def quantized(model: nn.Module, x: np.ndarray) -> nn.Module:
    from brevitas.graph.calibrate import calibration_mode

    from compress.quantize import QuantizeConfig, prepare, settings
    q = prepare(model, settings(QuantizeConfig()))
    with torch.no_grad(), calibration_mode(q):
        q(torch.from_numpy(x))
    return q.eval()


def scale_weight_of(onnx_path, out_path, conv_index: int, factor: float = 3.0) -> str:
    """Scale the weight of the conv_index-th Conv (graph order): its initializer, or for a
    QCDQ graph the scale of the DequantizeLinear that feeds it. Returns the node's name."""
    m = onnx.load(str(onnx_path))
    producers = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    node = [n for n in m.graph.node if n.op_type == "Conv"][conv_index]
    w = node.input[1]
    if w not in inits:
        w = producers[w].input[1]  # DequantizeLinear(w_int8, scale, zero_point)
    init = inits[w]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(m, str(out_path))
    return node.name


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    x = np.random.default_rng(0).standard_normal((16, *SHAPE)).astype(np.float32)
    f, q = tiny_model(), quantized(tiny_model(), x)
    export_float(f, d / "float.onnx", SHAPE, 17)
    export_qcdq(q, d / "int8.onnx", SHAPE)
    for kind in ("float", "int8"):
        scale_weight_of(d / f"{kind}.onnx", d / f"{kind}-bad.onnx", 1)
        for name in (kind, f"{kind}-bad"):
            to_ir(d / f"{name}.onnx", d / f"{name}.xml")
    return d, x, {"float": f, "int8": q}


def run(exports, kind, backend, bad):
    d, x, models = exports
    name = f"{kind}-bad" if bad else kind
    runtime = d / f"{name}.{'xml' if backend == 'openvino' else 'onnx'}"
    return diverging_layers(models[kind], d / f"{name}.onnx", runtime, backend, x, 0.02)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("kind", ["float", "int8"])
def test_correct_export_matches_torch_layer_by_layer(exports, kind, backend):
    res = run(exports, kind, backend, bad=False)
    assert res["mapped"], res.get("reason")
    assert [lyr["module"] for lyr in res["layers"]] == NAMES
    assert res["first_diverging"] is None
    # float: rounding only; int8: activation rounding ties between runtimes and brevitas
    assert max(lyr["rel_error"] for lyr in res["layers"]) < (1e-4 if kind == "float" else 0.01)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("kind", ["float", "int8"])
def test_scaled_weight_names_that_layer(exports, kind, backend):
    res = run(exports, kind, backend, bad=True)
    first = res["first_diverging"]
    assert res["mapped"] and first is not None
    assert first["module"] == "block.0" and first["op"] == "Conv"
    assert first["node"] == ("/block.0/Conv" if kind == "int8" else "/block/block.0/Conv")
    errs = [lyr["rel_error"] for lyr in res["layers"]]
    assert errs[0] < 0.01 and errs[1] > 0.5  # conv1 intact; block.0 is off by its factor


def test_unpairable_graph_is_reported_not_guessed(exports, tmp_path):
    d, x, models = exports

    class Wider(Tiny):  # one compute module more than the graph has
        def forward(self, x):
            return super().forward(x) + 0 * self.fc(torch.zeros(1, 16))
    res = diverging_layers(Wider().eval(), d / "float.onnx", d / "float.onnx", "onnxruntime", x, 0.02)
    assert not res["mapped"] and "cannot pair them" in res["reason"]


def test_deployment_that_fails_parity_names_the_layer(exports, tmp_path):
    """Through deploy_one, as a run sees it: status failed, the layer in the reason, the
    per-layer table in report.md."""
    from compress.config_load import load_config
    from compress.deploy import deploy_one
    from compress.plan import deployment_plan
    from compress.report import diverging_markdown
    from tests.conftest import ROOT
    d, x, models = exports
    sdir = tmp_path / "stage"
    sdir.mkdir()
    (sdir / "model.onnx").write_bytes((d / "float-bad.onnx").read_bytes())
    with torch.no_grad():
        ref = models["float"](torch.from_numpy(x)).numpy()

    cfg = load_config(ROOT / "examples" / "tiny.yaml", ["profile.runs=100", "profile.throughput_runs=1",
                                                         "profile.max_warmup=0"])
    plan = deployment_plan(cfg, [], {}, None, tmp_path, log=lambda s: None)
    manifest = {"precision": "fp32", "files": {"onnx": "model.onnx"}}
    row = deploy_one(plan, "distill", sdir, manifest, plan.targets[0], x, ref.argmax(1), ref, model=models["float"])
    assert row["status"] == "failed", row
    assert "first diverging layer: block.0 (/block/block.0/Conv)" in row["reason"]
    md = "\n".join(diverging_markdown([row]))
    assert "| 1 | `block.0` | `/block/block.0/Conv` | Conv |" in md and "**first diverging**" in md
    json.dumps(row)  # the row goes into report.json as it is


def ort_ops(model: onnx.ModelProto, path) -> dict:
    """Op types of the graph ORT runs after its optimizations (ORT_ENABLE_ALL, as deployed)."""
    from collections import Counter

    import onnxruntime as ort
    so = ort.SessionOptions()
    so.optimized_model_filepath, so.log_severity_level = str(path), 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_ort_reads_an_int8_layer_with_every_earlier_layer_on_its_int8_kernel(exports, tmp_path):
    """Exposing a tensor inside a Q/DQ group stops ORT's QLinearConv fusion; the prefix graph
    the diagnosis runs for a layer keeps all layers before it fused, as many as the full graph."""
    from targets.onnxruntime import prefix_graph
    model = onnx.load(str(exports[0] / "int8.onnx"))
    full = ort_ops(model, tmp_path / "full.onnx")
    assert full["QLinearConv"] == 3 and full["QGemm"] == 1  # conv1, block.0, conv3; fc
    points = onnx_points(model)
    fused = [ort_ops(prefix_graph(model, p["tensor"]), tmp_path / f"p{i}.onnx")["QLinearConv"]
             for i, p in enumerate(points)]
    assert fused == [0, 1, 2, 3]  # the prefix of layer i: the i convolutions before it, all int8


def test_a_backend_that_cannot_read_layers_says_so(exports):
    """No other backend stands in: the TensorRT row's diagnosis says it was not done, and why."""
    d, x, models = exports
    res = diverging_layers(models["float"], d / "float-bad.onnx", d / "float-bad.onnx", "tensorrt", x, 0.02)
    assert not res["mapped"] and res["layers"] == [] and res["first_diverging"] is None
    assert res["reason"].startswith("tensorrt cannot read layer outputs: ")
