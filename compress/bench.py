"""`compress bench`: every exported artifact of a run measured on every configured target
with the harness `compress run` uses (compress.deploy.deploy_one: accuracy on the runtime,
agreement, parity, executed precision, profile), then k interleaved latency rounds for the
regression gate (compress/bench_gate.py); results keyed by device (compress/fingerprint.py).

A run directory is benchmarked from the config it was made with (`config.json` beside its
report; a config file works too): the pipeline's resume finds every stage finished and
rebuilds the models from their safetensors, so nothing trains."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from compress import fingerprint
from compress.bench_config import load_source, save_config
from compress.errors import UserError


def _metrics(row: dict, rounds: list[dict]) -> dict:
    """A measured row as the gate reads it: {metric: {value, rounds?}}."""
    out = {"accuracy": {"value": row["accuracy"]}, "agreement": {"value": row["agreement"]},
           "size_bytes": {"value": row.get("size_bytes")}}
    for name, key in (("latency_p50_ms", "p50"), ("latency_p90_ms", "p90"), ("throughput", "items_per_s")):
        vals = [r[key] for r in rounds]
        if vals:
            out[name] = {"value": float(np.median(vals)), "rounds": vals}
    return out


def add_relative(cases: dict, teacher: str) -> None:
    """Each case's timings per round divided by the teacher's on the same backend in the same
    round (bench_gate: what cancels the load of other tenants)."""
    from compress.bench_gate import ABSOLUTE, RELATIVE
    for key, c in cases.items():
        ref = cases.get(f"{teacher}/{c['backend']}")
        if c["stage"] == teacher or ref is None:
            continue
        for name, rel in zip(ABSOLUTE, RELATIVE):
            a, t = c["metrics"].get(name), ref["metrics"].get(name)
            if a and t and len(a["rounds"]) == len(t["rounds"]):
                ratios = [x / y for x, y in zip(a["rounds"], t["rounds"])]
                c["metrics"][rel] = {"value": float(np.median(ratios)), "rounds": ratios}


def case(row: dict, rounds: list[dict], device: str) -> dict:
    keep = ("stage", "backend", "precision", "status", "reason", "artifact")
    out = {k: row.get(k) for k in keep}
    out.update(device=device, executed_precision=(row.get("executed_precision") or {}).get("summary"),
               metrics=_metrics(row, rounds) if row.get("accuracy") is not None else {})
    return out


# Each round's throughput runs at least this long: a small model's 30 batches take a few ms,
# where one preemption by another tenant moved items/s by 3x between benches (measured).
THROUGHPUT_ROUND_S = 0.2


def throughput_runs(configured: int, batch: int, items_per_s: float) -> int:
    """The configured runs, or more where they would finish under THROUGHPUT_ROUND_S."""
    return max(configured, int(np.ceil(THROUGHPUT_ROUND_S * items_per_s / batch)))


class LocalRounds:
    """Compiled runners timed round-robin: each round times every artifact once."""

    def __init__(self, profile):
        self.p, self.runners = profile, {}

    def add(self, key: str, runner, x: np.ndarray, items_per_s: float) -> None:
        self.runners[key] = (runner, x, throughput_runs(self.p.throughput_runs, self.p.throughput_batch, items_per_s))

    def run(self, k: int) -> dict[str, list[dict]]:
        from targets.profile import latency, throughput
        p, out = self.p, {key: [] for key in self.runners}
        for _ in range(k):
            for key, (runner, x, runs) in self.runners.items():
                lat = latency(runner, x[:1], p.warmup, p.runs, p.max_warmup, p.settle_tolerance)
                big = np.concatenate([x[:64]] * -(-p.throughput_batch // 64))[:p.throughput_batch]
                thr = throughput(runner, big, p.warmup, runs, max_rounds=1)  # rounds are ours, interleaved
                out[key].append({"p50": lat["p50"], "p90": lat["p90"], "items_per_s": thr["items_per_s"]})
        return out


def _remote_job(key: str, stage, manifest: dict, entry) -> dict:
    from targets.base import FLOAT_ORT_COMPUTE, INT8_ORT_OPS
    from targets.onnxruntime import LEVELS
    opts = entry.options
    return {"key": key, "artifact": stage.dir / manifest["files"]["onnx"], "manifest": {"input": manifest["input"]},
            "threads": entry.threads, "graph_optimization": LEVELS[opts.graph_optimization],
            "inter_op_threads": opts.inter_op_threads, "int8_ops": sorted(INT8_ORT_OPS),
            "float_ops": sorted(FLOAT_ORT_COMPUTE), "stage": stage.name, "precision": manifest["precision"],
            "size_bytes": (stage.dir / manifest["files"]["onnx"]).stat().st_size}


def remote_rows(dev, jobs: list[dict], images, labels, refs: dict, plan, rounds: int) -> list[tuple]:
    """(row, rounds, device key) per job, measured on the device; parity as deploy applies it."""
    from dataclasses import asdict

    from compress.deploy import parity_failures
    res = dev.measure(jobs, images, labels, refs, asdict(plan.profile), rounds, plan.data.batch_size,
                      THROUGHPUT_ROUND_S)
    out = []
    for job in jobs:
        r = res["results"][job["key"]]
        row = {"stage": job["stage"], "backend": job["backend"], "precision": job["precision"], "status": "ok",
               "reason": None, "artifact": str(job["artifact"]), "size_bytes": job["size_bytes"], **r,
               "host": str(dev.url)}
        fails = parity_failures(row, float((refs[job["key"]].argmax(1) == labels).mean()), job["parity"])
        if fails:
            row.update(status="failed", reason="parity: " + "; ".join(fails))
        out.append((row, r["rounds"], res["key"]))
    return out


def _remotes(cfg, log) -> dict:
    """targets[] index -> RemoteDevice, each checked (reachable, key, runtime) before any work."""
    from targets.remote import RemoteDevice
    remotes = {}
    try:
        for i, t in enumerate(cfg.targets):
            if t.host:
                dev = remotes[i] = RemoteDevice(t.host, t.python, t.identity_file, t.known_hosts, f"targets.{i}")
                info = dev.check()
                log(f"remote {dev.url}: {info['fingerprint']['cpu']}, onnxruntime {info['versions']['onnxruntime']}")
    except Exception:
        for dev in remotes.values():
            dev.close()
        raise
    return remotes


def _deploy_local(plan, stage, manifest, spec, x, labels, ref, local: LocalRounds) -> tuple[str, dict]:
    """deploy_one (the run's harness) and, when it measured, the runner for the rounds."""
    from compress.deploy import deploy_one
    from targets import base
    key = f"{stage.name}/{spec.backend}"
    # the model: a row failing parity is judged as `compress run` judges it (a runtime's fused residual
    # adds, compress/runtime_arith.py) and explained layer by layer
    row = deploy_one(plan, stage.name, stage.dir, manifest, spec, x, labels, ref, model=stage.model)
    if row["latency_ms"] is not None:  # measured; a failed parity/int8 gate still gets its rounds
        opts = base.CompileOptions(threads=spec.threads, device=spec.device, precision=manifest["precision"],
                                   work_dir=stage.dir, options=spec.options,
                                   sparse_weights=bool(manifest.get("sparsity")))
        local.add(key, base.get(spec.backend).compile(plan.run.run_dir / row["artifact"], opts), x,
                  row["throughput"]["items_per_s"])
    return key, row


def _collect(cfg, plan, data, remotes: dict, local: LocalRounds):
    """Local rows measured now; remote jobs (with their torch reference logits) gathered."""
    from compress.deploy import export_stage
    from compress.evaluate import preprocess
    from compress.train import predict
    images, labels = data.test.images.numpy(), data.test.labels.numpy()
    cases, jobs, refs = [], {i: [] for i in remotes}, {}
    for stage in plan.stages:
        manifest = export_stage(plan, stage)
        x, ref = preprocess(images, manifest), predict(stage.model, data.test, data, plan.data.batch_size)
        for i, spec in enumerate(plan.targets):
            if i in remotes:
                key = f"{stage.name}/{spec.backend}#{i}"
                refs[key] = ref
                jobs[i].append({**_remote_job(key, stage, manifest, cfg.targets[i]), "backend": spec.backend,
                                "parity": spec.parity})
            else:
                cases.append(_deploy_local(plan, stage, manifest, spec, x, labels, ref, local))
    return cases, jobs, refs


def measure_run(cfg, rounds: int, device: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Every artifact x target of the run, k interleaved rounds; -> the bench result."""
    from compress.pipeline import Pipeline
    from compress.plan import deployment_plan
    pipe = Pipeline(cfg, log)
    remotes = _remotes(cfg, log)  # early: before any model is rebuilt or measured
    try:
        rows, models, ctx = pipe.run_stages()
        save_config(cfg, pipe.run_dir)
        plan = deployment_plan(cfg, rows, models, ctx.data, pipe.run_dir, log)
        local = LocalRounds(plan.profile)
        cases, jobs, refs = _collect(cfg, plan, ctx.data, remotes, local)
        t0 = time.perf_counter()
        timed = local.run(rounds)
        log(f"{rounds} interleaved rounds over {len(timed)} local artifacts ({time.perf_counter() - t0:.1f}s)")
        here = device or fingerprint.key(fingerprint.describe())
        out = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": cfg.name,
               "rounds": rounds, "teacher_accuracy": rows[0]["accuracy"] if rows else None,
               "devices": {here: {"fingerprint": fingerprint.describe(), "cases": {
                   key: case(row, timed.get(key, []), here) for key, row in cases}}}}
        teacher = rows[0]["name"] if rows else "teacher"
        add_relative(out["devices"][here]["cases"], teacher)
        labels = ctx.data.test.labels.numpy()
        for i, dev in remotes.items():
            measured = remote_rows(dev, jobs[i], ctx.data.test.images.numpy(), labels,
                                   {j["key"]: refs[j["key"]] for j in jobs[i]}, plan, rounds)
            for row, rr, key in measured:
                key = f"{key}-ssh" if key == here else key  # loopback: the same machine, reached another way
                entry = out["devices"].setdefault(key, {"fingerprint": dev.info["fingerprint"], "cases": {},
                                                        "host": str(dev.url)})
                entry["cases"][f"{row['stage']}/{row['backend']}"] = {**case(row, rr, key), "host": str(dev.url)}
            add_relative(out["devices"][key]["cases"], teacher)
            out.setdefault("remote_overhead_s", {})[str(dev.url)] = {
                **{k: round(v, 3) for k, v in dev.overhead.items()}, "on_device": round(dev.device_seconds, 3)}
        return out
    finally:
        for dev in remotes.values():
            dev.close()


def gate(result: dict, baseline: Optional[Path], history: Optional[Path], window: int, floor: float,
         tolerances: Optional[dict] = None, which: str = "relative"):
    """-> (findings, where the comparison came from)."""
    from compress.bench_baseline import judge, read_baseline, read_history
    base = read_baseline(baseline)
    hist = {dev: read_history(history, dev, window) for dev in result["devices"]}
    source = (f"history {history} (last {window} per device)" if any(hist.values()) else
              f"baseline {baseline}" if baseline and any(d in base["devices"] for d in result["devices"]) else
              "no baseline for this device (accuracy floor only)")
    return judge(result, base, hist, floor, tolerances, which), source


def bench(source: Path, *, device: Optional[str] = None, baseline: Optional[Path] = None,
          history: Optional[Path] = None, window: int = 5, rounds: int = 5, update_baseline: bool = False,
          floor: float = 0.99, tolerances: Optional[dict] = None, json_out: Optional[Path] = None,
          junit: Optional[Path] = None, summary: Optional[Path] = None, overrides: Optional[list[str]] = None,
          which: str = "relative", log: Callable[[str], None] = print) -> int:
    """The `compress bench` command -> its exit code (compress.bench_baseline: OK, REGRESSION, UNMEASURED)."""
    from compress import bench_output as out
    from compress.bench_baseline import OK, UNMEASURED, append_history, exit_code
    from compress.bench_baseline import update_baseline as write_base
    from compress.bench_gate import GATES
    from compress.checkpoint import write_json
    if which not in GATES:
        raise UserError(f"--gate {which!r}: expected one of {', '.join(GATES)}")
    if rounds < 4:  # Moses' 95% interval needs k >= 4 (bench_gate): fewer could never flag anything
        raise UserError(f"--rounds {rounds}: at least 4 rounds are needed for a 95% interval")
    cfg = load_source(Path(source), overrides or [])
    result = measure_run(cfg, rounds, device, log)
    findings, where = gate(result, baseline, history, window, floor, tolerances, which)
    write_json(Path(cfg.output.dir) / cfg.name / "bench.json", result)
    for line in out.console(findings, where):
        log(line)
    if json_out:
        log(f"github-action-benchmark JSON: {', '.join(map(str, out.write_github(json_out, result)))}")
    if junit:
        out.write_junit(junit, findings)
    if summary:
        summary.write_text(out.summary_markdown(result, findings, where))
    code = exit_code(findings)
    if history:
        append_history(history, result)
    if update_baseline:
        if not baseline:
            raise UserError("--update-baseline: needs --baseline FILE")
        log(f"baseline {baseline}: rewrote {', '.join(write_base(baseline, result))}")
        return UNMEASURED if code == UNMEASURED else OK
    return code
