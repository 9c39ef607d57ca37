"""The QCDQ export's rewrite for ONNX Runtime (compress.export.activations_to_uint8,
requantize_compute_inputs): exact, every compute layer of a MobileNet-style net then runs an
int8 kernel on ORT, and `activations: signed` (TensorRT) keeps the all-int8 graph."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compress.export import export_model, export_qcdq
from compress.models import build_model
from compress.quantize import QuantizeConfig, prepare, settings
from targets import base

SHAPE = (1, 16, 16)


def calibrated(spec: str, cfg: QuantizeConfig, x: np.ndarray) -> torch.nn.Module:
    from brevitas.graph.calibrate import calibration_mode
    torch.manual_seed(0)
    model = build_model(spec, 10, 1)
    with torch.no_grad():  # BatchNorm statistics of the data: with the initial ones some int32
        for _ in range(10):  # biases fall off their grid ("QuantTensor not valid" at export)
            model(torch.from_numpy(x))
    q = prepare(model.eval(), settings(cfg)).eval()
    with torch.no_grad(), calibration_mode(q):  # in eval mode, as compress.quantize.calibrate
        q(torch.from_numpy(x))
    return q


def ort_run(path, x: np.ndarray, optimize: bool) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:  # Q/DQ as float ops, exactly the graph's arithmetic
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def activation_zero_points(path) -> set:
    """dtypes of the zero points of every QuantizeLinear (activations only: weights have none)."""
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    return {inits[n.input[2]].dtype.name for n in g.node if n.op_type == "QuantizeLinear"}


@pytest.fixture(scope="module")
def mobilenet_exports(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((16, *SHAPE)).astype(np.float32)
    q, d = calibrated("mobilenet_tiny", QuantizeConfig(), x), tmp_path_factory.mktemp("qdq")
    export_qcdq(q, d / "int8.onnx", SHAPE)
    export_qcdq(q, d / "uint8.onnx", SHAPE, uint8_activations=True)
    return q, d, x


def test_uint8_rewrite_is_exact_bit_for_bit(mobilenet_exports):
    q, d, x = mobilenet_exports
    # brevitas' symmetric mode: uint8 after ReLU, int8 elsewhere; the rewrite leaves no int8 pair
    assert activation_zero_points(d / "int8.onnx") == {"int8", "uint8"}
    assert activation_zero_points(d / "uint8.onnx") == {"uint8"}
    before, after = ort_run(d / "int8.onnx", x, False), ort_run(d / "uint8.onnx", x, False)
    np.testing.assert_array_equal(after, before)
    # and the graph still is the brevitas model (rounding ties aside: see test_zoo_chain)
    want = q(torch.from_numpy(x))
    want = (want.value if hasattr(want, "value") else want).detach().numpy()
    assert np.abs(after - want).max() < 0.02 * np.abs(want).max()


def test_every_conv_of_mobilenet_runs_int8_on_ort_after_the_rewrite(mobilenet_exports, tmp_path):
    q, d, x = mobilenet_exports
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in q.modules())
    runner = base.get("onnxruntime").compile(d / "uint8.onnx", base.CompileOptions(threads=1, work_dir=tmp_path))
    out, ep = runner(x), runner.info["executed_precision"]
    assert (ep["int8_layers"], ep["compute_layers"]) == (layers, layers) == (24, 24), ep["detail"]
    # ORT's int8 kernels give the graph's numbers up to a rounding tie (one step, carried on)
    ref = ort_run(d / "uint8.onnx", x, False)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9 and np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_signed_activations_keep_int8_and_stay_tensorrt_ready(tiny_data, tmp_path):
    x = np.random.default_rng(0).standard_normal((8, *tiny_data.input_shape)).astype(np.float32)
    q = calibrated("mobilenet_tiny", QuantizeConfig(activations="signed"), x)
    export_model(q, tmp_path, tiny_data, 17, False, "quantize", activations="signed")
    assert activation_zero_points(tmp_path / "model.onnx") == {"int8"}
    verdict = base.get("tensorrt").check_offline(tmp_path / "model.onnx", base.CompileOptions(work_dir=tmp_path), x)
    assert verdict.startswith("TRT-ready ONNX (int8) passes onnx.checker and Q/DQ placement"), verdict


def test_exports_of_an_older_format_are_made_again_and_the_log_says_why(trained_tiny, tiny_data, tmp_path,
                                                                        monkeypatch):
    """The export hash covers EXPORT_FORMAT: a run dir exported before the format changed (its
    manifest has no export_format) is exported once more, then reused."""
    import json

    from compress import export
    from compress.config_load import load_config
    from compress.deploy import export_stage
    from compress.plan import deployment_plan
    from tests.conftest import ROOT, make_ctx
    cfg = load_config(ROOT / "examples" / "tiny.yaml", [f"output.dir={tmp_path}"])
    sdir, logs = tmp_path / "01-prune", []
    models = {"prune": (trained_tiny, sdir, make_ctx(tiny_data, trained_tiny, tmp_path).structure)}

    def export_once():
        plan = deployment_plan(cfg, [{"name": "prune", "config_hash": "abc"}], models, tiny_data, tmp_path,
                               logs.append)
        export_stage(plan, plan.stages[0])
        return plan.stages[0].export_hash

    with monkeypatch.context() as m:
        m.setattr(export, "EXPORT_FORMAT", 1)
        old_hash = export_once()
    manifest = json.loads((sdir / "manifest.json").read_text())
    for key in ("export_format", "digest", "digests"):  # as every manifest before version 2 (and digests)
        del manifest[key]
    (sdir / "manifest.json").write_text(json.dumps(manifest))
    logs.clear()
    assert export_once() != old_hash
    assert logs[0] == f"[prune] export format 1 -> {export.EXPORT_FORMAT}: exporting again", logs
    assert json.loads((sdir / "manifest.json").read_text())["export_format"] == export.EXPORT_FORMAT == 3
    logs.clear()
    export_once()
    assert logs == []  # reused
