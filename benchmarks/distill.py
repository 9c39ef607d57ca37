"""Distillation objectives side by side on Fashion-MNIST (issue: distillation library).

Every student is a ResNet-8 trained for the same number of epochs from the same seeds,
without augmentation (so all logit objectives can read the same full teacher-output cache;
hint+kl needs the teacher's forward pass and runs live), plus CE and KD with augmentation,
where the teacher runs live on each augmented batch. Prints one markdown table:
accuracy mean and spread over seeds, seconds per epoch, and the epoch-time ratio of
cached vs live teacher outputs measured in this run.

    python benchmarks/distill.py --epochs 5 --seeds 0 1
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from calib.datasets import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist
from calib.sampling import stratified_indices
from compress.checkpoint import load_into, read_state_dict
from compress.distill.ensemble import Ensemble
from compress.distill.features import FeatureTerm
from compress.distill.objectives import CAKLD, CE, DIST, DKD, JS, KL, TAID, MSELogits, ReverseKL
from compress.models import build_model
from compress.train import TrainConfig, TrainEnv, accuracy, fit, predict

ROOT = Path(__file__).resolve().parents[1]
KD = dict(weight=0.9, temperature=4.0)
METHODS = {
    "ce only (no teacher)": dict(loss=[CE()]),
    "kl (Hinton, T=4) + 0.1 ce": dict(loss=[KL(**KD), CE(weight=0.1)]),
    "reverse_kl + 0.1 ce": dict(loss=[ReverseKL(**KD), CE(weight=0.1)]),
    "js + 0.1 ce": dict(loss=[JS(**KD), CE(weight=0.1)]),
    "mse_logits + 0.1 ce": dict(loss=[MSELogits(weight=0.9), CE(weight=0.1)]),
    "cakld + 0.1 ce": dict(loss=[CAKLD(weight=0.9), CE(weight=0.1)]),
    "taid + 0.1 ce": dict(loss=[TAID(weight=0.9), CE(weight=0.1)]),
    "dist + 1.0 ce": dict(loss=[DIST(weight=1.0), CE(weight=1.0)]),
    "dkd + 1.0 ce": dict(loss=[DKD(weight=1.0), CE(weight=1.0)]),
    "hint (layers.2 <- layers.5) + kl + 0.1 ce": dict(
        loss=[KL(**KD), CE(weight=0.1)], cache="none",
        features=[FeatureTerm(student="layers.2", teacher="layers.5", kind="hint", weight=1.0)]),
    "ensemble (teacher + resnet8_wide, probs) kl + 0.1 ce": dict(loss=[KL(**KD), CE(weight=0.1)], ensemble=True),
    # augmentation: the teacher must see the augmented batch, so no cache (live teacher)
    "ce only + augmentation": dict(loss=[CE()], augment=True, cache="none"),
    "kl + 0.1 ce + augmentation (live teacher)": dict(loss=[KL(**KD), CE(weight=0.1)], augment=True, cache="none"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--teacher", default=str(ROOT / "examples/teachers/fashion_mnist_resnet_teacher.safetensors"))
    ap.add_argument("--epochs", type=float, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--second-teacher-epochs", type=float, default=6)
    ap.add_argument("--only", nargs="*", help="run only methods whose name starts with these")
    ap.add_argument("--limit", type=int, nargs=2, metavar=("TRAIN", "TEST"),
                    help="stratified subsets, for a quick smoke run")
    args = ap.parse_args()

    data = fashion_mnist(args.data_root)
    if args.limit:
        data.train = data.train.subset(stratified_indices(data.train.labels, args.limit[0], 0))
        data.test = data.test.subset(stratified_indices(data.test.labels, args.limit[1], 0))
    teacher = build_model("resnet_teacher", 10, 1)
    load_into(teacher, read_state_dict(Path(args.teacher)), args.teacher)
    teacher.eval()
    t_acc = accuracy(predict(teacher, data.test, data), data.test.labels)
    print(f"teacher resnet_teacher: {t_acc:.4f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    base = dict(epochs=args.epochs, optimizer="sgd", lr=0.1, warmup_epochs=0.5, augment=False,
                cache="full")
    ensemble = None
    rows, seconds_per_epoch = [], {}
    for name, spec in METHODS.items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        spec = dict(spec)
        t = teacher
        if spec.pop("ensemble", False):
            if ensemble is None:
                second = build_model("resnet8_wide", 10, 1)
                torch.manual_seed(100)
                fit(second, data, TrainConfig(epochs=args.second_teacher_epochs, optimizer="sgd", lr=0.1,
                                              warmup_epochs=0.5), TrainEnv(128, seed=100, log=lambda s: None))
                second.eval()
                acc2 = accuracy(predict(second, data.test, data), data.test.labels)
                print(f"second teacher resnet8_wide ({args.second_teacher_epochs:g} epochs): {acc2:.4f}", flush=True)
                ensemble = Ensemble([teacher, second], [1.0, 1.0])
            t = ensemble
        cfg = TrainConfig(**{**base, **spec})
        accs, secs = [], []
        for seed in args.seeds:
            torch.manual_seed(seed)
            student = build_model("resnet8", 10, 1)
            hist = fit(student, data, cfg, TrainEnv(128, teacher=t, seed=seed, log=lambda s: None,
                                                    teacher_key="bench-ensemble" if t is ensemble else "bench-teacher",
                                                    cache_dir=work, data_key="fmnist"))
            accs.append(accuracy(predict(student, data.test, data), data.test.labels))
            secs.append(statistics.mean(h["seconds"] for h in hist))
        spread = (max(accs) - min(accs)) if len(accs) > 1 else 0.0
        rows.append((name, statistics.mean(accs), spread, accs, statistics.mean(secs)))
        seconds_per_epoch[name] = statistics.mean(secs)
        print(f"{name}: {statistics.mean(accs):.4f} (spread {spread:.4f}) {accs} "
              f"{statistics.mean(secs):.1f} s/epoch", flush=True)

    # cache vs live teacher: one epoch of the Hinton recipe each way, same seed, same process
    # (fit times each epoch's loop; building the cache happens before it and is not counted)
    timing = {}
    for cache in ("full", "none"):
        cfg = TrainConfig(**{**base, "epochs": 1, "cache": cache, "loss": [KL(**KD), CE(weight=0.1)]})
        hist = fit(build_model("resnet8", 10, 1), data, cfg, TrainEnv(128, teacher=teacher, seed=0, log=lambda s: None,
                                                                      teacher_key="bench-teacher", cache_dir=work,
                                                                      data_key="fmnist"))
        timing[cache] = hist[0]["seconds"]
    print()
    print(f"ResNet-8 student (78k params), teacher resnet_teacher ({t_acc:.4f}), "
          f"{args.epochs:g} epochs, sgd lr 0.1 cosine, no augmentation unless the row says so, "
          f"seeds {args.seeds}, {torch.get_num_threads()} threads")
    print()
    print("| objective | accuracy (mean) | spread (max-min) | per seed | s/epoch |")
    print("|---|---:|---:|---|---:|")
    for name, mean, spread, accs, sec in rows:
        print(f"| {name} | {mean:.4f} | {spread:.4f} | {', '.join(f'{a:.4f}' for a in accs)} | {sec:.1f} |")
    print()
    print(f"epoch time, Hinton KD: cache full {timing['full']:.1f} s, "
          f"live teacher {timing['none']:.1f} s: live/cached = {timing['none'] / timing['full']:.2f}x")


if __name__ == "__main__":
    main()
