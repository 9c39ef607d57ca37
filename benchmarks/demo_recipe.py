"""The demo recipe search (issue 15, item 4): candidate recipes for examples/fashion_mnist.yaml.

Each candidate is the demo's config with some keys changed. The script writes one YAML per
candidate under OUT/configs/, runs `python cli.py run` on it (one at a time), and prints one
table: the int8 student's OpenVINO accuracy, batch-1 p50 and file size beside the FP32 teacher's
on the same backend, measured in the same run (the run's report.json).

Stages are reused across candidates: `compress run` skips a stage whose settings (and every
earlier stage's) are unchanged, so a candidate that names `reuse` starts from a copy of that
candidate's run folder and pays only for the stages it changes.

    nice -n 5 python benchmarks/demo_recipe.py --out /work/recipe_runs [--only NAME ...]

The configs keep `teachers/...` relative (a link to examples/teachers sits beside them), so the
teacher's hash, and with it every reused stage, matches a run of examples/fashion_mnist.yaml.

On a GPU machine, `--backend onnxruntime --live-teacher` (the teacher-output cache fails on CUDA
today) runs the same candidates for their torch accuracy; launch one process per candidate to
run them side by side. `--latency A.xml B.xml ...` times finished OpenVINO IRs interleaved (ratios
to the first), `--precision` times a bf16 against an fp32 training step of the student.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KD = [{"kind": "reverse_kl", "weight": 0.9, "temperature": 4}, {"kind": "ce", "weight": 0.1}]

# The demo before this search (0.9314-0.9325 OpenVINO int8): every candidate is a change of it.
BASE = {
    "name": "fashion-mnist", "seed": 0,
    "data": {"dataset": "fashion_mnist", "root": "/usr/share/datasets/fashion-mnist", "batch_size": 128,
             "calib_samples": 1024},
    "teacher": {"model": "resnet_teacher", "checkpoint": "teachers/fashion_mnist_resnet_teacher.safetensors"},
    "student": {"model": "resnet8"},
    "stages": [
        {"kind": "distill", "epochs": 20, "optimizer": "sgd", "lr": 0.1, "warmup_epochs": 0.5, "augment": False,
         "cache": "full", "loss": KD},
        {"kind": "prune", "ratio": 0.25, "steps": 2, "round_to": 8, "epochs": 4, "optimizer": "sgd", "lr": 0.02,
         "augment": False, "cache": "full", "loss": KD},
        {"kind": "quantize", "calib_batches": 8, "epochs": 1, "optimizer": "adamw", "lr": 1.0e-4, "augment": False,
         "cache": "full", "loss": KD},
    ],
    # OpenVINO only: the goal is stated on it; ORT and TensorRT rows cost time, not information
    "targets": [{"backend": "openvino"}],
    "export": {"stages": ["teacher", "quantize"]},
}


def _distill(**kw) -> dict:
    return {**BASE["stages"][0], **kw}


def _prune(**kw) -> dict:
    return {**BASE["stages"][1], **kw}


def _quant(**kw) -> dict:
    return {**BASE["stages"][2], **kw}


# name -> (changes to BASE, candidate whose run folder is copied first, what it tries)
CANDIDATES: dict[str, tuple[dict, str | None, str]] = {
    "base": ({}, None, "the demo before the search (distill 20, prune 0.25, QAT 1)"),
    "d20_q2": ({"stages": [_distill(), _quant(epochs=2)]}, None, "no pruning: ResNet-8 distilled 20 epochs, QAT 2"),
    "d40_q2": ({"stages": [_distill(epochs=40), _quant(epochs=2)]}, None,
               "no pruning: ResNet-8 distilled 40 epochs, QAT 2 epochs"),
    "d60_q2": ({"stages": [_distill(epochs=60), _quant(epochs=2)]}, None, "no pruning, distilled 60 epochs, QAT 2"),
    "d40_p25_q2": ({"stages": [_distill(epochs=40), _prune(), _quant(epochs=2)]}, "d40_q2",
                   "distill 40, the old prune (0.25, 2 steps, 4 epochs), QAT 2"),
    "d40_aug_q2": ({"stages": [_distill(epochs=40, augment=True, cache="none"), _quant(epochs=2)]}, None,
                   "distill 40 with augmentation (live teacher), QAT 2"),
    "d40_dkd_q2": ({"stages": [_distill(epochs=40, loss=[{"kind": "dkd", "weight": 1.0, "temperature": 4},
                                                        {"kind": "ce", "weight": 1.0}]), _quant(epochs=2)]}, None,
                   "distill 40 with DKD + CE, QAT 2"),
    "wide_d40_p40_q2": ({"student": {"model": "resnet8_wide"},
                         "stages": [_distill(epochs=40), _prune(ratio=0.4, steps=3, epochs=6), _quant(epochs=2)]},
                        None, "ResNet-8-wide (308k) distilled 40, pruned 0.4 (3 steps, 6 epochs), QAT 2"),
    "d40_q2_s1": ({"seed": 1, "stages": [_distill(epochs=40), _quant(epochs=2)]}, None, "d40_q2 at seed 1"),
    # size and speed only (accuracy meaningless: 1 epoch on 4,096 images, PTQ): the unpruned int8
    # ResNet-8's OpenVINO file and batch-1 latency against the FP32 teacher's, cheaply
    "shape_noprune": ({"data": {**BASE["data"], "limit_train": 4096, "limit_test": 1000},
                       "stages": [_distill(epochs=1), _quant(epochs=0)]}, None,
                      "size/latency probe: unpruned ResNet-8 int8 (1 epoch on 4k images, PTQ)"),
}


def config_for(name: str, out: Path, backend: str = "openvino", live: bool = False) -> dict:
    changes = CANDIDATES[name][0]
    cfg = copy.deepcopy(BASE)
    for k, v in changes.items():
        cfg[k] = copy.deepcopy(v)
    cfg["name"] = name
    cfg["output"] = {"dir": str(out)}
    cfg["targets"] = [{"backend": backend}]
    if live:  # the teacher runs live in every stage: same targets as `cache: full` up to its fp16 rounding
        for st in cfg["stages"]:
            st["cache"] = "none"
    return cfg


def _seed_run_dir(name: str, out: Path) -> None:
    """Start `name` from a copy of the run folder it reuses (finished stages with equal settings are kept)."""
    src = CANDIDATES[name][1]
    dst = out / name
    if src is None or dst.exists() or not (out / src).exists():
        return
    shutil.copytree(out / src, dst, symlinks=True)
    for stale in ("report.json", "report.md"):
        (dst / stale).unlink(missing_ok=True)


def run(name: str, out: Path, data_root: str, backend: str = "openvino", live: bool = False) -> float:
    cdir = out / "configs"
    cdir.mkdir(parents=True, exist_ok=True)
    link = cdir / "teachers"
    try:  # several candidates may start at once
        link.symlink_to(ROOT / "examples" / "teachers")
    except FileExistsError:
        pass
    path = cdir / f"{name}.yaml"
    cfg = config_for(name, out, backend, live)
    cfg["data"]["root"] = data_root
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _seed_run_dir(name, out)
    t0 = time.time()
    with open(out / f"{name}.log", "a") as log:
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", str(path)], cwd=ROOT, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def row(name: str, out: Path, backend: str = "openvino") -> str | None:
    rep = out / name / "report.json"
    if not rep.exists():
        return None
    r = json.loads(rep.read_text())
    ov = {d["stage"]: d for d in r["deployments"] if d["backend"] == backend and d["status"] == "ok"}
    last = r["stages"][-1]["name"]
    t, s = ov["teacher"], ov[last]
    torch_acc = {st["name"]: st["accuracy"] for st in r["stages"]}
    secs = sum(st.get("seconds", 0) for st in r["stages"][1:])
    tl, sl = t["latency_ms"]["p50"], s["latency_ms"]["p50"]
    return (f"| {name} | {CANDIDATES[name][2]} | {torch_acc.get('distill', float('nan')):.4f} | "
            f"{s['accuracy']:.4f} | {s['accuracy'] - t['accuracy']:+.4f} | {sl:.3f} | {tl / sl:.1f}x | "
            f"{s['size_bytes']:,} | {t['size_bytes'] / s['size_bytes']:.1f}x | {s['executed_precision']['summary']} "
            f"| {secs:.0f} |")


def interleaved_latency(paths: list[Path], rounds: int, runs: int, threads: int) -> list[float]:
    """OpenVINO batch-1 p50 (ms) of each IR, the median over `rounds` interleaved rounds: on a
    shared machine load drifts between two sequential measurements, and interleaving cancels it."""
    import numpy as np

    from targets.base import CompileOptions
    from targets.openvino import OvRunner
    from targets.profile import latency
    runners = [OvRunner(p, CompileOptions(threads=threads)) for p in paths]
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    p50 = [[latency(r, x, warmup=20, runs=runs)["p50"] for r in runners] for _ in range(rounds)]
    return [float(v) for v in np.median(np.array(p50), axis=0)]


def precision_step_cpu(rounds: int, steps: int) -> dict[str, float]:
    """CPU seconds per training step of the demo student (ResNet-8, batch 128, SGD, NHWC), bf16
    autocast against fp32, interleaved, one thread: CPU time barely moves with other processes'
    load where wall time swings (benchmarks/train_loop.py)."""
    import numpy as np
    import torch

    from compress.models import resnet8
    torch.set_num_threads(1)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    res: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for _ in range(rounds):
        for mode in res:
            torch.manual_seed(0)
            model = resnet8().to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            for i in range(steps + 2):  # two warm-up steps
                if i == 2:
                    t0 = time.process_time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            res[mode].append((time.process_time() - t0) / steps)
    return {k: float(np.median(v)) for k, v in res.items()}


HEADER = ("| candidate | what it tries | distill acc (torch) | OV int8 acc | vs teacher | OV b1 p50 ms | faster "
          "| OV size (bytes) | smaller | executed | stage s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/work/recipe_runs")
    ap.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--only", nargs="*", help="candidates to run (default: all); finished ones are reused")
    ap.add_argument("--table", action="store_true", help="print the table from finished runs, run nothing")
    ap.add_argument("--backend", default="openvino", help="the one target measured (the goal is on openvino)")
    ap.add_argument("--live-teacher", action="store_true",
                    help="cache: none in every stage (on a GPU: the teacher-output cache fails there today)")
    ap.add_argument("--latency", nargs="+", type=Path, metavar="XML",
                    help="time these OpenVINO IRs interleaved (the first is the reference), run nothing else")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="--latency: OpenVINO inference threads")
    ap.add_argument("--precision", action="store_true", help="time a training step in bf16 and fp32, run nothing else")
    a = ap.parse_args()
    out = Path(a.out)
    if a.precision:
        load = os.getloadavg()[0]
        t = precision_step_cpu(a.rounds, 20)
        print(f"ResNet-8 training step, batch 128, 1 thread, CPU s/step (median of {a.rounds} interleaved rounds), "
              f"load {load:.1f}: bf16 {t['bf16']:.4f}, fp32 {t['fp32']:.4f}, fp32/bf16 {t['fp32'] / t['bf16']:.2f}x")
        return
    if a.latency:
        load = os.getloadavg()[0]
        ms = interleaved_latency(a.latency, a.rounds, 200, a.threads)
        print(f"OpenVINO b1 p50, {a.threads} thread(s), median of {a.rounds} interleaved rounds of 200 runs, "
              f"load {load:.1f}")
        for p, v in zip(a.latency, ms):
            size = p.stat().st_size + p.with_suffix(".bin").stat().st_size
            print(f"| {p} | {v:.3f} ms | {ms[0] / v:.1f}x | {size:,} |")
        return
    if not a.table:
        for name in a.only or CANDIDATES:
            load = os.getloadavg()
            secs = run(name, out, a.data_root, a.backend, a.live_teacher)
            print(f"{name}: {secs:.0f} s wall, load {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end",
                  flush=True)
    print(HEADER)
    for name in CANDIDATES:
        line = row(name, out, a.backend)
        if line:
            print(line)


if __name__ == "__main__":
    main()
