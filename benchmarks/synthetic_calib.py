"""Data-free calibration against real calibration (issue 15): PTQ W8A8 and W4A8 of one float
student, calibrated on real images or on images synthesized with the pre-issue-15 objective
(`batch`), ZeroQ's objective (`zeroq`), and ZeroQ + DeepInversion's class-balanced cross-entropy.

Accuracy is the brevitas model's in torch on the full Fashion-MNIST test split (benchmarks/quantize.py
shows ONNX Runtime reproducing it); each synthetic row is run for every seed of the synthesis. Every
calibration set is also scored with ZeroQ's objective under the student (real images included: the
value real data reaches) and by how many classes the student predicts on it.

    PYTHONPATH=. nice -n 5 python benchmarks/synthetic_calib.py --student runs/fm-student --seeds 0 1
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from calib.datasets import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist
from calib.sampling import calibration_split
from calib.synthetic import SynthesisConfig, bn_distance, synthesize
from compress.measure import model_stats
from compress.pipeline import RunContext
from compress.quantize import QuantizeConfig, QuantizeStage
from compress.structure import Structure, rebuild
from compress.train import accuracy, predict

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"PTQ W8A8": dict(epochs=0), "PTQ W4A8": dict(epochs=0, weight_bits=4)}


def variants(args) -> dict:
    """name -> SynthesisConfig (None: real calibration images)."""
    out = {"real": None,
           "synthetic, old objective (batch)": SynthesisConfig(objective="batch", steps=args.steps),
           "synthetic, ZeroQ": SynthesisConfig(steps=args.steps)}
    for w in args.ce_weights:
        out[f"synthetic, ZeroQ + CE (weight {w:g})"] = SynthesisConfig(steps=args.steps, ce_weight=w)
    return out


def coverage(model, split, data) -> tuple[int, float]:
    """(classes the model predicts on the split, share of the most predicted class)."""
    pred = predict(model, split, data).argmax(1)
    counts = torch.bincount(torch.as_tensor(pred), minlength=data.num_classes)
    return int((counts > 0).sum()), float(counts.max() / counts.sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--student", default=str(ROOT / "runs/fm-student"),
                    help="folder with structure.json + model.safetensors of the float student")
    ap.add_argument("--samples", type=int, default=512, help="calibration images, real and synthetic alike")
    ap.add_argument("--steps", type=int, default=200, help="synthesis steps per batch (the config default)")
    ap.add_argument("--ce-weights", type=float, nargs="*", default=[1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run only the calibrations whose name starts with these")
    ap.add_argument("--json", default=None, help="rows written here as they come")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = fashion_mnist(args.data_root)
    sdir = Path(args.student)
    structure = Structure.read(sdir / "structure.json")
    student = rebuild(structure, sdir / "model.safetensors").eval()
    f_acc = accuracy(predict(student, data.test, data), data.test.labels)
    log = lambda s: print(s, flush=True)  # noqa: E731
    quiet = lambda s: None  # noqa: E731
    rows = []
    work = Path(tempfile.mkdtemp(prefix="synthetic-calib-"))
    for seed in args.seeds:  # every variant at the first seed first: a cut-short run still compares them all
        for name, cfg in variants(args).items():
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            t0 = time.time()
            split = (calibration_split(data.train, args.samples, seed) if cfg is None else
                     synthesize(copy.deepcopy(student), args.samples, data.input_shape, data.normalize, cfg, seed, log))
            row = {"calibration": name, "seed": seed, "synthesis_s": time.time() - t0,
                   "zeroq_objective": bn_distance(student, data.normalize(split.images)),
                   "classes": coverage(student, split, data)}
            for fmt, kw in FORMATS.items():
                ctx = RunContext(data=data, calib=split, teacher=None, device=torch.device("cpu"),
                                 run_dir=work, log=quiet, seed=0, batch_size=128, structure=structure,
                                 model_stats=model_stats, eval_each_epoch=False)
                res = QuantizeStage().run(copy.deepcopy(student), ctx, QuantizeConfig(**kw))
                row[fmt] = res.metrics["ptq_accuracy"]
            rows.append(row)
            log(json.dumps(row))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
    print_table(rows, args, f_acc)


def print_table(rows: list, args, f_acc: float) -> None:
    print(f"\nfloat student {args.student}: {f_acc:.4f}; {args.samples} calibration images; synthesis "
          f"{args.steps} steps per batch of 128, fitted to the student's BN statistics; seeds {args.seeds}\n")
    print("| calibration | seed | PTQ W8A8 | PTQ W4A8 | ZeroQ objective | classes predicted (top share) "
          "| synthesis s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['calibration']} | {r['seed']} | {r['PTQ W8A8']:.4f} | {r['PTQ W4A8']:.4f} | "
              f"{r['zeroq_objective']:.3f} | {r['classes'][0]} ({r['classes'][1]:.2f}) | {r['synthesis_s']:.0f} |")
    print("\n| calibration | mean PTQ W8A8 | mean PTQ W4A8 | vs real W8A8 | vs real W4A8 |\n|---|---:|---:|---:|---:|")
    def means(name):
        rs = [r for r in rows if r["calibration"] == name]
        return [sum(r[f] for r in rs) / len(rs) for f in FORMATS] if rs else None
    real = means("real")  # over the same seeds: each seed draws its own real subset too
    for name in dict.fromkeys(r["calibration"] for r in rows):
        m8, m4 = means(name)
        d8, d4 = ((f"{100 * (m - r):+.2f} pt" if real else "—") for m, r in zip((m8, m4), real or (0, 0)))
        print(f"| {name} | {m8:.4f} | {m4:.4f} | {d8} | {d4} |")


if __name__ == "__main__":
    main()
