"""The training loop before and after the DataLoader/callback rewrite (issue 10), timed on
Fashion-MNIST with the demo's distill settings (examples/fashion_mnist.yaml: ResNet-8
student, SGD lr 0.1, batch 128, no augmentation, reverse_kl + 0.1 ce from the full
teacher-output cache of the shipped teacher, evaluation on the test split after the epoch).

The old loop is compress/train.py as it was at --old-ref, read from git into a temporary
module; both run in this process, interleaved (old, new, then new, old, ...) so that load
from other processes on the machine falls on both alike. Each run trains a fresh student
for --steps steps (a fraction of an epoch) and ends with the per-epoch evaluation. Prints
per-round seconds and the median ratio new/old, for the whole fit (wall and CPU seconds) and
for the training steps alone (the history row's seconds), and whether both gave the same
losses. On a shared machine use --threads 1: the CPU seconds of one thread barely move with
other processes' load, where oversubscribed OpenMP threads make wall times swing 2x.

    python benchmarks/train_loop.py --rounds 9 --steps 60 --threads 1
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from calib.datasets import FASHION_MNIST_DEFAULT_ROOT, fashion_mnist
from compress.checkpoint import load_into, read_state_dict
from compress.distill.cache import build_or_load
from compress.distill.objectives import CE, ReverseKL
from compress.models import build_model
from compress.train import TrainConfig, TrainEnv, fit

ROOT = Path(__file__).resolve().parents[1]
# main before the rewrite: the last commit whose compress/train.py has the hand-written batches()
OLD_REF = "2a7d85a"
BATCH = 128  # examples/fashion_mnist.yaml data.batch_size


def load_old(ref: str, work: Path):
    src = subprocess.run(["git", "show", f"{ref}:compress/train.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = work / "train_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("train_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_distill(epochs: float) -> TrainConfig:
    kd = dict(weight=0.9, temperature=4.0)
    return TrainConfig(epochs=epochs, optimizer="sgd", lr=0.1, warmup_epochs=0.5, augment=False, cache="full",
                       loss=[ReverseKL(**kd), CE(weight=0.1)])


def one_run(impl: str, old, data, cfg: TrainConfig, env: dict) -> tuple[float, float, float, list]:
    """(fit seconds, its CPU seconds, training-step seconds, per-epoch losses) of one fresh student."""
    torch.manual_seed(0)
    student = build_model("resnet8", 10, 1)
    t0, c0 = time.perf_counter(), time.process_time()
    if impl == "old":
        hist = old.fit(student, data, cfg, **env)
    else:
        hist = fit(student, data, cfg, TrainEnv(**env))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, sum(h["seconds"] for h in hist), [h["loss"] for h in hist]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=FASHION_MNIST_DEFAULT_ROOT)
    ap.add_argument("--teacher", default=str(ROOT / "examples/teachers/fashion_mnist_resnet_teacher.safetensors"))
    ap.add_argument("--old-ref", default=OLD_REF)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run (469 make an epoch)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "train-loop-bench"),
                    help="keeps the teacher-output cache between invocations (building it is the slow part)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.cache_dir)
    work.mkdir(parents=True, exist_ok=True)
    old = load_old(args.old_ref, work)
    data = fashion_mnist(args.data_root)
    teacher = build_model("resnet_teacher", 10, 1)
    load_into(teacher, read_state_dict(Path(args.teacher)), args.teacher)
    cfg = demo_distill(args.steps / (len(data.train) // BATCH))
    env = dict(batch_size=BATCH, teacher=teacher.eval(), teacher_key="bench-teacher", cache_dir=work,
               data_key="fmnist", seed=0, log=lambda s: None, eval_split=data.test, desc="distill")
    # both loops read the same cache file: build it once, outside the timing
    t0 = time.perf_counter()
    build_or_load("full", cfg.cache_k, cfg.kd_temperature(), teacher, "bench-teacher", "fmnist", data, work, 0,
                  torch.device("cpu"), print)
    print(f"teacher-output cache ready in {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps of batch {BATCH} per run")
    return 0 if interleaved(args.rounds, old, data, cfg, env) else 1


def interleaved(rounds: int, old, data, cfg: TrainConfig, env: dict) -> bool:
    """Prints each round and the medians; True when both loops gave the same losses."""
    one_run("new", old, data, cfg, env)  # warm-up (allocator, oneDNN primitive caches)
    one_run("old", old, data, cfg, env)
    ratios, same = {"fit": [], "fit cpu": [], "steps": []}, True
    for r in range(rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        res = {impl: one_run(impl, old, data, cfg, env) for impl in order}
        *o, lo = res["old"]
        *n, ln = res["new"]
        same &= lo == ln
        line = []
        for (name, acc), a, b in zip(ratios.items(), o, n):
            acc.append(b / a)
            line.append(f"{name} old {a:.2f}s new {b:.2f}s ({b / a:.3f})")
        print(f"round {r + 1} ({order[0]} first): " + "; ".join(line), flush=True)
    # with one thread, CPU seconds are the least disturbed by other processes on the machine
    medians = ", ".join(f"{name} {statistics.median(v):.3f}" for name, v in ratios.items())
    print(f"median new/old over {rounds} rounds: {medians}; same losses: {same}")
    return same


if __name__ == "__main__":
    sys.exit(main())
