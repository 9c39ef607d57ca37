"""The teacher's int8 export near the machine's int8 limit (issue 16): OpenVINO THROUGHPUT
settings chosen by measurement, and ONNX Runtime session options on the same file.

1. The OpenVINO target's own search (targets/ov_throughput.py: streams x requests x request
   batch, two interleaved rounds) on the int8 teacher, its table in GMAC/s and as a fraction
   of the int8 limit compress/hardware.py reads from this machine.
2. Interleaved rounds of: OpenVINO at the chosen setting, and ONNX Runtime at batch 64 with each
   session-option variant; GMAC/s, fraction of the limit, and ORT / OpenVINO per round. On a
   shared machine the wall-clock rate measures our share of the cores as much as the kernels,
   so each run's CPU time (getrusage, all threads) is read too: GMAC per CPU-second against one
   core's limit is the efficiency while on a core (spin-waiting counts as CPU time, so it errs low).

    nice -n 5 python benchmarks/throughput_limit.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.profiler_vs_vendor import teacher_int8  # noqa: E402
from compress.hardware import describe  # noqa: E402
from targets import base  # noqa: E402

TEACHER_MACS = 165_511_850  # resnet_teacher at 1x28x28 (torch-pruning's op counter, float model)
BATCH = 64


def ort_variants(threads: int) -> dict:
    """name -> (session config entries and options, Python threads calling run() at once)."""
    return {
        "ORT target default (intra 2, ORT_ENABLE_ALL, sequential, spinning on)": ({}, 1),
        "intra_op.allow_spinning 0": ({"session.intra_op.allow_spinning": "0"}, 1),
        "graph optimization extended": ({"level": "ORT_ENABLE_EXTENDED"}, 1),
        "execution mode parallel (inter 2)": ({"parallel": True}, 1),
        f"intra 1 x {threads} concurrent run() (streams-like)": ({"intra": 1}, threads),
        f"intra 1 x {threads} concurrent run(), spinning 0": ({"intra": 1, "session.intra_op.allow_spinning": "0"},
                                                             threads),
    }


def ort_session(onnx_path: Path, threads: int, opts: dict):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opts.get("level", "ORT_ENABLE_ALL"))
    so.intra_op_num_threads = opts.get("intra", threads)
    if opts.get("parallel"):
        so.execution_mode, so.inter_op_num_threads = ort.ExecutionMode.ORT_PARALLEL, 2
    for k, v in opts.items():
        if k.startswith("session."):
            so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def ort_rate(sess, x: np.ndarray, callers: int, n: int) -> float:
    """items/s of n batches, split over `callers` Python threads calling run() on one session."""
    feed = {sess.get_inputs()[0].name: x}
    share = [n // callers + (i < n % callers) for i in range(callers)]
    with ThreadPoolExecutor(callers) as pool:
        t = time.perf_counter()
        list(pool.map(lambda k: [sess.run(None, feed) for _ in range(k)], share))
        return n * len(x) / (time.perf_counter() - t)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def gmac(items_per_s: float) -> float:
    return items_per_s * TEACHER_MACS / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-int8", type=Path, default=Path(tempfile.gettempdir()) / "compress-teacher-int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches-per-run", type=int, default=8)
    a = ap.parse_args()
    xml = teacher_int8(a.teacher_int8)
    hw = describe()
    limit = hw["int8_limit_gmac_s"] * min(a.threads, hw["cores"]) / hw["cores"] if hw["int8_limit_gmac_s"] else None
    frac = (lambda g: f"{g / limit:.0%}") if limit else (lambda g: "unknown")
    print(json.dumps(hw, indent=1))
    x = np.random.default_rng(0).standard_normal((BATCH, 1, 28, 28)).astype(np.float32)
    ov = base.get("openvino").compile(xml, base.CompileOptions(threads=a.threads, work_dir=xml.parent))
    t0 = time.time()
    found = ov.run_many([x])
    print(f"\n## OpenVINO THROUGHPUT search on the int8 teacher ({a.threads} threads, batch {BATCH}, "
          f"{time.time() - t0:.0f} s; hint's choice {found['hint_choice']})\n")
    print("| streams | infer requests | request batch | items/s | GMAC/s | of int8 limit |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in sorted(found["search"], key=lambda r: -r["items_per_s"]):
        print(f"| {row['streams']} | {row['infer_requests']} | {row['request_batch']} | {row['items_per_s']:,.0f} | "
              f"{gmac(row['items_per_s']):.1f} | {frac(gmac(row['items_per_s']))} |")
    variants = ort_variants(a.threads)
    sessions = {k: (ort_session(xml.with_suffix(".onnx"), a.threads, o), c) for k, (o, c) in variants.items()}
    ort_target = base.get("onnxruntime").compile(xml.with_suffix(".onnx"),
                                                 base.CompileOptions(threads=a.threads, work_dir=xml.parent))
    print(f"\nORT target's search: {json.dumps(ort_target.run_many([x]))}")
    rates: dict = {"OpenVINO (chosen setting)": [], "ORT target (chosen setting)": [], **{k: [] for k in variants}}
    per_cpu: dict = {k: [] for k in rates}  # items per CPU-second
    n = a.batches_per_run
    for r in range(a.rounds):
        order = list(rates) if r % 2 == 0 else list(rates)[::-1]
        for k in order:
            if k.endswith("(chosen setting)"):
                runner = ov if k.startswith("OpenVINO") else ort_target
                runner.run_many([x] * a.threads)  # warm
                c, t = cpu_s(), time.perf_counter()
                runner.run_many([x] * n)
                rates[k].append(n * BATCH / (time.perf_counter() - t))
            else:
                sess, callers = sessions[k]
                ort_rate(sess, x, callers, callers)  # warm
                c = cpu_s()
                rates[k].append(ort_rate(sess, x, callers, n))
            per_cpu[k].append(n * BATCH / (cpu_s() - c))
        print(f"round {r}: " + json.dumps({k: round(v[-1]) for k, v in rates.items()}), file=sys.stderr)
    ovr = rates["OpenVINO (chosen setting)"]
    print(f"\n## int8 teacher at batch {BATCH}, {a.rounds} interleaved rounds of {n} batches each\n")
    core = (lambda g: f"{g / (limit / min(a.threads, hw['cores'])):.0%}") if limit else (lambda g: "unknown")
    print("| runtime / session options | items/s | GMAC/s | of int8 limit | / OpenVINO (median, min..max) "
          "| GMAC per CPU-second | of one core's limit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, v in rates.items():
        ratio = [o / b for o, b in zip(v, ovr)]
        med, cpu = statistics.median(v), gmac(statistics.median(per_cpu[k]))
        print(f"| {k} | {med:,.0f} | {gmac(med):.1f} | {frac(gmac(med))} | "
              f"{statistics.median(ratio):.2f} ({min(ratio):.2f}..{max(ratio):.2f}) | {cpu:.1f} | {core(cpu)} |")
    print(f"\nint8 limit: {hw['int8_macs_per_cycle_per_core']} MAC/cycle/core x {hw['clock_ghz']} GHz "
          f"({hw['clock_source']}) x {min(a.threads, hw['cores'])} cores = {limit} GMAC/s; rule: {hw['units_rule']}")


if __name__ == "__main__":
    main()
