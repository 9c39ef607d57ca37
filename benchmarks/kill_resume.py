"""Kill a real `compress run` (SIGKILL, every process of it) in the middle of a training stage,
run the same command again, and print what the kill cost: the issue 14 kill/resume table.

Each scenario runs three times on a tiny synthetic config (seconds each): uninterrupted; killed
about half an epoch after the stage's checkpoint of epoch 2 appeared; resumed. Columns:
  checkpoint    the step (of the stage's total) the resumed run started from
  redone        whole epochs trained twice (epoch lines of the killed + resumed logs - epochs)
  discarded     training the kill threw away: seconds from the last checkpoint to the kill
  before        epochs the killed run had finished in the stage: what a stage that reruns whole
                (QAT and torchrun before in-stage checkpoints covered them) would have redone
  total         killed + resumed wall time over the uninterrupted run's (process starts,
                data loading and the stages before are paid twice)
  same weights  the stage's model.safetensors equals the uninterrupted run's, bit for bit

    python benchmarks/kill_resume.py [--only distill,prune,qat,torchrun]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
KD = [{"kind": "kl", "weight": 0.9, "temperature": 2}, {"kind": "ce", "weight": 0.1}]
EPOCHS = 4


def config(out: Path, stages: list) -> dict:
    return {"name": "kr", "seed": 3,
            "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 64,
                     "synthetic": {"train_size": 1024, "test_size": 64, "image_size": 16}},
            "teacher": {"model": "resnet_tiny_teacher", "train": {"epochs": 1, "lr": 0.01}},
            "student": {"model": "resnet_tiny"}, "stages": stages,
            "export": {"stages": []}, "targets": [], "output": {"dir": str(out)}}


DISTILL = {"kind": "distill", "epochs": EPOCHS, "lr": 0.01, "augment": True,
           "loss": [{"kind": "ce", "weight": 0.5}, {"kind": "taid", "weight": 0.5}]}
# name: (stages, the killed stage's folder, its epoch lines' prefix, processes)
SCENARIOS = {
    "distill": ([DISTILL], "01-distill", "distill", 1),
    "prune": ([{**DISTILL, "epochs": 1}, {"kind": "prune", "ratio": 0.3, "round_to": 4, "epochs": EPOCHS,
                                          "lr": 0.005, "loss": KD}], "02-prune", "prune", 1),
    "qat": ([{**DISTILL, "epochs": 1}, {"kind": "quantize", "calib_batches": 2, "epochs": EPOCHS, "lr": 0.0005,
                                        "loss": KD, "augment": True}], "02-quantize", "qat", 1),
    "torchrun": ([DISTILL], "01-distill", "distill", 2),
}
WHERE = {"distill": "distill, mid-epoch", "prune": "prune recovery, mid-epoch", "qat": "QAT, mid-epoch",
         "torchrun": "distill, 2 processes (torchrun), mid-epoch"}


def start(cfg: Path, log: Path, nproc: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "cli.py"), "run", str(cfg), *(["--nproc", str(nproc)] if nproc > 1 else [])]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (torchrun's workers run in sessions of their own)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *descendants(k)]
    return out


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL to the run and everything it started, at once (a power cut, an OOM kill)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def checkpoint_epoch(resume: Path) -> tuple[int, float]:
    """(epochs the stage's newest checkpoint holds, its mtime) or (0, 0)."""
    files = sorted(resume.glob("fit-*.pt"), key=lambda p: p.stat().st_mtime) if resume.is_dir() else []
    if not files:
        return 0, 0.0
    try:
        ck = torch.load(files[-1], map_location="cpu", weights_only=True)
    except Exception:  # being replaced right now: read it on the next poll
        return 0, 0.0
    return ck["epoch"], files[-1].stat().st_mtime


def epoch_lines(log: Path, desc: str) -> int:
    return len(re.findall(rf"^  {desc} epoch \d+:", log.read_text(), re.M))


def timed_run(cfg: Path, log: Path, nproc: int) -> float:
    t0 = time.time()
    proc = start(cfg, log, nproc)
    assert proc.wait() == 0, log.read_text()[-2000:]
    return time.time() - t0


def scenario(name: str, tmp: Path) -> dict:
    stages, folder, desc, nproc = SCENARIOS[name]
    runs = {}
    for run in ("whole", "cut"):
        (tmp / run).mkdir(parents=True)
        (tmp / run / "c.yaml").write_text(yaml.safe_dump(config(tmp / run, stages)))
        runs[run] = tmp / run / "c.yaml"
    whole_s = timed_run(runs["whole"], tmp / "whole.log", nproc)
    rows = yaml.safe_load((tmp / "whole" / "kr" / folder / "metrics.json").read_text())["history"]
    epoch_s = sum(r["seconds"] for r in rows) / len(rows)
    t0, proc = time.time(), start(runs["cut"], tmp / "cut.log", nproc)
    resume = tmp / "cut" / "kr" / folder / ".resume"
    while checkpoint_epoch(resume)[0] < 2:
        assert proc.poll() is None, (tmp / "cut.log").read_text()[-2000:]
        time.sleep(0.02)
    time.sleep(epoch_s / 2)
    kill_time = time.time()
    kill_all(proc)
    cut_s = kill_time - t0
    held, ck_mtime = checkpoint_epoch(resume)
    ck = torch.load(sorted(resume.glob("fit-*.pt"), key=lambda p: p.stat().st_mtime)[-1], weights_only=True)
    resumed_s = timed_run(runs["cut"], tmp / "resumed.log", nproc)
    killed, again = epoch_lines(tmp / "cut.log", desc), epoch_lines(tmp / "resumed.log", desc)
    a, b = (load_file(str(tmp / r / "kr" / folder / "model.safetensors")) for r in ("whole", "cut"))
    return {"where": WHERE[name], "checkpoint": f"{ck['step']}/{ck['total']}", "epochs": len(rows),
            "redone": killed + again - len(rows), "discarded": kill_time - ck_mtime, "before": killed,
            "resumed": "resuming at step" in (tmp / "resumed.log").read_text(),
            "whole": whole_s, "total": cut_s + resumed_s, "same": a.keys() == b.keys() and all(
                torch.equal(a[k], b[k]) for k in a), "epoch_s": epoch_s, "held": held}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(SCENARIOS))
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("| killed in | checkpoint (step) | whole epochs redone | discarded (s since checkpoint) | "
          "stage rerun whole would redo | total vs uninterrupted | same weights |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only.split(","):
        tmp = Path(tempfile.mkdtemp(prefix=f"kr-{name}-"))
        try:
            r = scenario(name, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        assert r["resumed"], f"{name}: the second run did not resume inside the stage"
        print(f"| {r['where']} | {r['checkpoint']} | {r['redone']} of {r['epochs']} | {r['discarded']:.1f} "
              f"(an epoch: {r['epoch_s']:.1f}) | {r['before']} epochs + the partial one | "
              f"{r['total']:.1f} s vs {r['whole']:.1f} s ({r['total'] / r['whole']:.2f}x) | "
              f"{'yes' if r['same'] else 'NO'} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
