"""Export every stage of a deployment plan, run each artifact on each planned target, and
measure it there: accuracy on the runtime (with the manifest's preprocessing), agreement
with torch, executed precision, latency and throughput. Nothing here knows about training,
the run config or any backend by name: a target's behaviour is its own (targets/)."""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np

from compress.checkpoint import read_sealed, write_sealed
from compress.evaluate import compare, logits_of, preprocess
from compress.export import EXPORT_FORMAT, export_model
from compress.parity import diverging_layers
from compress.plan import DeploymentPlan, Parity, StageArtifact, TargetSpec, quant_activations, sparse_layers
from compress.speed_precision import mixed_onnx, rewritten
from compress.tasks import get_task
from compress.train import predict
from targets import base
from targets.profile import profile


def _usable(plan: DeploymentPlan) -> list[str]:
    return [t.backend for t in plan.targets if base.get(t.backend).available()[0]]


def export_stage(plan: DeploymentPlan, stage: StageArtifact) -> dict:
    """The stage's ONNX, each usable target's artifact and the manifest; reused when the
    manifest was made from the same model and settings and lists every artifact wanted."""
    mpath, backends = stage.dir / "manifest.json", _usable(plan)
    manifest, why = read_sealed(mpath) if mpath.is_file() else (None, "")  # digests of the files it lists
    if why:
        plan.log(f"[{stage.name}] exporting again: {why}")
    if manifest is not None:
        files = manifest.get("files", {})
        if manifest.get("source_hash") == stage.export_hash and all(
                (stage.dir / f).is_file() for f in files.values()) and all(
                base.get(b).artifact in files for b in backends):
            return manifest
        old = manifest.get("export_format", 1)  # manifests before EXPORT_FORMAT carry none
        if old != EXPORT_FORMAT:
            plan.log(f"[{stage.name}] export format {old} -> {EXPORT_FORMAT}: exporting again")
    t0 = time.time()
    manifest = export_model(stage.model, stage.dir, plan.data.dataset, plan.opset, backends, stage.name,
                            sparse_layers=sparse_layers(stage.structure),
                            activations=quant_activations(stage.structure))
    task = get_task(plan.task)
    if task.name != "classification":  # the output is not class logits: say what it is
        manifest["task"] = task.name
        manifest["output"].update(task.manifest_output(plan.data.dataset))
    manifest["source_hash"] = stage.export_hash
    manifest = write_sealed(mpath, manifest, list(manifest["files"].values()))
    plan.log(f"[{stage.name}] exported {', '.join(manifest['files'].values())} ({time.time() - t0:.1f}s)")
    return manifest


def artifact_size(path: Path) -> int:
    """The file and, for formats that keep weights beside it (IR .xml + .bin), those. Our ONNX
    exports are self-contained: a model.bin beside model.onnx is another backend's IR."""
    size = path.stat().st_size
    weights = path.with_suffix(".bin")
    if path.suffix not in (".onnx", ".bin") and weights.is_file():
        size += weights.stat().st_size
    return size


def parity_failures(row: dict, torch_accuracy: float, parity: Parity, task=None) -> list[str]:
    """torch_accuracy: torch's value of the task's primary metric (classification: accuracy)."""
    return get_task(task).parity_failures(row, torch_accuracy, parity)


def diagnose(plan: DeploymentPlan, model, onnx_path: Path, artifact: Path, spec: TargetSpec,
             cfg: base.CompileOptions, x: np.ndarray) -> dict:
    """Layer-by-layer comparison on one batch, run only for a deployment that failed parity."""
    try:
        return diverging_layers(model, onnx_path, artifact, spec.backend, x[:spec.parity.diagnose_batch],
                                spec.parity.layer_tolerance, cfg=cfg)
    except Exception as e:  # the diagnosis must never hide the failure it explains
        plan.log(traceback.format_exc())
        return {"mapped": False, "reason": f"{type(e).__name__}: {e}", "layers": [], "first_diverging": None}


def explain(diag: dict) -> str:
    """The diagnosis in one clause of a row's reason."""
    first = diag.get("first_diverging")
    if first:
        return (f"first diverging layer: {first['module']} ({first['node']}), "
                f"relative error {first['rel_error']:.3g} > {diag['tolerance']}")
    if diag.get("mapped"):
        return f"every compute layer within layer_tolerance {diag['tolerance']}"
    return f"layers not compared: {diag.get('reason')}"


