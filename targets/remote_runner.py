"""Runs on the remote device: evaluates and times ONNX artifacts with ONNX Runtime and prints
one JSON object. Needs Python 3.8+, numpy and onnxruntime only: targets/remote.py copies it
beside three project files that need nothing more (compress/evaluate.py, targets/profile.py,
compress/fingerprint.py, as compress_evaluate.py, compress_profile.py, compress_fingerprint.py),
so the device evaluates, profiles and fingerprints with the very code `compress run` uses.

    python remote_runner.py check          -> {"ok", "missing", "versions", "fingerprint"}
    python remote_runner.py measure JOB    -> {"fingerprint", "results": {key: row}}
"""
import json
import os
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def check():
    missing, versions = [], {"python": sys.version.split()[0]}
    for pkg in ("numpy", "onnxruntime"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            missing.append(pkg)
    import compress_fingerprint as fp
    desc = fp.describe()
    return {"ok": not missing, "missing": missing, "versions": versions, "fingerprint": desc, "key": fp.key(desc)}


def _options(job):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, job["graph_optimization"])
    so.intra_op_num_threads = job["threads"] or os.cpu_count() or 1
    so.inter_op_num_threads = job["inter_op_threads"]
    if job["inter_op_threads"] > 1:
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    return so


def executed(job, x):
    """The kernels that ran, from ORT's own profile (no onnx package needed on the device)."""
    import onnxruntime as ort
    so = _options(job)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = ort.InferenceSession(job["artifact"], so, providers=["CPUExecutionProvider"])
    sess.run(None, {sess.get_inputs()[0].name: x[:1]})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    ops = Counter()
    for node in {(e["name"], e["args"]["op_name"]) for e in events
                 if e.get("cat") == "Node" and "op_name" in e.get("args", {})}:
        ops[node[1]] += 1
    int8 = sum(v for k, v in ops.items() if k in job["int8_ops"])
    flt = sum(v for k, v in ops.items() if k in job["float_ops"])
    detail = {k: v for k, v in sorted(ops.items()) if k in set(job["int8_ops"]) | set(job["float_ops"])}
    by = {k: v for k, v in (("int8", int8), ("fp32", flt)) if v}
    summary = ", ".join(f"{k} {v}/{int8 + flt}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
    return {"summary": summary or "no compute layers found", "int8_layers": int8, "compute_layers": int8 + flt,
            "by_precision": by, "detail": detail}


class Runner:
    def __init__(self, job):
        import onnxruntime as ort
        self.session = ort.InferenceSession(job["artifact"], _options(job), providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name
        used = self.session.get_session_options()
        self.info = {"provider": self.session.get_providers()[0], "threads": used.intra_op_num_threads,
                     "version": ort.__version__, "pinning": "os default"}

    def __call__(self, batch):
        import numpy as np
        return self.session.run(None, {self.name: np.ascontiguousarray(batch, np.float32)})[0]


def measure(job_path):
    import compress_evaluate as ev
    import compress_fingerprint as fp
    import compress_profile as prof
    import numpy as np
    start = time.perf_counter()
    with open(job_path) as f:
        spec = json.load(f)
    data = np.load(spec["inputs"])
    refs = np.load(spec["refs"])
    p, results, runners = spec["profile"], {}, {}
    for job in spec["jobs"]:
        x = ev.preprocess(data["images"], job["manifest"])
        t0 = time.perf_counter()
        run = runners[job["key"]] = (Runner(job), x)
        row = ev.compare(ev.logits_of(run[0], x, spec["batch_size"]), data["labels"], refs[job["key"]])
        row.update(prof.profile(run[0], x[:64], warmup=p["warmup"], runs=p["runs"],
                                throughput_batch=p["throughput_batch"], throughput_runs=p["throughput_runs"],
                                max_warmup=p["max_warmup"], settle_tolerance=p["settle_tolerance"]))
        row["executed_precision"] = executed(job, x)
        row["runtime"] = run[0].info
        row["rounds"], row["seconds"] = [], time.perf_counter() - t0
        results[job["key"]] = row
    for key, row in results.items():  # as compress.bench.throughput_runs: each round >= round_s long
        runners[key] += (max(p["throughput_runs"], int(np.ceil(
            spec["throughput_round_s"] * row["throughput"]["items_per_s"] / p["throughput_batch"]))),)
    for _ in range(spec["rounds"]):  # interleaved: every artifact's round r before any round r+1
        for key, (runner, x, runs) in runners.items():
            lat = prof.latency(runner, x[:1], p["warmup"], p["runs"], p["max_warmup"], p["settle_tolerance"])
            thr = prof.throughput(runner, np.concatenate([x[:64]] * -(-p["throughput_batch"] // 64))[
                :p["throughput_batch"]], p["warmup"], runs, max_rounds=1)
            results[key]["rounds"].append({"p50": lat["p50"], "p90": lat["p90"], "items_per_s": thr["items_per_s"]})
    desc = fp.describe()
    return {"fingerprint": desc, "key": fp.key(desc), "results": results, "seconds": time.perf_counter() - start}


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else "check"
    out = check() if cmd == "check" else measure(sys.argv[2])
    sys.stdout.write(json.dumps(out, default=float) + "\n")


if __name__ == "__main__":
    main()
