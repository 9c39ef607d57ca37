"""Pruning on Fashion-MNIST (issue: joint pruning and distillation).

One unpruned student (ResNet-8-wide, distilled from the shipped teacher in this run), then
for each ratio: one-shot L2 pruning + plain fine-tuning (CE, no teacher) against iterative
pruning (3 steps) + KD recovery from the teacher, at equal epochs. Each pruned model is
exported to ONNX and timed at batch 1 on ONNX Runtime and OpenVINO (fp32, one thread), in
the same process as the unpruned model, so the latency column is a ratio measured here.
Then the latency-budget mode (prune.target: openvino b1, speedup 2 = 0.5x the unpruned
latency) and a round_to check: one 3x3 conv at widths on and off the multiple-of-8 grid,
fp32 and int8 (ORT quantize_static QDQ), on both runtimes.

    python benchmarks/prune.py --student-epochs 6 --epochs 3 --ratios 0.3 0.5 0.7
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from calib.datasets import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist
from calib.sampling import calibration_split
from compress.checkpoint import load_into, read_state_dict
from compress.distill.objectives import CE, ReverseKL
from compress.measure import LatencyService, LatencySession, model_stats
from compress.models import build_model, count_params
from compress.prune import LatencyTarget, PruneConfig, PruneStage
from compress.stage import RunContext
from compress.structure import Structure
from compress.train import TrainConfig, accuracy, fit, predict
from targets import base as targets

ROOT = Path(__file__).resolve().parents[1]
KD = [ReverseKL(weight=0.9, temperature=4.0), CE(weight=0.1)]
RECOVERY = dict(optimizer="sgd", lr=0.02, augment=False, cache="full", round_to=8)


def quiet(_):
    pass


def latency_vs(reference: nn.Module, model: nn.Module, x: np.ndarray, work: Path, runs=300) -> dict:
    out = {}
    for backend in ("onnxruntime", "openvino"):
        with LatencyService(x.shape[1:]).session(backend, 1, x) as s:
            ref_ms, ms = s.paired_p50(s.compile(reference), s.compile(model), runs)
        out[backend] = (ms, ms / ref_ms)
    return out


def round_to_check(work: Path) -> list[str]:
    """One conv (C -> C, 3x3, 14x14 input) at widths around 64: does leaving the grid of 8
    cost more than the channels it removes?"""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, c):
            self.items = iter([{"input": np.random.rand(1, c, 14, 14).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    lines = ["| channels | fp32 ORT ms | fp32 OV ms | int8 ORT ms | int8 OV ms |",
             "|---:|---:|---:|---:|---:|"]
    for c in (40, 48, 52, 56, 60, 62, 63, 64):
        torch.manual_seed(0)
        conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)).eval()
        x = np.random.rand(1, c, 14, 14).astype(np.float32)
        d = work / f"conv{c}"
        d.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(conv, (torch.from_numpy(x),), str(d / "f.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["out"])
        quantize_static(str(d / "f.onnx"), str(d / "q.onnx"), Reader(c), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        from targets.base import CompileOptions
        ms = {}
        for kind in ("f", "q"):
            for backend in ("onnxruntime", "openvino"):
                path = d / f"{kind}.onnx"
                if backend == "openvino":
                    import openvino as ov
                    ov.save_model(ov.convert_model(str(path)), str(d / f"{kind}.xml"), compress_to_fp16=False)
                    path = d / f"{kind}.xml"
                opts = CompileOptions(threads=1, precision="int8" if kind == "q" else "fp32", work_dir=d)
                r = targets.get(backend).compile(path, opts)
                with LatencySession(backend, 1, x, x.shape[1:], 17) as s:
                    ms[kind, backend] = s.paired_p50(r, r, 200)[0]
        lines.append(f"| {c} | {ms['f', 'onnxruntime']:.4f} | {ms['f', 'openvino']:.4f} | "
                     f"{ms['q', 'onnxruntime']:.4f} | {ms['q', 'openvino']:.4f} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--teacher", default=str(ROOT / "examples/teachers/fashion_mnist_resnet_teacher.safetensors"))
    ap.add_argument("--student", default="resnet8_wide")
    ap.add_argument("--student-epochs", type=float, default=6)
    ap.add_argument("--epochs", type=float, default=3, help="recovery epochs per pruned model")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--skip-round-to", action="store_true")
    ap.add_argument("--only-budget", action="store_true", help="only the latency-budget row")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = fashion_mnist(args.data_root)
    work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    teacher = build_model("resnet_teacher", 10, 1)
    load_into(teacher, read_state_dict(Path(args.teacher)), args.teacher)
    teacher.eval()
    ctx = RunContext(data=data, calib=calibration_split(data.train, 1024, 0), teacher=teacher,
                     device=torch.device("cpu"), run_dir=work, log=quiet, seed=0, batch_size=128,
                     structure=Structure(model=args.student, num_classes=10, in_channels=1, input_shape=[1, 28, 28]),
                     latency=LatencyService(data.input_shape), model_stats=model_stats,
                     eval_each_epoch=False, teacher_key="bench-teacher", data_key="fmnist")
    torch.manual_seed(0)
    student = build_model(args.student, 10, 1)
    fit(student, data, TrainConfig(epochs=args.student_epochs, loss=KD, lr=0.1, warmup_epochs=0.5,
                                   augment=False, cache="full"), ctx.train_env("student"))
    student.eval()

    def acc(m):
        return accuracy(predict(m, data.test, data), data.test.labels)

    x = ctx.data.normalize(ctx.calib.images[:1]).numpy()
    s = model_stats(student, student, data.input_shape)
    print(f"unpruned {args.student}: {acc(student):.4f}, {s['params']:,} params, {s['macs']:,} MACs", flush=True)
    rows = []
    for ratio in ([] if args.only_budget else args.ratios):
        for method, cfg in (
                ("one-shot + finetune (CE)",
                 PruneConfig(ratio=ratio, steps=1, epochs=args.epochs, loss=[CE()], **RECOVERY)),
                ("3 steps + KD recovery", PruneConfig(ratio=ratio, steps=3, epochs=args.epochs, loss=KD, **RECOVERY))):
            m = PruneStage().run(copy.deepcopy(student), ctx, cfg).model.eval()
            st = model_stats(m, m, data.input_shape)
            lat = latency_vs(student, m, x, work)
            rows.append((ratio, method, acc(m), st["params"], st["macs"], lat))
            print(rows[-1], flush=True)
    target = LatencyTarget(backend="openvino", threads=1, speedup=2.0, runs=300)
    res = PruneStage().run(copy.deepcopy(student), ctx,
                           PruneConfig(target=target, steps=3, epochs=args.epochs, loss=KD, **RECOVERY))
    m, search = res.model.eval(), res.metrics["latency_search"]
    print(f"\nunpruned {args.student}: accuracy {acc(student):.4f}, {s['params']:,} params, {s['macs']:,} MACs; "
          f"recovery {args.epochs:g} epochs each (sgd lr 0.02, batch 128); KD = reverse_kl T4 0.9 + ce 0.1 "
          f"from resnet_teacher; b1 latency fp32, 1 thread, as a ratio to the unpruned model timed "
          f"interleaved in the same process\n")
    print("| ratio | method | accuracy | params | MACs | ORT b1 ms | ORT vs unpruned | OV b1 ms | OV vs unpruned |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for ratio, method, a, p, macs, lat in rows:
        print(f"| {ratio:g} | {method} | {a:.4f} | {p:,} | {macs:,} | {lat['onnxruntime'][0]:.3f} | "
              f"{lat['onnxruntime'][1]:.2f}x | {lat['openvino'][0]:.3f} | {lat['openvino'][1]:.2f}x |")
    print(f"\nlatency budget (prune.target openvino b1 speedup 2 = {search['goal_ratio']:.2f}x the unpruned "
          f"{search['unpruned_p50_ms']:.3f} ms): chose ratio {search['chosen_ratio']:g} "
          f"({'met' if search['met'] else 'not met'} in the search); after recovery: accuracy {acc(m):.4f}, "
          f"{count_params(m):,} params, achieved {search['final']['latency_ratio']:.2f}x "
          f"({search['final']['p50_ms']:.3f} ms vs {search['final']['unpruned_p50_ms']:.3f} ms)\n")
    print("| candidate ratio | MACs | OV p50 ms | unpruned p50 ms | ratio | meets |\n|---:|---:|---:|---:|---:|---|")
    for c in sorted(search["candidates"], key=lambda c: c["ratio"]):
        print(f"| {c['ratio']:g} | {c['macs']:,} | {c['p50_ms']:.3f} | {c['unpruned_p50_ms']:.3f} | "
              f"{c['latency_ratio']:.2f} | {'yes' if c['met'] else 'no'} |")
    if not args.skip_round_to:
        print("\nround_to check: Conv(C->C,3x3)+ReLU+Conv(C->C,3x3) at 14x14, batch 1, 1 thread\n")
        print("\n".join(round_to_check(work)))


if __name__ == "__main__":
    main()