def int8_failure(row: dict, manifest: dict) -> str:
    """Every layer with quantized weights, and every attention matmul with quantized inputs
    (compress/quantize/attention.py), must run an int8 kernel; other weightless matmuls stay
    float by design in layerwise-quantized models."""
    ep = row["executed_precision"]
    fmt = manifest.get("quant_format") or {}
    quantized = len(fmt.get("weight_bits") or {}) + fmt.get("int8_matmuls", 0) or ep["compute_layers"]
    kept_float = len((row.get("speed_precision") or {}).get("float_layers", ()))  # chosen by speed, on purpose
    expected = min(quantized, ep["compute_layers"]) - kept_float
    if manifest["precision"] != "int8" or ep["int8_layers"] >= expected:
        return ""
    return (f"int8 artifact but only {ep['int8_layers']} of {expected} quantized "
            f"compute layers ran an int8 kernel: {ep['detail']}")


def skipped(target, why: str, onnx_path: Path, cfg: base.CompileOptions, x: np.ndarray) -> str:
    """Why a row is skipped, with what the target could still check here."""
    try:
        more = target.check_offline(onnx_path, cfg, x[:8])
    except Exception as e:  # a check that cannot run must not turn a skip into a crash
        more = f"offline checks not run ({type(e).__name__}: {e})"
    return f"{why}; {more}" if more else why


def measure(plan: DeploymentPlan, runner, x: np.ndarray, compared: dict) -> dict:
    """compared: compare()'s result for this artifact (its accuracy pass); the profile added."""
    p = plan.profile
    out = dict(compared)
    out.update(profile(runner, x[:64], warmup=p.warmup, runs=p.runs, throughput_batch=p.throughput_batch,
                       throughput_runs=p.throughput_runs, max_warmup=p.max_warmup,
                       settle_tolerance=p.settle_tolerance, vendor_seconds=p.vendor_seconds,
                       throughput_search=p.throughput_search))
    out["executed_precision"] = runner.info["executed_precision"]
    out["runtime"] = {k: v for k, v in runner.info.items() if k not in ("executed_precision", "fused_sums")}
    return out


def speed_precision(plan: DeploymentPlan, spec: TargetSpec, onnx_path: Path, sdir: Path, x: np.ndarray,
                    labels: np.ndarray, ref: np.ndarray, model=None):
    """`precision: speed`: the artifact with the layers this backend runs faster in float kept
    float, timed at batch 1 and the throughput batch the ways this target may run them (batch 1
    on one thread under `latency_threads: auto`; single-threaded callers or streams where the
    throughput search may choose them); the whole graph in float only where it passes this
    target's parity gate. The choice and its reasons go in the row. -> (artifact, choice, the
    artifact's compare() where it was scored for the gate, else None).
    The float graph computes other numbers than the int8 model (its activations are not
    rounded): where it misses the agreement with torch's int8 model, it is judged again against
    torch computing the float graph (compress/runtime_arith.float_activation_logits), its
    accuracy still held to torch's int8 one (`float_graph` in the row says so)."""
    from compress.speed_precision import speed_artifact
    target, task, scored = base.get(spec.backend), get_task(plan.task), {}

    def accept(path: Path):
        runner = target.compile(path, base.CompileOptions(threads=spec.threads, device=spec.device, precision="int8",
                                                          work_dir=sdir, options=spec.options))
        logits = logits_of(runner, x, plan.data.batch_size)
        row = scored[path] = compare(logits, labels, ref, plan.task, spec.parity)
        failures = parity_failures(row, task.score(ref, labels), spec.parity, task)
        judge = failures and model is not None
        again = judge_float_graph(plan, row, model, logits, x, labels, ref, spec) if judge else None
        if again is not None:  # judged against torch computing the float graph: the verdict that stands
            if not again:
                return None
            failures.append(f"against torch computing the float graph: {'; '.join(again)}")
        # what the user trades if they relax the gate: the float graph's own metric beside torch's
        return "; ".join(failures) + (f"; its {task.primary} {row[task.primary]:.4f}, torch's "
                                      f"{task.score(ref, labels):.4f}") if failures else None
    # streams: the target's throughput mode may run single-thread callers or streams side by side
    how = {"latency_one_thread": spec.latency_threads == "auto", "options": spec.options,
           "streams": plan.profile.throughput_search and spec.device == "cpu"
           and getattr(target, "throughput_streams", False)}
    path, choice = speed_artifact(onnx_path, sdir, spec.backend, x[:plan.profile.throughput_batch], spec.threads,
                                  (1, plan.profile.throughput_batch), plan.log, how=how, accept=accept)
    # only an accepted whole float graph was scored; a per-layer graph written to the same path after a
    # rejection is another graph and is measured afresh
    return path, choice, scored.get(path) if choice["whole_graph_float"] else None


def static_shapes(plan: DeploymentPlan, target, source: Path, runner, cfg: base.CompileOptions, x: np.ndarray):
    """`shapes: auto`: static-batch compiles of the artifact for batch 1 and the throughput batch,
    each used where it measured faster than the dynamic one and then kept beside it."""
    from compress import static_shape
    return static_shape.auto(target, source, runner, cfg, x[:64], (1, plan.profile.throughput_batch), source.parent,
                             target.name)


