"""Self-distilled vs external-teacher QAT (issue 15 item 3) on Fashion-MNIST, W8A8 and W4A8.

From one distilled float ResNet-8 student (a run's 01-distill/ folder, e.g. the demo's, or
distilled here from the shipped teacher with --distill-epochs), the quantize stage runs
calibration then QAT with KD (kl T=4 x 0.9 + ce x 0.1, as benchmarks/quantize.py; adamw,
lr 1e-4, teacher-output cache full, no augmentation) at equal epochs, with the QAT teacher:
  configured  the shipped resnet_teacher (0.9472)
  self        the float student the stage received (BitDistiller, Du et al. 2024)
  mix         {self: 0.5, configured: 0.5}: the two distributions averaged
Accuracy: the fake-quant torch model on the 10,000 test images. Seconds: the stage without
building its teacher-output cache (timed apart: once per teacher, shared by every row).

    nice -n 5 python benchmarks/self_qat.py --student runs/fashion-mnist/01-distill --epochs 1 --seeds 0 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

import compress.distill.teacher as teacher_mod
from calib.datasets import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist
from calib.sampling import calibration_split
from compress.checkpoint import load_into, read_state_dict
from compress.distill.objectives import CE, KL
from compress.distill.stage import DistillConfig
from compress.measure import model_stats
from compress.models import build_model
from compress.pipeline import RunContext, file_digest
from compress.quantize import QuantizeConfig, QuantizeStage
from compress.structure import Structure, rebuild
from compress.train import TrainEnv, accuracy, fit, predict

ROOT = Path(__file__).resolve().parents[1]
LOSS = [KL(weight=0.9, temperature=4.0), CE(weight=0.1)]  # kl: the mix cache is averaged at its T
TEACHERS = {"configured": "configured", "self": "self", "mix 0.5/0.5": {"self": 0.5, "configured": 0.5}}
CACHE_SECONDS: dict[str, float] = {}


def timed_cache(build):
    """build_or_load, timed per cache file (its key), so row seconds leave the one-off build out."""
    def wrapper(kind, k, temperature, forward, teacher_key, *a, **kw):
        t0 = time.time()
        out = build(kind, k, temperature, forward, teacher_key, *a, **kw)
        CACHE_SECONDS[teacher_key] = CACHE_SECONDS.get(teacher_key, 0.0) + time.time() - t0
        print(f"  cache {teacher_key}: {time.time() - t0:.0f} s", flush=True)
        return out
    return wrapper


def distilled_student(args, data, teacher, work: Path, log):
    """The float student: a run's stage folder, or distilled here (cache full, no augmentation)."""
    sdir = Path(args.student)
    if (sdir / "model.safetensors").is_file():
        structure = Structure.read(sdir / "structure.json")
        return rebuild(structure, sdir / "model.safetensors"), structure, str(sdir)
    log(f"no student at {sdir}: distilling resnet8 for {args.distill_epochs} epochs")
    torch.manual_seed(0)
    student = build_model("resnet8", 10, 1)
    cfg = DistillConfig(epochs=args.distill_epochs, optimizer="sgd", lr=0.1, warmup_epochs=0.5, augment=False,
                        cache="full", loss=LOSS)
    fit(student, data, cfg, TrainEnv(128, desc="distill", teacher=teacher, teacher_key=file_digest(
        Path(args.teacher)), cache_dir=work / "cache", data_key=f"fashion_mnist-{args.train_size or 'full'}", log=log))
    structure = Structure(model="resnet8", num_classes=10, in_channels=1, input_shape=[1, 28, 28])
    return student.eval(), structure, f"distilled here, {args.distill_epochs} epochs"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--student", default=str(ROOT / "runs/fashion-mnist/01-distill"),
                    help="folder with structure.json + model.safetensors of the float student")
    ap.add_argument("--distill-epochs", type=float, default=5, help="when --student holds no model")
    ap.add_argument("--teacher", default=str(ROOT / "examples/teachers/fashion_mnist_resnet_teacher.safetensors"))
    ap.add_argument("--epochs", type=float, default=1, help="QAT epochs, every row")
    ap.add_argument("--bits", type=int, nargs="*", default=[8, 4], help="weight bits (activations int8)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--teachers", nargs="*", default=list(TEACHERS), choices=list(TEACHERS))
    ap.add_argument("--train-size", type=int, default=None, help="first N training images (smoke runs only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs/bench-self-qat"))
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    teacher_mod.build_or_load = timed_cache(teacher_mod.build_or_load)
    log = lambda s: print(s, flush=True)  # noqa: E731
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    data = fashion_mnist(args.data_root)
    if args.train_size:
        data.train = data.train.subset(torch.arange(args.train_size))
    teacher = build_model("resnet_teacher", 10, 1)
    load_into(teacher, read_state_dict(Path(args.teacher)), args.teacher)
    teacher.eval()
    student, structure, origin = distilled_student(args, data, teacher, work, log)
    labels = data.test.labels
    calib = calibration_split(data.train, 1024, 0)
    results = [{"row": "float student", "teacher": "—", "bits": 32, "seed": None, "ptq": None,
                "acc": accuracy(predict(student, data.test, data), labels), "seconds": 0.0}]
    for bits in args.bits:
        for seed in args.seeds:
            for name in args.teachers:
                ctx = RunContext(data=data, calib=calib, teacher=teacher, device=torch.device("cpu"), run_dir=work,
                                 log=log, seed=seed, batch_size=128, structure=structure, model_stats=model_stats,
                                 eval_each_epoch=False, teacher_key=file_digest(Path(args.teacher)),
                                 data_key=f"fashion_mnist-{args.train_size or 'full'}")
                cfg = QuantizeConfig(weight_bits=bits, calib_batches=8, epochs=args.epochs, optimizer="adamw",
                                     lr=1e-4, augment=False, cache="full", loss=LOSS, teacher=TEACHERS[name])
                built = sum(CACHE_SECONDS.values())
                t0 = time.time()
                res = QuantizeStage().run(copy.deepcopy(student), ctx, cfg)
                seconds = time.time() - t0 - (sum(CACHE_SECONDS.values()) - built)
                row = {"row": f"QAT W{bits}A8", "teacher": name, "bits": bits, "seed": seed,
                       "ptq": res.metrics["ptq_accuracy"], "acc": accuracy(predict(res.model, data.test, data), labels),
                       "seconds": seconds}
                results.append(row)
                log(json.dumps(row))
    load = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "cache_seconds": CACHE_SECONDS,
                                               "load": load}, indent=2))
    print_tables(results, args, origin, load, time.time() - t_start)


def print_tables(results: list, args, origin: str, load, total_s: float) -> None:
    print(f"\nFashion-MNIST test split (10,000); float student: {origin}; QAT {args.epochs:g} epoch(s), "
          f"seeds {args.seeds}; {args.threads} torch threads; total {total_s / 60:.1f} min; "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    print("| format | QAT teacher | PTQ acc | QAT acc (per seed) | mean | QAT s (mean) |")
    print("|---|---|---:|---:|---:|---:|")
    f = results[0]
    print(f"| float student | — | — | {f['acc']:.4f} | {f['acc']:.4f} | — |")
    for bits in args.bits:
        for name in args.teachers:
            rows = [r for r in results if r["bits"] == bits and r["teacher"] == name]
            accs = [r["acc"] for r in rows]
            print(f"| W{bits}A8 | {name} | {rows[0]['ptq']:.4f} | {' / '.join(f'{a:.4f}' for a in accs)} | "
                  f"{statistics.mean(accs):.4f} | {statistics.mean(r['seconds'] for r in rows):.0f} |")
    print("\nteacher-output cache builds (once per teacher; every row above reuses them):")
    for key, s in CACHE_SECONDS.items():
        print(f"  {key}: {s:.0f} s")


if __name__ == "__main__":
    main()
