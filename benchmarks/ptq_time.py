"""Where the time of a PTQ-only quantize stage goes, against ORT `quantize_static` (issue 16, item 6).

The shipped Fashion-MNIST teacher (zoo `resnet_teacher`) quantized by our stage (`kind:
quantize`, `epochs: 0`, default settings: W8A8, 8 calibration batches of 128) and by ONNX
Runtime's `quantize_static` (QDQ, per-channel, U8S8) on the FP32 ONNX export of the same net
with the same 1,024 calibration images, in one process, back to back, `--rounds` times
alternating. Our phases are timed by wrapping the functions the stage calls (the stage's
own code runs unchanged); "producing the int8 model" also counts what the pipeline does
with a stage's result (the stage's scoring pass on the test split, MAC count, weights file)
and the int8 ONNX export. NNCF is timed only where it is installed.

    PYTHONPATH=. nice -n 5 python benchmarks/ptq_time.py --rounds 2   # PYTHONPATH: this checkout's compress
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from calib.datasets import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist
from calib.sampling import calibration_split
from compress.checkpoint import load_into, read_state_dict, save_weights
from compress.export import export_float, export_model
from compress.measure import model_stats
from compress.models import build_model
from compress.pipeline import RunContext
from compress.quantize import QuantizeConfig, QuantizeStage
from compress.quantize import stage as qstage
from compress.structure import Structure
from compress.train import predict

ROOT = Path(__file__).resolve().parents[1]
# the functions stage.run calls, by the name it calls them under
STAGE_PHASES = ["preprocess", "equalize_activations", "quantize_graph", "pass_calibration_data",
                "predict", "ptq_accuracy", "layer_sqnr"]


@contextlib.contextmanager
def timed_stage(times: dict):
    """Wrap the stage module's callees so each call adds its wall time to times[name]
    (pass_calibration_data split by mode)."""
    saved = {n: getattr(qstage, n) for n in STAGE_PHASES if hasattr(qstage, n)}

    def wrap(name, fn):
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                key = f"{name} ({a[3]})" if name == "pass_calibration_data" else name
                times[key] += time.perf_counter() - t0
        return inner
    for n, fn in saved.items():
        setattr(qstage, n, wrap(n, fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(qstage, n, fn)


def ours(teacher, data, calib, structure, work: Path, log) -> dict:
    times: dict = defaultdict(float)
    ctx = RunContext(data=data, calib=calib, teacher=None, device=torch.device("cpu"), run_dir=work,
                     log=log, seed=0, batch_size=128, structure=structure, model_stats=model_stats,
                     eval_each_epoch=False, data_key="fashion_mnist-full")
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    model = copy.deepcopy(teacher)  # what the pipeline hands a stage
    times["pipeline: deepcopy of the input model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with timed_stage(times):
        res = QuantizeStage().run(model, ctx, QuantizeConfig(epochs=0))
    times["stage.run total"] = time.perf_counter() - t0
    # what Pipeline._write does with the result
    t0 = time.perf_counter()
    save_weights(res.model, work / "model.safetensors", {"stage": "quantize"})
    times["pipeline: save weights"] = time.perf_counter() - t0
    t0 = time.perf_counter()  # Pipeline._write: from the stage's logits where it handed them on
    logits = res.test_logits if getattr(res, "test_logits", None) is not None else predict(res.model, data.test, data)
    times["pipeline: stage score on the test split"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_stats(res.model, res.float_model, data.input_shape)
    times["pipeline: model_stats (MACs)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_model(res.model, work / "int8", data, 17, False, "ptq")
    times["export: int8 QCDQ ONNX"] = time.perf_counter() - t0
    times["TOTAL ours"] = time.perf_counter() - t_all
    labels = data.test.labels.numpy()
    acc = float((logits.argmax(1) == labels).mean())
    alt = ort_int8_score(work / "int8" / "model.onnx", data, labels)
    return {"times": dict(times), "accuracy": acc, "ptq_accuracy": res.metrics.get("ptq_accuracy"),
            "ptq_accuracy_on": res.metrics.get("ptq_accuracy_on"), "alt": alt,
            "alt_agreement": float((alt.pop("logits").argmax(1) == logits.argmax(1)).mean())}


def ort_int8_score(onnx_path: Path, data, labels: np.ndarray) -> dict:
    """Not part of the stage: what scoring the test split on the int8 export in ONNX Runtime
    (2 threads) would cost instead of the torch fake-quant pass."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = data.normalize_np(data.test.images.numpy())
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])
    return {"seconds": time.perf_counter() - t0, "accuracy": float((logits.argmax(1) == labels).mean()),
            "logits": logits}