def latency_threads(target, path: Path, runner, cfg: base.CompileOptions, x: np.ndarray):
    """`latency_threads: auto`: batch 1 on one thread where that measured faster, compiled from
    the artifact batch 1 runs (the static one where `shapes: auto` chose it)."""
    from compress import static_shape
    b1 = ((runner.info.get("static_shapes") or {}).get("1") or {}).get("artifact")
    return static_shape.one_thread_at_batch1(target, path.parent / b1 if b1 else path, runner, cfg, x)


def deploy_one(plan: DeploymentPlan, stage: str, sdir: Path, manifest: dict, spec: TargetSpec,
               x: np.ndarray, labels: np.ndarray, ref: np.ndarray, model=None) -> dict:
    """model: the torch model the artifact was exported from; given, a parity failure is
    explained layer by layer (`diverging_layers` in the row)."""
    target, task = base.get(spec.backend), get_task(plan.task)
    row = {"stage": stage, "backend": spec.backend, "precision": manifest["precision"], "status": "ok",
           "reason": None, "executed_precision": None, **dict.fromkeys(task.metric_keys + task.diff_keys),
           "latency_ms": None, "throughput": None, "size_bytes": None, "artifact": None}
    cfg = base.CompileOptions(threads=spec.threads, device=spec.device, precision=manifest["precision"],
                              work_dir=sdir, options=spec.options, sparse_weights=bool(manifest.get("sparsity")))
    onnx_path = sdir / manifest["files"]["onnx"]
    if spec.host:  # never measured here under the remote device's name
        return {**row, "status": "skipped", "reason": f"remote device {spec.host}: measured there by "
                f"`compress bench RUN_DIR` (compress run deploys on this machine's targets only)"}
    ok, why = target.available()
    if not ok:
        return {**row, "status": "skipped", "reason": skipped(target, why, onnx_path, cfg, x)}
    runner = None
    try:
        name = manifest["files"].get(target.artifact)
        path = sdir / name if name else target.prepare(onnx_path, sdir)
        source, compared = onnx_path, None
        if spec.precision == "speed" and manifest["precision"] == "int8":
            path, row["speed_precision"], compared = speed_precision(plan, spec, onnx_path, sdir, x, labels, ref,
                                                                     model)
            source = mixed_onnx(onnx_path, sdir, spec.backend) if rewritten(row["speed_precision"]) else source
        row["artifact"], row["size_bytes"] = str(path.relative_to(plan.run.run_dir)), artifact_size(path)
        runner = target.compile(path, cfg)
        if spec.shapes == "auto":  # the choice per batch lands in row["runtime"]["static_shapes"]
            runner = static_shapes(plan, target, source, runner, cfg, x)
        if spec.latency_threads == "auto":  # the choice lands in row["runtime"]["latency_threads"]
            runner = latency_threads(target, path, runner, cfg, x)
        logits = None  # kept where computed here: a row failing parity is judged again with them
        if compared is None:
            logits = logits_of(runner, x, plan.data.batch_size)
            compared = compare(logits, labels, ref, plan.task, spec.parity)
        row.update(measure(plan, runner, x, compared))
    except Exception as e:  # a backend failure is a result to report, not a crash of the run
        plan.log(traceback.format_exc())
        return {**row, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
    failures = parity_failures(row, task.score(ref, labels), spec.parity, task)
    if failures and (row.get("float_graph") or {}).get("passes"):
        failures = []  # the whole graph in float, judged against torch computing it (speed_precision)
    if failures and model is not None:
        judged, twin = judge_fused_sums(plan, row, model, onnx_path, runner, x, labels, ref, spec, logits)
        if judged is not None:  # what still fails is diagnosed against torch computing the runtime's fusion
            failures, model = judged, twin
    if failures:
        row.update(status="failed", reason="parity: " + "; ".join(failures))
        if model is not None:
            diag = row["diverging_layers"] = diagnose(plan, model, onnx_path, path, spec, cfg, x)
            row["reason"] += "; " + explain(diag)
        return row
    bad = int8_failure(row, manifest)
    if bad and spec.precision != "speed":
        bad += speed_would_rewrite(target, onnx_path)
    return {**row, "status": "failed", "reason": bad} if bad else row


def speed_would_rewrite(target, onnx_path: Path) -> str:
    """Where the backend's exact rewrites that turn float layers int8 apply to this graph (ORT: a
    ReLU before a zero-point-128 quantizer keeps its conv float until rewritten), the text that
    says `precision: speed` ships them; else ''."""
    rewrite = getattr(target, "int8_rewrites", None)
    if rewrite is None:
        return ""
    import onnx
    done = rewrite(onnx.load(str(onnx_path)))[1]
    if not done:
        return ""
    what = ", ".join(f"{n} x {op}" for op, n in done.items())
    return (f"; `precision: speed` on this target writes its exact rewrites into the artifact ({what}: the "
            f"same numbers), with which such layers run int8")


def judge_float_graph(plan: DeploymentPlan, row: dict, model, logits: np.ndarray, x: np.ndarray,
                      labels: np.ndarray, ref: np.ndarray, spec: TargetSpec) -> Optional[list[str]]:
    """The whole graph in float, failing against torch's int8 model, judged against torch
    computing that graph: -> the failures that remain ([]: it passes; None: no such torch model).
    The row keeps the int8 model's agreement; `float_graph` records the other. Its metric is still
    held to the int8 model's (max_acc_drop): a float graph less accurate than the model trained
    stays rejected."""
    from compress.runtime_arith import float_activation_logits
    task = get_task(plan.task)
    try:
        twin = float_activation_logits(model, x, plan.data.batch_size)
    except Exception:  # the emulation must never hide the failure it may explain
        plan.log(traceback.format_exc())
        return None
    if twin is None:
        return None
    got = compare(logits, labels, twin, plan.task, spec.parity)
    judged = {"agreement": got["agreement"], "max_abs_diff": got["max_abs_diff"]}
    again = parity_failures({**row, **judged}, task.score(ref, labels), spec.parity, task)
    row["float_graph"] = {**judged, "passes": not again, "failures": "; ".join(again)}
    return again


def judge_fused_sums(plan: DeploymentPlan, row: dict, model, onnx_path: Path, runner, x: np.ndarray,
                     labels: np.ndarray, ref: np.ndarray, spec: TargetSpec,
                     logits: Optional[np.ndarray] = None) -> tuple[Optional[list[str]], object]:
    """A row that failed parity on a runtime that fused residual adds without their quantizer
    (compress/runtime_arith.py), judged again against torch computing the same: -> (the failures
    that remain, [] passes, or None where there is nothing to emulate; that torch model). The row
    keeps torch's agreement; `runtime_fusion` records the other. logits: the runtime's, where the
    row's accuracy pass kept them."""
    from compress.runtime_arith import fused_sum_check
    task, batch = get_task(plan.task), plan.data.batch_size
    try:
        check = fused_sum_check(model, onnx_path, runner, x, batch)
        if check is None:
            return None, None
        twin = check.pop("twin")
        logits = logits_of(runner, x, batch) if logits is None else logits
        got = compare(logits, labels, check.pop("logits"), plan.task, spec.parity)
    except Exception:  # the emulation must never hide the failure it may explain
        plan.log(traceback.format_exc())
        return None, None
    emulated = {"agreement": got["agreement"], "max_abs_diff": got["max_abs_diff"]}
    again = parity_failures({**row, **emulated}, task.score(ref, labels), spec.parity, task)
    row["runtime_fusion"] = {**check, **emulated, "passes": not again, "failures": "; ".join(again)}
    return again, twin


def short(row: dict, task) -> str:
    """The row's metrics for the log line (classification: acc)."""
    task = get_task(task)
    if task.name == "classification":
        return f"acc {row['accuracy']:.4f}"
    return " ".join(f"{k} {row[k]:.4f}" for k in task.metric_keys)


def deploy_stage(plan: DeploymentPlan, stage: StageArtifact) -> list[dict]:
    manifest = export_stage(plan, stage)
    data = plan.data.dataset
    # the inputs every backend sees: raw test pixels through the manifest's preprocessing
    x = preprocess(data.test.images.numpy(), manifest)
    labels = data.test.labels.numpy()
    ref = stage.test_logits if stage.test_logits is not None else predict(stage.model, data.test, data,
                                                                          plan.data.batch_size)
    rows = []
    for spec in plan.targets:
        row = deploy_one(plan, stage.name, stage.dir, manifest, spec, x, labels, ref, model=stage.model)
        msg = row["reason"] if row["status"] != "ok" else (
            f"{short(row, plan.task)} agree {row['agreement']:.4f} "
            f"p50 {row['latency_ms']['p50']:.3f} ms, {row['executed_precision']['summary']}"
            + (f" (fused residual adds: agree {row['runtime_fusion']['agreement']:.4f} with torch computing the "
               f"same)" if row.get("runtime_fusion") else "")
            + (f" (the whole graph in float: agree {row['float_graph']['agreement']:.4f} with torch computing "
               f"it)" if row.get("float_graph") else ""))
        plan.log(f"[{stage.name} @ {spec.backend}] {row['status']}: {msg}")
        rows.append(row)
    return rows


def deploy_all(plan: DeploymentPlan) -> list[dict]:
    """One row per stage x target, in plan order."""
    return [row for stage in plan.stages for row in deploy_stage(plan, stage)]
