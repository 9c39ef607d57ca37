"""Quantization recipes side by side on Fashion-MNIST (issue 5), measured on the runtimes.

Starts from one trained float student (structure.json + model.safetensors of a pruned
ResNet-8, e.g. runs/fashion-mnist/02-prune/ of the demo) and the shipped teacher. Every row
is exported (QCDQ ONNX + OpenVINO IR) and run on ONNX Runtime and OpenVINO (CPU, 1 thread):
accuracy on the full test split, top-1 agreement with its own torch model, executed kernels,
batch-1 latency (targets/profile.py) and file size. Peers on the same float student in the
same run: ONNX Runtime `quantize_static` (QDQ, per-channel) and NNCF `nncf.quantize` on the
OpenVINO model, both calibrated on the same calibration subset.

    python benchmarks/quantize.py --student runs/fm-student --epochs 1
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from calib.datasets import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist
from calib.sampling import calibration_split
from calib.synthetic import SynthesisConfig, load_or_synthesize
from compress.checkpoint import load_into, read_state_dict
from compress.distill.objectives import CAKLD, CE, KL
from compress.export import export_float, export_model
from compress.measure import model_stats
from compress.models import build_model
from compress.pipeline import RunContext, file_digest
from compress.quantize import QuantizeConfig, QuantizeStage
from compress.structure import Structure, rebuild
from compress.train import accuracy, predict
from targets import base
from targets.openvino import to_ir as to_openvino
from targets.profile import profile

ROOT = Path(__file__).resolve().parents[1]
KD = [KL(weight=0.9, temperature=4.0), CE(weight=0.1)]


def rows_spec(epochs: float) -> dict:
    """name -> (QuantizeConfig kwargs, calibration: real | synthetic)."""
    qat = dict(epochs=epochs, augment=False, lr=2e-4, cache="full")
    return {
        "PTQ W8A8": (dict(epochs=0), "real"),
        "PTQ W8A8 + bias correction": (dict(epochs=0, bias_correction=True), "real"),
        "PTQ W8A8 + act. equalization (alpha 0.5)": (dict(epochs=0, act_equalization=0.5), "real"),
        "QAT W8A8, no KD (ce)": (dict(qat, loss=[CE()], cache="none"), "real"),
        "QAT W8A8 + KD (kl)": (dict(qat, loss=KD), "real"),
        "QAT W8A8 + KD (cakld)": (dict(qat, loss=[CAKLD(weight=0.9), CE(weight=0.1)]), "real"),
        "PTQ W4A8": (dict(epochs=0, weight_bits=4), "real"),
        "QAT W4A8 + KD (kl)": (dict(qat, loss=KD, weight_bits=4), "real"),
        "QAT mixed W4/W8 at 6 avg bits + KD (kl)": (
            dict(qat, loss=KD, mixed_precision={"avg_bits": 6.0, "low_bits": 4}), "real"),
        "PTQ W4A16 weight-only": (dict(epochs=0, weight_bits=4, act_bits=16), "real"),
        "PTQ W8A8, synthetic calibration (data-free)": (dict(epochs=0), "synthetic"),
    }


def measure(path_onnx: Path, path_xml: Path | None, x: np.ndarray, labels: np.ndarray,
            ref: np.ndarray | None, work: Path, runs: int) -> dict:
    out = {}
    for backend, path in (("onnxruntime", path_onnx), ("openvino", path_xml)):
        if path is None:
            out[backend] = None
            continue
        runner = base.get(backend).compile(path, base.CompileOptions(threads=1, work_dir=work))
        logits = np.concatenate([runner(x[i:i + 500]) for i in range(0, len(x), 500)])
        lat = profile(runner, x[:64], warmup=20, runs=runs, throughput_batch=64, throughput_runs=5)
        size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)
        out[backend] = {"accuracy": accuracy(logits, labels),
                        "agreement": None if ref is None else float((logits.argmax(1) == ref.argmax(1)).mean()),
                        "p50_ms": lat["latency_ms"]["p50"], "size_bytes": size,
                        "executed": runner.info["executed_precision"]["summary"]}
    return out


def ort_static(float_onnx: Path, out: Path, calib_x: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib_x[i:i + 128]} for i in range(0, len(calib_x), 128)])

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(float_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def nncf_quantize(float_xml: Path, out_xml: Path, calib_x: np.ndarray) -> None:
    import nncf
    import openvino as ov
    model = ov.Core().read_model(str(float_xml))
    ds = nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))])
    q = nncf.quantize(model, ds, subset_size=len(calib_x))
    ov.save_model(q, str(out_xml), compress_to_fp16=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--student", default=str(ROOT / "runs/fm-student"),
                    help="folder with structure.json + model.safetensors of the float student")
    ap.add_argument("--teacher", default=str(ROOT / "examples/teachers/fashion_mnist_resnet_teacher.safetensors"))
    ap.add_argument("--epochs", type=float, default=1, help="QAT epochs per QAT row")
    ap.add_argument("--calib-samples", type=int, default=1024)
    ap.add_argument("--synthesis-steps", type=int, default=100)
    ap.add_argument("--synthesis-samples", type=int, default=512)
    # ZeroQ fits the images to the BN statistics of the model being quantized; the pipeline
    # uses the teacher's. The teacher costs ~3 s per optimization step (batch 128) on the
    # shared 2-core benchmark machine against ~0.2 s for the student.
    ap.add_argument("--synthesis-source", choices=["teacher", "student"], default="student")
    ap.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per backend")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for calibration/QAT")
    ap.add_argument("--only", nargs="*", help="run only rows whose name starts with these")
    ap.add_argument("--work", default=str(ROOT / "runs/bench-quantize"))
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    data = fashion_mnist(args.data_root)
    sdir = Path(args.student)
    structure = Structure.read(sdir / "structure.json")
    student = rebuild(structure, sdir / "model.safetensors")
    teacher = build_model("resnet_teacher", 10, 1)
    load_into(teacher, read_state_dict(Path(args.teacher)), args.teacher)
    teacher.eval()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    labels = data.test.labels.numpy()
    x = data.normalize_np(data.test.images.numpy())
    calib = calibration_split(data.train, args.calib_samples, 0)
    calib_x = data.normalize_np(calib.images.numpy())
    log = lambda s: print(s, flush=True)  # noqa: E731

    def ctx_for(calib_split, run_dir):
        return RunContext(data=data, calib=calib_split, teacher=teacher, device=torch.device("cpu"),
                          run_dir=work, log=log, seed=0, batch_size=128, structure=structure, model_stats=model_stats,
                          eval_each_epoch=False, teacher_key=file_digest(Path(args.teacher)),
                          data_key="fashion_mnist-full")

    results = []
    f_ref = predict(student, data.test, data)
    fdir = work / "float"
    fdir.mkdir(exist_ok=True)
    export_float(student, fdir / "model.onnx", data.input_shape, 17)
    to_openvino(fdir / "model.onnx", fdir / "model.xml")
    results.append({"row": "float student (fp32)", "torch": accuracy(f_ref, labels), "seconds": 0,
                    **measure(fdir / "model.onnx", fdir / "model.xml", x, labels, f_ref, fdir, args.runs)})
    log(f"float: {results[-1]}")

    synthetic = None
    for name, (kw, calibration) in rows_spec(args.epochs).items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        t0 = time.time()
        cs = calib
        extra = {}
        if calibration == "synthetic":
            if synthetic is None:
                src = teacher if args.synthesis_source == "teacher" else student
                synthetic = load_or_synthesize(
                    work / "cache", [args.synthesis_source, file_digest(Path(args.teacher)), str(sdir)],
                    copy.deepcopy(src), args.synthesis_samples, data.input_shape, data.normalize,
                    SynthesisConfig(steps=args.synthesis_steps), 0, log)
            cs = synthetic
            extra["bn_distance"] = list(synthetic.bn_distance)
        ctx = ctx_for(cs, work)
        res = QuantizeStage().run(copy.deepcopy(student), ctx, QuantizeConfig(**kw))
        q = res.model
        rdir = work / name.split(" (")[0].replace(" ", "_").replace(",", "").replace("/", "-").replace("+", "p")
        manifest = export_model(q, rdir, data, 17, True, name)
        ref = predict(q, data.test, data)
        row = {"row": name, "torch": accuracy(ref, labels), "ptq_torch": res.metrics["ptq_accuracy"],
               "format": res.metrics["format"], "avg_weight_bits": res.metrics["avg_weight_bits"],
               "packed_weight_bytes": manifest["quant_format"]["packed_weight_bytes"],
               "precision": manifest["precision"], "seconds": time.time() - t0, **extra,
               **measure(rdir / "model.onnx", rdir / "model.xml", x, labels, ref, rdir, args.runs)}
        if "mixed_precision" in res.metrics:
            row["mixed_precision"] = res.metrics["mixed_precision"]
            row["sensitivity"] = res.metrics["sensitivity"]
        results.append(row)
        log(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'sensitivity'}, default=str)}")

    if not args.only or any("ORT".startswith(o) or "NNCF".startswith(o) for o in args.only):
        pdir = work / "peers"
        pdir.mkdir(exist_ok=True)
        t0 = time.time()
        ort_static(fdir / "model.onnx", pdir / "ort_static.onnx", calib_x)
        to_openvino(pdir / "ort_static.onnx", pdir / "ort_static.xml")
        results.append({"row": "peer: ORT quantize_static (QDQ, per-channel, U8S8)", "torch": None,
                        "seconds": time.time() - t0, "note": "agreement vs the float student",
                        **measure(pdir / "ort_static.onnx", pdir / "ort_static.xml", x, labels, f_ref, pdir,
                                  args.runs)})
        log(f"ort static: {results[-1]}")
        try:
            t0 = time.time()
            nncf_quantize(fdir / "model.xml", pdir / "nncf.xml", calib_x)
            results.append({"row": "peer: NNCF nncf.quantize (OpenVINO IR)", "torch": None,
                            "seconds": time.time() - t0, "note": "agreement vs the float student",
                            **measure(None, pdir / "nncf.xml", x, labels, f_ref, pdir, args.runs)})
        except ImportError as e:
            results.append({"row": "peer: NNCF", "note": f"not measured: {e}"})
        log(f"nncf: {results[-1]}")

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print_table(results, args, time.time() - t_start)


def _f(v, spec):
    return "—" if v is None else format(v, spec)


def print_table(results: list, args, total_s: float) -> None:
    print()
    print(f"Fashion-MNIST test split (10,000), float student from {args.student}, teacher "
          f"resnet_teacher, QAT {args.epochs:g} epoch(s), calibration {args.calib_samples} images, "
          f"runtimes at 1 thread, total {total_s / 60:.1f} min")
    print()
    print("| row | torch acc | ORT acc | OV acc | agree ORT | agree OV | ORT p50 ms | OV p50 ms | "
          "ONNX bytes | packed weight bytes | executed (ORT; OV) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        o, v = r.get("onnxruntime") or {}, r.get("openvino") or {}
        print(f"| {r['row']} | {_f(r.get('torch'), '.4f')} | {_f(o.get('accuracy'), '.4f')} | "
              f"{_f(v.get('accuracy'), '.4f')} | {_f(o.get('agreement'), '.4f')} | {_f(v.get('agreement'), '.4f')} | "
              f"{_f(o.get('p50_ms'), '.3f')} | {_f(v.get('p50_ms'), '.3f')} | {_f(o.get('size_bytes'), ',')} | "
              f"{_f(r.get('packed_weight_bytes'), ',.0f')} | {o.get('executed', '—')}; {v.get('executed', '—')} |")
    for r in results:
        if r.get("mixed_precision"):
            mp = r["mixed_precision"]
            print(f"\nmixed precision: average {mp['avg_bits']:.2f} bits (target {mp['target_avg_bits']}), "
                  f"lowered to 4 bits: {', '.join(mp['lowered'])}")
            print("\n| layer | weights | objective increase at 4 bits | bits |\n|---|---:|---:|---:|")
            for s in r["sensitivity"]:
                print(f"| {s['layer']} | {s['weights']:,} | {_f(s['objective_delta'], '.4f')} | {s['bits']} |")
        if r.get("bn_distance"):
            print(f"\nsynthetic calibration ({args.synthesis_samples} images, {args.synthesis_steps} steps, "
                  f"{args.synthesis_source}'s BN statistics): BN-statistics distance {r['bn_distance'][0]:.3f} -> "
                  f"{r['bn_distance'][1]:.3f}")


if __name__ == "__main__":
    main()
