"""Is a run's int8 deployment faster than its own FP32 model, deployed the same way? (issue 16,
acceptance 1: at least as fast at batch 1, >= 1.5x at batch 64).

At 2 threads on a 2-vCPU VM a ~0.1 ms model's batch-1 time is bimodal between processes (the
demo's pruned FP32 student on ORT: 0.097-0.173 ms in three runs), so one deployment decides
little. Here each trial deploys one artifact in a fresh process the way `compress run` did for
that run's targets (the row's artifact; `shapes: auto` and `latency_threads: auto` as the target
says, chosen again by measurement; the profile settings of the run), FP32 and int8 trials
alternating. Printed per backend: the median and range over trials of the batch-1 p50 and of
items/s at the throughput batch, and FP32 / int8 of the medians (> 1: int8 faster).

    nice -n 5 python benchmarks/int8_vs_fp32.py --run runs/fashion-mnist --trials 5
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SHAPE = (1, 28, 28)


def rows(run: Path, fp32: str, int8: str) -> dict:
    """backend -> {"fp32": row, "int8": row} from the run's report, with each row's target entry."""
    report = json.loads((run / "report.json").read_text())
    targets = {t["backend"]: t for t in json.loads((run / "config.json").read_text())["targets"]}
    out: dict = {}
    for d in report["deployments"]:
        if d["status"] == "ok" and d["stage"] in (fp32, int8):
            out.setdefault(d["backend"], {})["fp32" if d["stage"] == fp32 else "int8"] = {
                **d, "target": targets[d["backend"]]}
    return {b: v for b, v in out.items() if len(v) == 2}


def child(run: Path, row: dict) -> dict:
    """Deploy one row's artifact as its target did and profile it (in this process)."""
    from compress import static_shape
    from targets import base
    from targets.profile import profile
    t, profile_cfg = row["target"], json.loads((run / "config.json").read_text())["profile"]
    target = base.get(t["backend"])
    path = run / row["artifact"]
    source = path if path.suffix == ".onnx" else path.with_suffix(".onnx")
    cfg = base.CompileOptions(threads=t["threads"], device=t["device"], precision=row["precision"],
                              options=target.Options(**t["options"]))
    x = np.random.default_rng(0).standard_normal((64, *SHAPE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        cfg.work_dir = Path(work)
        runner = target.compile(path, cfg)
        if t["shapes"] == "auto":
            runner = static_shape.auto(target, source, runner, cfg, x, (1, profile_cfg["throughput_batch"]),
                                       Path(work), t["backend"])
        if t["latency_threads"] == "auto":
            runner = static_shape.one_thread_at_batch1(target, path, runner, cfg, x)
        p = profile(runner, x, warmup=profile_cfg["warmup"], runs=profile_cfg["runs"],
                    throughput_batch=profile_cfg["throughput_batch"], throughput_runs=profile_cfg["throughput_runs"],
                    vendor_seconds=0)
    return {"p50": p["latency_ms"]["p50"], "items_per_s": p["throughput"]["items_per_s"]}


def trial(run: Path, row: dict) -> dict:
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import int8_vs_fp32 as m; "
            "print(json.dumps(m.child(Path(sys.argv[1]), json.loads(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, str(run), json.dumps(row)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=Path("runs/fashion-mnist"), help="a finished run folder")
    ap.add_argument("--fp32", default="prune", help="the FP32 stage the int8 one was quantized from")
    ap.add_argument("--int8", default="quantize")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--threads", type=int, help="deploy both on this many threads instead of the targets' own "
                    "(e.g. 1 against the default: how each scales, RESULTS.md 'a scaling limit')")
    ap.add_argument("--backend", help="only this backend's rows")
    a = ap.parse_args()
    import os
    print(f"load {os.getloadavg()[0]:.2f}, {a.trials} trials per artifact, a fresh process each, alternating"
          + (f", {a.threads} thread(s)" if a.threads else ""))
    for backend, pair in rows(a.run, a.fp32, a.int8).items():
        if a.backend and backend != a.backend:
            continue
        if a.threads:
            pair = {k: {**r, "target": {**r["target"], "threads": a.threads}} for k, r in pair.items()}
        got: dict = {"fp32": [], "int8": []}
        for i in range(a.trials):
            for k in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):
                got[k].append(trial(a.run, pair[k]))
        med = {k: {m: float(np.median([r[m] for r in v])) for m in ("p50", "items_per_s")} for k, v in got.items()}
        print(f"\n{backend}: {pair['int8']['artifact']} against {pair['fp32']['artifact']}")
        for k, v in got.items():
            p, s = [r["p50"] for r in v], [r["items_per_s"] for r in v]
            print(f"  {k}: b1 p50 {med[k]['p50']:.4f} ms ({min(p):.4f}-{max(p):.4f}), "
                  f"items/s {med[k]['items_per_s']:,.0f} ({min(s):,.0f}-{max(s):,.0f})")
        b1 = med["fp32"]["p50"] / med["int8"]["p50"]
        b64 = med["int8"]["items_per_s"] / med["fp32"]["items_per_s"]
        wins = sum(i["p50"] <= f["p50"] for i, f in zip(got["int8"], got["fp32"]))
        print(f"  FP32/int8: b1 {b1:.2f}x, throughput {b64:.2f}x; int8 at least as fast at b1 in {wins}/{a.trials} "
              f"paired trials")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