def ort_static(teacher, data, calib_x: np.ndarray, work: Path) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib_x[i:i + 128]} for i in range(0, len(calib_x), 128)])

        def get_next(self):
            return next(self.it, None)
    times = {}
    t0 = time.perf_counter()
    export_float(teacher, work / "float.onnx", data.input_shape, 17)
    times["export: FP32 ONNX (input of quantize_static)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantize_static(str(work / "float.onnx"), str(work / "ort_static.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    times["quantize_static"] = time.perf_counter() - t0
    return {"times": times}


def nncf_time(work: Path, calib_x: np.ndarray) -> float | None:
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    from targets.openvino import to_ir
    t0 = time.perf_counter()
    to_ir(work / "float.onnx", work / "float.xml")
    q = nncf.quantize(ov.Core().read_model(str(work / "float.xml")),
                      nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))]), subset_size=len(calib_x))
    ov.save_model(q, str(work / "nncf.xml"), compress_to_fp16=False)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--teacher", default=str(ROOT / "examples/teachers/fashion_mnist_resnet_teacher.safetensors"))
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (ours, ORT) per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = fashion_mnist(args.data_root)
    teacher = build_model("resnet_teacher", 10, 1)
    load_into(teacher, read_state_dict(Path(args.teacher)), args.teacher)
    teacher.eval()
    structure = Structure(model="resnet_teacher", num_classes=10, in_channels=1, input_shape=list(data.input_shape))
    calib = calibration_split(data.train, 1024, 0)
    calib_x = data.normalize_np(calib.images.numpy())
    log = lambda s: None  # noqa: E731
    rows_ours, rows_ort, nncf_s = [], [], []
    print(f"load at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            rows_ours.append(ours(teacher, data, calib, structure, Path(tmp), log))
            rows_ort.append(ort_static(teacher, data, calib_x, Path(tmp)))
            s = nncf_time(Path(tmp), calib_x)
            if s is not None:
                nncf_s.append(s)
            print(f"round {r + 1}: ours {rows_ours[-1]['times']['TOTAL ours']:.1f} s, quantize_static "
                  f"{rows_ort[-1]['times']['quantize_static']:.1f} s, load {os.getloadavg()}", flush=True)
    print_table(rows_ours, rows_ort, nncf_s)


def print_table(rows_ours: list, rows_ort: list, nncf_s: list) -> None:
    def med(rows, k):
        return float(np.median([r["times"].get(k, 0.0) for r in rows]))
    total = med(rows_ours, "TOTAL ours")
    print(f"\nmedian of {len(rows_ours)} round(s); accuracy on the test split: ours {rows_ours[-1]['accuracy']:.4f}, "
          f"stage's ptq_accuracy {rows_ours[-1]['ptq_accuracy']} (measured on: {rows_ours[-1]['ptq_accuracy_on']})\n")
    print("| phase | seconds | share |\n|---|---:|---:|")
    for k in rows_ours[0]["times"]:
        if k != "TOTAL ours":
            print(f"| {k} | {med(rows_ours, k):.2f} | {med(rows_ours, k) / total:.0%} |")
    print(f"| **ours total** | {total:.2f} | |")
    alt = rows_ours[-1]["alt"]
    print(f"| (not in the total) ORT int8 scoring of the test split on the export | "
          f"{float(np.median([r['alt']['seconds'] for r in rows_ours])):.2f} | |")
    for k in rows_ort[0]["times"]:
        print(f"| ORT: {k} | {med(rows_ort, k):.2f} | |")
    qs = med(rows_ort, "quantize_static")
    both = qs + med(rows_ort, "export: FP32 ONNX (input of quantize_static)")
    per_round = [a["times"]["TOTAL ours"] / b["times"]["quantize_static"] for a, b in zip(rows_ours, rows_ort)]
    print(f"\nratio ours / quantize_static: {total / qs:.2f}x (per round: {', '.join(f'{r:.2f}' for r in per_round)})")
    print(f"ratio ours / (FP32 export + quantize_static): {total / both:.2f}x")
    print(f"ORT int8 scoring on the export: accuracy {alt['accuracy']:.4f}, top-1 agreement with the torch "
          f"fake-quant logits {rows_ours[-1]['alt_agreement']:.4f}")
    nn_s = np.median(nncf_s) if nncf_s else None
    print("NNCF: " + ("not installed" if nn_s is None else f"{nn_s:.2f} s, ratio ours/NNCF {total / nn_s:.2f}x"))
    # what quantize_static and NNCF do: the int8 model, no accuracy pass over the test split
    made = total - med(rows_ours, "predict")
    print(f"to the int8 model (ours without the torch scoring of the test split, {med(rows_ours, 'predict'):.2f} s): "
          f"{made:.2f} s = {made / qs:.2f}x quantize_static" + ("" if nn_s is None else f", {made / nn_s:.2f}x NNCF"))
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
