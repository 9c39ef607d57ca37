"""Export every stage, run each artifact on each configured backend, and measure it there:
accuracy on the runtime (with the manifest's preprocessing), agreement with torch,
executed precision, latency and throughput. Nothing here knows about training."""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import numpy as np

from compress.checkpoint import write_json
from compress.config import config_hash
from compress.evaluate import compare, logits_of, preprocess
from compress.errors import UserError
from compress.export import export_model, is_quantized
from compress.parity import diverging_layers
from compress.report import write_report
from compress.train import predict
from targets import base
from targets.profile import profile


def _export(pipe, stage: str, model, sdir: Path, data, structure: dict) -> dict:
    metrics = json.loads((sdir / "metrics.json").read_text())
    h = config_hash(metrics["config_hash"], pipe.cfg.export.opset, pipe.cfg.export.openvino_ir)
    mpath = sdir / "manifest.json"
    if mpath.is_file():
        manifest = json.loads(mpath.read_text())
        if manifest.get("source_hash") == h and all((sdir / f).is_file() for f in manifest["files"].values()):
            return manifest
    t0 = time.time()
    manifest = export_model(model, sdir, data, pipe.cfg.export.opset, pipe.cfg.export.openvino_ir, stage,
                            sparse_layers=list(structure.sparsity))
    manifest["source_hash"] = h
    write_json(mpath, manifest)
    pipe.log(f"[{stage}] exported {', '.join(manifest['files'].values())} ({time.time() - t0:.1f}s)")
    return manifest


def artifact_size(path: Path) -> int:
    size = path.stat().st_size
    if path.suffix == ".xml":
        size += path.with_suffix(".bin").stat().st_size
    return size


def parity_failures(row: dict, torch_accuracy: float, parity) -> list[str]:
    out = []
    if row["agreement"] < parity.min_agreement:
        out.append(f"top-1 agreement with torch {row['agreement']:.4f} < min_agreement {parity.min_agreement}")
    drop = torch_accuracy - row["accuracy"]
    if drop > parity.max_acc_drop:
        out.append(f"accuracy {row['accuracy']:.4f} is {drop:.4f} below torch's {torch_accuracy:.4f} "
                   f"(max_acc_drop {parity.max_acc_drop})")
    if parity.max_abs_diff is not None and row["max_abs_diff"] > parity.max_abs_diff:
        out.append(f"max |delta logit| {row['max_abs_diff']:.3g} > max_abs_diff {parity.max_abs_diff}")
    return out


# what a backend reads from its targets[] entry (the rest of TargetConfig is generic)
BACKEND_OPTIONS = ("graph_optimization", "inter_op_threads", "performance_hint",
                   "inference_precision", "fp16_weights", "batch_profile")


def diagnose(pipe, model, sdir: Path, manifest: dict, path: Path, tcfg, x: np.ndarray) -> dict:
    """Layer-by-layer comparison on one batch, run only for a deployment that failed parity."""
    try:
        return diverging_layers(model, sdir / manifest["files"]["onnx"], path, tcfg.backend,
                                x[:tcfg.parity.diagnose_batch], tcfg.parity.layer_tolerance,
                                tcfg.threads or 1)
    except Exception as e:  # the diagnosis must never hide the failure it explains
        pipe.log(traceback.format_exc())
        return {"mapped": False, "reason": f"{type(e).__name__}: {e}", "layers": [], "first_diverging": None}


