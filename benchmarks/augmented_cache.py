"""Augmentation with a teacher cache (FKD) on Fashion-MNIST: does `cache: augmented` make
augmentation pay? Three ways to distill the same ResNet-8 student from the shipped teacher,
at equal epochs, at a short and a longer schedule:

  no augmentation, cache full      the teacher's logits on the plain images, read by index
  augmentation, live teacher       cache none: the teacher runs on every augmented batch
  augmentation, augmented cache    cache: augmented, R stored views (topk targets), one per epoch

Prints test accuracy, seconds per epoch (wall, and CPU seconds of this process, which barely
move with other processes' load at --threads 1), what building each cache cost, and the whole
schedule's cost including the build. The caches are built once, before the runs, and serve
both schedules (as they serve later stages and re-runs of a pipeline).

    nice -n 5 python benchmarks/augmented_cache.py --limit 6000 5000 --short 2 --long 8 --views 4
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from calib.datasets import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist
from calib.sampling import stratified_indices
from compress.checkpoint import load_into, read_state_dict
from compress.distill.objectives import CE, KL
from compress.distill.teacher import teacher_source
from compress.models import build_model
from compress.train import TrainConfig, TrainEnv, accuracy, autocast_dtype, fit, predict

ROOT = Path(__file__).resolve().parents[1]
BATCH = 128  # examples/fashion_mnist.yaml data.batch_size
WAYS = {
    "no augmentation, cache full": dict(augment=False, cache="full"),
    "augmentation, live teacher": dict(augment=True, cache="none"),
    "augmentation, augmented cache": dict(augment=True, cache="augmented"),
}


class EpochClock:
    """CPU seconds of this process per epoch (the history row has the wall seconds)."""

    def __init__(self):
        self.cpu: list[float] = []

    def on_epoch_start(self, state):
        self.t0 = time.process_time()

    def on_epoch_end(self, state):
        self.cpu.append(time.process_time() - self.t0)


def load(args):
    data = fashion_mnist(args.data_root)
    data.train = data.train.subset(stratified_indices(data.train.labels, args.limit[0], 0))
    data.test = data.test.subset(stratified_indices(data.test.labels, args.limit[1], 0))
    teacher = build_model("resnet_teacher", 10, 1)
    load_into(teacher, read_state_dict(Path(args.teacher)), args.teacher)
    return data, teacher.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--teacher", default=str(ROOT / "examples/teachers/fashion_mnist_resnet_teacher.safetensors"))
    ap.add_argument("--limit", type=int, nargs=2, default=[6000, 5000], metavar=("TRAIN", "TEST"),
                    help="stratified subsets of the training and test splits")
    ap.add_argument("--short", type=float, default=2)
    ap.add_argument("--long", type=float, default=8)
    ap.add_argument("--views", type=int, default=4, help="R of the augmented cache")
    ap.add_argument("--k", type=int, default=8, help="cache_k of the augmented cache (topk targets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ways", nargs="*", help="only the ways whose names start with these")
    ap.add_argument("--work", help="cache folder to reuse (default: a new temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data, teacher = load(args)
    t_acc = accuracy(predict(teacher, data.test, data), data.test.labels)
    print(f"teacher resnet_teacher: {t_acc:.4f} on {len(data.test)} test images", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="augcache-bench-"))
    ways = {n: s for n, s in WAYS.items() if not args.ways or any(n.startswith(w) for w in args.ways)}
    base = dict(optimizer="sgd", lr=0.1, warmup_epochs=0.5, loss=[KL(weight=0.9, temperature=4.0), CE(weight=0.1)],
                cache_views=args.views, cache_k=args.k)

    def env(**kw):
        return TrainEnv(BATCH, teacher=teacher, seed=args.seed, log=lambda s: None, teacher_key="bench-teacher",
                        cache_dir=work, data_key=f"fmnist{args.limit[0]}", **kw)

    builds = {}
    for name, spec in ways.items():  # each cache built once, timed, then read by every run
        cfg = TrainConfig(epochs=1, **base, **spec)
        if cfg.cache == "none":
            continue
        w, c = time.time(), time.process_time()
        teacher_source(cfg, env(), data, torch.channels_last, autocast_dtype(cfg, torch.device("cpu")))
        builds[name] = (time.time() - w, time.process_time() - c)
        size = sum(p.stat().st_size for p in work.glob(f"*-{cfg.cache}*"))
        print(f"build {name}: {builds[name][0]:.0f} s wall, {builds[name][1]:.0f} s CPU, {size / 1e6:.2f} MB",
              flush=True)

    rows = []
    for epochs in dict.fromkeys((args.short, args.long)):
        for name, spec in ways.items():
            torch.manual_seed(args.seed)
            student, clock = build_model("resnet8", 10, 1), EpochClock()
            hist = fit(student, data, TrainConfig(epochs=epochs, **base, **spec), env(callbacks=[clock]))
            acc = accuracy(predict(student, data.test, data), data.test.labels)
            wall, cpu = statistics.mean(h["seconds"] for h in hist), statistics.mean(clock.cpu)
            b_wall, b_cpu = builds.get(name, (0.0, 0.0))
            rows.append((epochs, name, acc, wall, cpu, b_cpu, b_cpu + cpu * epochs))
            print(f"{epochs:g} epochs, {name}: {acc:.4f}, {wall:.1f} s/epoch wall, {cpu:.1f} s/epoch CPU", flush=True)

    print()
    print(f"ResNet-8 student, teacher resnet_teacher ({t_acc:.4f}), {args.limit[0]} training / {args.limit[1]} test "
          f"images (stratified), KD 0.9 kl (T=4) + 0.1 ce, sgd lr 0.1 cosine, batch {BATCH}, seed {args.seed}, "
          f"augmented cache R={args.views} views, topk k={args.k}; {args.threads} thread(s)")
    print()
    print("| epochs | way | test accuracy | s/epoch (wall) | s/epoch (CPU) | cache build (CPU s) | "
          "schedule incl. build (CPU s) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for epochs, name, acc, wall, cpu, build, total in rows:
        print(f"| {epochs:g} | {name} | {acc:.4f} | {wall:.1f} | {cpu:.1f} | {build:.0f} | {total:.0f} |")


if __name__ == "__main__":
    main()
