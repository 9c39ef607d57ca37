"""Every zoo model through the whole chain, as a run does it: build -> prune -> quantize ->
export -> deploy on ONNX Runtime and OpenVINO -> rebuild from the stage folder (timm's
`test_model_forward` over `list_models()` is the model). Tiny synthetic data and fractions
of an epoch: what is checked is that each step holds for each architecture, not accuracy.

A model added to `compress.models.ZOO` is picked up here on its own (as `slow`), and its
int8 kernels are expected on every quantized layer until KNOWN_INT8 says otherwise.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from compress.config_load import load_config
from compress.models import ZOO
from compress.pipeline import Pipeline

STAGES = ["prune", "quantize"]
BACKENDS = {"onnxruntime": "onnx", "openvino": "openvino"}
FAST = {"resnet_tiny", "mobilenet_tiny"}  # the rest take 10-90 s each on 2 busy cores
# The ViTs' position embedding is built for 28x28 inputs; the convnets run at 16x16.
IMAGE = {"vit_tiny": 28, "vit_small": 28, "vit_torch_tiny": 28}

# (model, backend) -> (int8 layers, compute layers) of the quantize stage's export, as they
# ran on this machine's CPUs (onnxruntime 1.2x, openvino 2025). Models missing here run
# int8 on every quantized compute layer: on ORT every zoo model does since the export writes
# uint8 activation Q/DQ (compress.export.activations_to_uint8; MobileNets were 8 of 24, the
# ViTs all but one).
KNOWN_INT8: dict = {}
# Shortfalls fixed since, asserted in full here: OpenVINO ran the ViTs' patch conv, proj, fc1
# and fc2 in f32 (3 of 10, 5 of 18) while the IR came from ov.convert_model, which fuses
# each Q+DQ pair into one f32 FakeQuantize (targets.openvino._read now reads a Q/DQ graph as is);
# vit_torch_tiny ran 7 of 14 while OpenVINO 2026.4 computed its patch embedding wrong read as is,
# and convert_model's IR was shipped instead (now read as is with the conv biases split out:
# targets/ov_bias.py)
FIXED_INT8 = [("vit_small", "openvino"), ("vit_tiny", "openvino"), ("vit_torch_tiny", "openvino")]


# -- the one place that touches internals being refactored (issue 10): adapt here ----------

def rebuild_stage(sdir: Path) -> torch.nn.Module:
    """The model of a stage folder, from structure.json + model.safetensors only."""
    from compress.structure import Structure, rebuild
    return rebuild(Structure.read(sdir / "structure.json"), sdir / "model.safetensors")


def run_keeping_models(pipe: Pipeline) -> tuple[dict, dict]:
    """pipe.run(), also returning the in-run torch model of every stage by name."""
    kept, run_stages = {}, pipe.run_stages

    def capture():
        out = run_stages()
        kept.update({name: v[0] for name, v in out[1].items()})
        return out
    pipe.run_stages = capture
    return pipe.run(), kept

# ---------------------------------------------------------------------------------------


def chain_config(spec: str, out: Path) -> dict:
    return {
        "name": spec, "seed": 0,
        "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 64,
                 "synthetic": {"train_size": 128, "test_size": 64, "image_size": IMAGE.get(spec, 16)}},
        "teacher": {"model": "resnet_tiny_teacher",
                    "train": {"epochs": 0.25, "lr": 0.01, "optimizer": "adamw", "augment": False}},
        "student": {"model": spec},
        "stages": [{"kind": "prune", "ratio": 0.5, "round_to": 4, "epochs": 0.25, "augment": False},
                   {"kind": "quantize", "calib_batches": 2, "epochs": 0.25, "augment": False}],
        "export": {"stages": STAGES},
        "targets": [{"backend": b, "threads": 1} for b in BACKENDS],
        # the least the profile section allows: timing is not what this file checks
        "profile": {"warmup": 0, "max_warmup": 0, "runs": 100, "throughput_batch": 1, "throughput_runs": 1,
                    "vendor_seconds": 0, "throughput_search": False},
        "output": {"dir": str(out)},
    }


def logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = model.eval()(torch.from_numpy(x))
    return (y.value if hasattr(y, "value") else y).numpy()  # brevitas may return a QuantTensor


def manifest_input(sdir: Path, images_u8: np.ndarray) -> tuple[dict, np.ndarray]:
    """The test images prepared from the manifest alone, as a user of the artifact would."""
    m = json.loads((sdir / "manifest.json").read_text())
    inp = m["input"]
    c = images_u8.shape[1]
    mean, std = (np.asarray(inp[k], np.float32).reshape(1, c, 1, 1) for k in ("mean", "std"))
    return m, (images_u8.astype(np.float32) * np.float32(inp["scale"]) - mean) / std


def ort_logits(path: Path, name: str, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:  # Q/DQ run as float ops: the fake-quant arithmetic, no int8 kernels
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """spec -> (run dir, report, in-run models, test images); each chain runs once."""
    from compress.pipeline import load_data
    done = {}

    def get(spec):
        if spec not in done:
            out = tmp_path_factory.mktemp(spec)
            (out / "c.yaml").write_text(yaml.safe_dump(chain_config(spec, out)))
            cfg = load_config(out / "c.yaml")
            report, models = run_keeping_models(Pipeline(cfg, log=lambda s: None))
            images = load_data(cfg).test.images.numpy()
            done[spec] = out / spec, report, models, images
        return done[spec]
    return get


# per-pixel models are not classifiers: their chain runs in tests/compress/test_tasks.py
PER_PIXEL = {"segnet_tiny", "segnet_small"}
ZOO_PARAMS = [pytest.param(s, marks=() if s in FAST else pytest.mark.slow) for s in sorted(ZOO) if s not in PER_PIXEL]


def row(report, stage, backend):
    return next(d for d in report["deployments"] if d["stage"] == stage and d["backend"] == backend)


@pytest.mark.parametrize("spec", ZOO_PARAMS)
def test_stages_ran_prune_shrank_and_only_named_stages_deployed(spec, chains):
    run_dir, report, _, _ = chains(spec)
    s = {r["name"]: r for r in report["stages"]}
    assert list(s) == ["teacher", *STAGES]
    before = sum(p.numel() for p in ZOO[spec](num_classes=10, in_channels=1).parameters())
    assert s["prune"]["params"] < 0.9 * before and s["prune"]["macs"] > 0
    assert [(d["stage"], d["backend"]) for d in report["deployments"]] == [
        (st, b) for st in STAGES for b in BACKENDS]
    for i, name in enumerate(STAGES, start=1):
        for f in ("model.safetensors", "structure.json", "metrics.json", "model.onnx", "model.xml",
                  "manifest.json"):
            assert (run_dir / f"{i:02d}-{name}" / f).is_file(), (name, f)
    assert not (run_dir / "00-teacher" / "model.onnx").exists()  # not in export.stages
    # whole heads go at ratio 0.5 (timm-style attention and torch's nn.MultiheadAttention alike)
    heads = json.loads((run_dir / "01-prune" / "metrics.json").read_text()).get("heads")
    if heads is not None:
        assert heads["after"] == heads["before"] // 2, heads


@pytest.mark.parametrize("spec", ZOO_PARAMS)
def test_rebuilt_stage_equals_the_in_run_model_and_its_onnx(spec, chains):
    run_dir, report, models, images = chains(spec)
    for i, name in enumerate(STAGES, start=1):
        sdir = run_dir / f"{i:02d}-{name}"
        manifest, x = manifest_input(sdir, images)
        rebuilt = logits(rebuild_stage(sdir), x)
        np.testing.assert_array_equal(rebuilt, logits(models[name], x))  # bit-exact rebuild
        onnx_path, inp = sdir / manifest["files"]["onnx"], manifest["input"]["name"]
        unfused, fused = ort_logits(onnx_path, inp, x, optimize=False), ort_logits(onnx_path, inp, x)
        if name == "prune":  # a float file: torch to float rounding, with or without fusion
            np.testing.assert_allclose(unfused, rebuilt, atol=1e-4, rtol=0)
            np.testing.assert_allclose(fused, rebuilt, atol=1e-4, rtol=0)
        else:
            # int8: Q/DQ as float ops (unfused) or int8 kernels (fused) compute brevitas'
            # fake quantization except where an activation lands on a rounding tie, one
            # quantization step off, and that step carried on: measured on 64 images at most
            # 0.0066 on 4.7% of the logits (vit_small), 0.0011 on < 1% (convnets). A wrong
            # scale or layer is off by the logits' own size (~0.1-1 here), on most of them.
            for out in (unfused, fused):
                off = np.abs(out - rebuilt)
                assert off.max() < 0.02 and (off > 1e-4).mean() < 0.1, (off.max(), (off > 1e-4).mean())
        # and the report's ORT row measured that same file against that same model
        r = row(report, name, "onnxruntime")
        assert r["max_abs_diff"] == pytest.approx(float(np.abs(fused - rebuilt).max()), abs=1e-6)
        assert r["agreement"] >= 0.95


def compute_layers(spec: str, backend: str, quantized: int) -> int:
    """What a backend should count as compute layers: every quantized Conv/Linear, plus the
    two weightless matmuls (q.k, attn.v) of each attention module (OpenVINO: inside the
    Subgraph it fuses them into)."""
    heads = sum(hasattr(m, "num_heads") for m in ZOO[spec](num_classes=10, in_channels=1).modules())
    return quantized + 2 * heads


def int8_matmuls(spec: str) -> int:
    """Attention matmuls with int8 inputs: those of torch's nn.MultiheadAttention, which the
    quantize stage makes explicit with quantizers on the QK^T and AV inputs
    (compress/quantize/attention.py); the zoo's timm-style ViT quantizes only its Linears."""
    return 2 * sum(isinstance(m, torch.nn.MultiheadAttention)
                   for m in ZOO[spec](num_classes=10, in_channels=1).modules())


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("spec", ZOO_PARAMS)
def test_executed_precision_counts_today(spec, backend, chains):
    """The kernel counts each backend reports: float stage none int8; the int8 stage's counts
    as they are today (KNOWN_INT8), so a change either way shows."""
    run_dir, report, _, _ = chains(spec)
    prune, quant = row(report, "prune", backend), row(report, "quantize", backend)
    assert prune["status"] == "ok", prune["reason"]
    assert prune["precision"] == "fp32" and quant["precision"] == "int8"
    manifest = json.loads((run_dir / "02-quantize" / "manifest.json").read_text())
    fmt = manifest["quant_format"]
    assert fmt["int8_matmuls"] == int8_matmuls(spec)
    quantized = len(fmt["weight_bits"]) + fmt["int8_matmuls"]  # what the deploy gate expects int8
    compute = compute_layers(spec, backend, len(fmt["weight_bits"]))
    assert prune["executed_precision"]["int8_layers"] == 0
    assert prune["executed_precision"]["compute_layers"] == compute
    ep = quant["executed_precision"]
    want = KNOWN_INT8.get((spec, backend), (quantized, compute))
    assert (ep["int8_layers"], ep["compute_layers"]) == want == (want[0], compute), ep["detail"]
    # the deploy gate's verdict follows the counts (a barely trained model may also miss the
    # parity gate on near-tied logits: resnet_teacher on OpenVINO, 62 of 64 agree)
    short = want[0] < quantized
    gate = f"only {want[0]} of {quantized} quantized compute layers ran an int8 kernel"
    assert (gate in (quant["reason"] or "")) == short, quant["reason"]
    assert quant["status"] == "failed" or not short


def shortfall_params():
    """(spec, backend) whose int8 stage runs float kernels on some quantized layer today
    (strict xfail), and the fixed ones (asserted)."""
    out = []
    for (spec, backend), (int8, compute) in sorted(KNOWN_INT8.items()):
        marks = [pytest.mark.xfail(strict=True, reason=f"{spec} on {backend} runs {int8} int8 kernels today")]
        if spec not in FAST:
            marks.append(pytest.mark.slow)
        out.append(pytest.param(spec, backend, marks=marks))
    out += [pytest.param(spec, backend, marks=() if spec in FAST else pytest.mark.slow) for spec, backend in FIXED_INT8]
    return out


@pytest.mark.parametrize("spec, backend", shortfall_params())
def test_every_quantized_layer_runs_an_int8_kernel(spec, backend, chains):
    """Flips to XPASS (a failure, strict) when a shortfall in KNOWN_INT8 is fixed: then
    remove the entry there."""
    run_dir, report, _, _ = chains(spec)
    ep = row(report, "quantize", backend)["executed_precision"]
    fmt = json.loads((run_dir / "02-quantize" / "manifest.json").read_text())["quant_format"]
    assert ep["int8_layers"] == len(fmt["weight_bits"]) + fmt["int8_matmuls"]