def deploy_one(pipe, stage: str, sdir: Path, manifest: dict, tcfg, x: np.ndarray,
               labels: np.ndarray, ref: np.ndarray, model=None) -> dict:
    """model: the torch model the artifact was exported from; given, a parity failure is
    explained layer by layer (`diverging_layers` in the row)."""
    target = base.get(tcfg.backend)
    precision = manifest["precision"]
    row = {"stage": stage, "backend": tcfg.backend, "precision": precision, "status": "ok",
           "reason": None, "executed_precision": None, "accuracy": None, "agreement": None,
           "max_abs_diff": None, "latency_ms": None, "throughput": None, "size_bytes": None,
           "artifact": None}
    # the target's own settings, plus what the artifact says about itself (2:4 layers)
    options = {**{k: getattr(tcfg, k) for k in BACKEND_OPTIONS},
               "sparse_weights": bool(manifest.get("sparsity"))}
    ok, why = target.available()
    fname = manifest["files"].get(target.artifact)
    if not ok:
        check = getattr(target, "check_without_gpu", None)  # TensorRT: the pre-build checks still run
        if check is not None and fname is not None:
            try:
                why += "; " + check(sdir / fname, base.CompileOptions(work_dir=sdir, options=options), x[:8])
            except Exception as e:  # a check that cannot run must not turn a skip into a crash
                why += f"; TRT-ready ONNX not checked ({type(e).__name__}: {e})"
        return {**row, "status": "skipped", "reason": why}
    if fname is None:
        return {**row, "status": "skipped", "reason": f"no {target.artifact} artifact exported "
                                                       f"(export.openvino_ir is off)"}
    path = sdir / fname
    row["artifact"] = str(path.relative_to(pipe.run_dir))
    row["size_bytes"] = artifact_size(path)
    try:
        runner = target.compile(path, base.CompileOptions(threads=tcfg.threads, device=tcfg.device,
                                                        precision=precision, work_dir=sdir,
                                                        options=options))
        logits = logits_of(runner, x, pipe.cfg.data.eval_batch_size)
        row.update(compare(logits, labels, ref))
        p = pipe.cfg.profile
        row.update(profile(runner, x[:64], warmup=p.warmup, runs=p.runs,
                           throughput_batch=p.throughput_batch, throughput_runs=p.throughput_runs,
                           max_warmup=p.max_warmup, settle_tolerance=p.settle_tolerance))
        row["executed_precision"] = runner.info["executed_precision"]
        row["runtime"] = {k: v for k, v in runner.info.items() if k != "executed_precision"}
    except Exception as e:  # a backend failure is a result to report, not a crash of the run
        pipe.log(traceback.format_exc())
        return {**row, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
    failures = parity_failures(row, float((ref.argmax(1) == labels).mean()), tcfg.parity)
    if failures:
        row["status"] = "failed"
        row["reason"] = "parity: " + "; ".join(failures)
        if model is not None:
            diag = row["diverging_layers"] = diagnose(pipe, model, sdir, manifest, path, tcfg, x)
            first = diag.get("first_diverging")
            if first:
                row["reason"] += (f"; first diverging layer: {first['module']} ({first['node']}), "
                                  f"relative error {first['rel_error']:.3g} > {diag['tolerance']}")
            elif diag.get("mapped"):
                row["reason"] += f"; every compute layer within layer_tolerance {diag['tolerance']}"
            else:
                row["reason"] += f"; layers not compared: {diag.get('reason')}"
        return row
    ep = row["executed_precision"]
    # every layer with quantized weights must run an int8 kernel; weightless matmuls
    # (attention's q·k, attn·v) stay float by design in layerwise-quantized models
    quantized = len((manifest.get("quant_format") or {}).get("weight_bits") or {}) or ep["compute_layers"]
    expected = min(quantized, ep["compute_layers"])
    if precision == "int8" and ep["int8_layers"] < expected:
        row["status"] = "failed"
        row["reason"] = (f"int8 artifact but only {ep['int8_layers']} of {expected} quantized "
                         f"compute layers ran an int8 kernel: {ep['detail']}")
    return row


def deploy_all(pipe, rows: list[dict], models: dict, ctx) -> dict:
    data = ctx.data
    wanted = pipe.cfg.export.stages or list(models)
    unknown = [s for s in wanted if s not in models]
    if unknown:
        raise UserError(f"export.stages: {unknown} are not stages of this run ({list(models)})")
    labels = data.test.labels.numpy()
    deployments = []
    for stage in wanted:
        model, sdir, structure = models[stage]
        manifest = _export(pipe, stage, model, sdir, data, structure)
        # the inputs every backend sees: raw test pixels through the manifest's preprocessing
        x = preprocess(data.test.images.numpy(), manifest)
        ref = predict(model, data.test, data, pipe.cfg.data.eval_batch_size)
        for tcfg in pipe.cfg.targets:
            row = deploy_one(pipe, stage, sdir, manifest, tcfg, x, labels, ref, model=model)
            msg = row["reason"] if row["status"] != "ok" else (
                f"acc {row['accuracy']:.4f} agree {row['agreement']:.4f} "
                f"p50 {row['latency_ms']['p50']:.3f} ms, {row['executed_precision']['summary']}")
            pipe.log(f"[{stage} @ {tcfg.backend}] {row['status']}: {msg}")
            deployments.append(row)
    return write_report(pipe, rows, deployments)
