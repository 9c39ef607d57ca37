"""report.json (the contract tools and CI read: extend, never rename), report.md, and
the table printed at the end of a run."""
from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from compress.checkpoint import atomic_write, write_json
from compress.errors import UserError
from compress.export import versions
from compress.hardware import add_compute_rates
from compress.hardware import describe as describe_hardware
from compress.plan import RunIdentity
from compress.tasks import HEADERS, get_task


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import torch
    v = versions()
    return {"python": sys.version.split()[0], "torch": v["torch"], "onnxruntime": v["onnxruntime"],
            "openvino": v["openvino"], "brevitas": v["brevitas"], "torch_pruning": v["torch-pruning"],
            "cpu": cpu_name(), "cores": __import__("os").cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "hardware": describe_hardware()}


STAGE_KEYS = ("name", "accuracy", "params", "macs", "size_bytes", "seconds")
PRIVATE_KEYS = ("history", "config_hash", "config")  # in metrics.json, not in the report


def _fmt(v, spec="") -> str:
    return "—" if v is None else format(v, spec)


def prune_lines(s: dict) -> list[str]:
    """What a prune stage decided: removed blocks, 2:4 layers, the latency search."""
    out = []
    if s.get("block_distortion"):
        removed = s.get("removed_blocks") or []
        out.append(f"{s['name']}: removed blocks {', '.join(f'`{n}`' for n in removed)} "
                   f"(output distortion of each candidate: "
                   + ", ".join(f"`{n}` {v:.3g}" for n, v in s["block_distortion"].items()) + ")")
    if s.get("sparsity"):
        out.append(f"{s['name']}: 2:4 sparsity on {', '.join(f'`{n}`' for n in s['sparsity'])}")
    search = s.get("latency_search")
    if search:
        final = search.get("final") or {}
        out += [f"{s['name']}: latency search on {search['backend']} b{search['batch']}: goal "
                f"{search['goal_ratio']:.2f}× of the unpruned {search['unpruned_p50_ms']:.3f} ms; chose "
                f"ratio {search['chosen_ratio']:g} ({'met' if search['met'] else 'NOT met'}); after recovery "
                f"{_fmt(final.get('latency_ratio'), '.2f')}× measured", "",
                "| ratio | MACs | p50 ms | unpruned p50 ms | ratio to unpruned | meets |",
                "|---:|---:|---:|---:|---:|---|"]
        out += [f"| {c['ratio']:g} | {c['macs']:,} | {c['p50_ms']:.3f} | {c['unpruned_p50_ms']:.3f} | "
                f"{c['latency_ratio']:.2f} | {'yes' if c['met'] else 'no'} |"
                for c in sorted(search["candidates"], key=lambda c: c["ratio"])]
    return ["", *out] if out else []


def _mean_ci(lat: dict) -> str:
    return "—" if lat.get("mean") is None else f"{lat['mean']:.3f} ± {lat.get('ci95', 0):.3f}"


TIMERS_NOTE = ("p50 (Python call): what a Python caller waits, timed around each call; runtime's timer: the "
               "runtime's own per-call time (OpenVINO InferRequest.latency in benchmark_app's loop, ONNX Runtime's "
               "profiler model_run); vendor tool: benchmark_app's median on the same file, threads and streams "
               "(report.json latency_ms.runtime / .vendor say which). GMAC/s: items/s x the stage's MACs; "
               "of int8 limit: environment.hardware.")


def timer_cells(lat: dict, thr: dict) -> str:
    rt, vd = lat.get("runtime") or {}, lat.get("vendor") or {}
    vendor = f"{_fmt(vd.get('p50'), '.3f')} ({vd['tool']})" if vd.get("p50") is not None else "—"
    rate = thr.get("gmac_per_s")
    frac = thr.get("int8_limit_fraction")
    over = " of a limit read too low: report.json int8_limit_note" if thr.get("int8_limit_note") else ""
    share = f"{rate:.1f} ({frac:.0%}{over})" if rate is not None and frac is not None else _fmt(rate, ".1f")
    return f"{_fmt(rt.get('p50'), '.3f')} | {vendor} | {share}"


def _judged_again(row: dict, key: str, what: str, against: str) -> str:
    """`{stage} @ {backend}: {what}; agreement with torch ..., with torch computing {against} ...: verdict`."""
    j = row[key]
    verdict = "the gate passes on that" if j["passes"] else f"still failing: {j['failures']}"
    return (f"{row['stage']} @ {row['backend']}: {what}; agreement with torch {_fmt(row.get('agreement'), '.4f')}, "
            f"with torch computing {against} {_fmt(j['agreement'], '.4f')}: {verdict}")


def fusion_note(row: dict) -> str:
    """A row whose parity gate was judged again against torch computing the runtime's fused
    residual adds (compress/runtime_arith.py)."""
    return _judged_again(row, "runtime_fusion", f"the runtime fused {row['runtime_fusion']['adds']} residual add(s) "
                         f"into their convolutions without re-quantizing the convolution's output first (Q(conv + r), "
                         f"where torch computes Q(Q(conv) + r))", "the same")


def float_graph_note(row: dict) -> str:
    """A `precision: speed` row that ships the whole graph in float, judged against torch
    computing that graph (compress/deploy.judge_float_graph), its metric held to the int8 model's."""
    return _judged_again(row, "float_graph", "the whole graph runs in float (measured faster; its activations are "
                         "not rounded to int8, so it is another model than the int8 one trained, its metric held to "
                         "the int8 model's)", "the float graph")


def diverging_markdown(deployments: list[dict]) -> list[str]:
    """Per failed deployment: each compute layer's relative error against torch, in graph
    order, the first one over tolerance marked."""
    lines = []
    for d in deployments:
        diag = d.get("diverging_layers")
        if not diag:
            continue
        first = (diag.get("first_diverging") or {}).get("node")
        lines += ["", f"### {d['stage']} @ {d['backend']}: layer by layer against torch "
                      f"(batch {diag.get('batch')}, tolerance {diag.get('tolerance')})", ""]
        if not diag.get("mapped"):
            lines.append(f"not compared: {diag.get('reason')}")
            continue
        lines += ["| # | torch module | graph node | op | relative error | |", "|---:|---|---|---|---:|---|"]
        for i, lyr in enumerate(diag["layers"]):
            lines.append(f"| {i} | `{lyr['module']}` | `{lyr['node']}` | {lyr['op']} | "
                         f"{_fmt(lyr['rel_error'], '.3g')} | {'**first diverging**' if lyr['node'] == first else ''} |")
    return lines


def _speed_table(d: dict, sp: dict) -> list[str]:
    """`precision: speed`: how the candidates were timed and, per layer, the precision chosen and why."""
    timed = "; ".join(f"batch {b} on {how}" for b, how in (sp.get("timed") or {}).items())
    lines = ["", f"### {d['stage']} @ {d['backend']}: precision per layer chosen by speed", "",
             f"score: median time relative to the all-int8 graph, summed over the batches timed, lower is faster; "
             f"a flip needs {sp.get('margin', 0):.0%}" + (f"; timed as deployed: {timed}" if timed else "")]
    if sp.get("fused"):
        fused = ", ".join(f"{n} x {op}" for op, n in sp["fused"].items())
        lines += ["", f"exact rewrites in this artifact (the same numbers in fewer passes on {d['backend']}): {fused}"]
    if sp.get("whole_graph_rejected"):
        lines += ["", f"the whole graph in float measured faster but failed parity ({sp['whole_graph_rejected']}): "
                      f"layers chosen one by one instead; a gate that allows it (targets[].parity) ships it at the "
                      f"next deployment without timing again"]
    lines += ["", "| layer | runs in | int8 score | float score | why |", "|---|---|---:|---:|---|"]
    return lines + [f"| `{name}` | {r['precision']} | {_fmt(r.get('int8_score'), '.4f')} | "
                    f"{_fmt(r.get('float_score'), '.4f')} | {r.get('why', '')} |"
                    for name, r in (sp.get("layers") or {}).items()]


def speed_markdown(deployments: list[dict]) -> list[str]:
    """Per deployment with `precision: speed`, `shapes: auto` or `latency_threads: auto`: what was
    chosen by timing on the backend, and the times that chose it (those targets[] keys)."""
    lines = []
    for d in deployments:
        sp, shapes = d.get("speed_precision"), (d.get("runtime") or {}).get("static_shapes")
        if sp:
            lines += _speed_table(d, sp)
        if shapes:
            cells = ", ".join(f"batch {b}: {r['shape']} ({_fmt(r['dynamic_ms'], '.3f')} ms dynamic, "
                              f"{_fmt(r['static_ms'], '.3f')} ms static)" for b, r in shapes.items())
            lines += ["", f"{d['stage']} @ {d['backend']}: input shapes chosen by measurement: {cells}"]
        lt = ((d.get("runtime") or {}).get("latency_threads") or {}).get("1")
        if lt:
            lines += ["", f"{d['stage']} @ {d['backend']}: batch 1 runs on {lt['threads']} thread(s), chosen by "
                          f"measurement ({_fmt(lt['configured_ms'], '.3f')} ms on {lt['configured_threads']}, "
                          f"{_fmt(lt['one_thread_ms'], '.3f')} ms on 1)"]
    return lines


def sensitivity_markdown(stage: dict) -> list[str]:
    """A quantize stage's format, and its mixed-precision sensitivity table when it has one."""
    out = []
    if stage.get("format"):
        out += ["", f"{stage['name']}: format {stage['format']}, average weight bits "
                    f"{stage['avg_weight_bits']:.2f}, calibration {stage.get('calibration', 'real')}"]
    if stage.get("sensitivity"):
        mp = stage["mixed_precision"]
        out += ["", f"{stage['name']}: mixed precision by sensitivity (objective increase on calibration "
                    f"data with only that layer lowered): average {mp['avg_bits']:.2f} bits, target "
                    f"{mp['target_avg_bits']:.2f}", "",
                "| layer | weights | objective Δ | bits |", "|---|---:|---:|---:|"]
        out += [f"| `{r['layer']}` | {r['weights']:,} | {_fmt(r['objective_delta'], '+.4f')} | {r['bits']}"
                f"{' (fixed)' if r['fixed'] else ''} |" for r in stage["sensitivity"]]
    return out


DIFF_FORMAT = {"max_abs_diff": ".2e", "mean_abs_diff": ".2e"}  # every other metric column: .4f
CLASSIFICATION_COLUMNS = {"stages": ["accuracy"], "deployments": ["accuracy", "agreement", "max_abs_diff"]}


def _cells(row: dict, keys: list[str]) -> str:
    return " | ".join(_fmt(row.get(k), DIFF_FORMAT.get(k, ".4f")) for k in keys)


def _heads(keys: list[str]) -> str:
    return " | ".join(HEADERS.get(k, k) for k in keys)


def to_markdown(report: dict) -> str:
    cols = report.get("columns") or CLASSIFICATION_COLUMNS  # reports from before tasks: classification
    scols, dcols = cols["stages"], cols["deployments"]
    lines = [f"# {report['name']}", "", f"created {report['created']} · config {report['config_hash']}",
             "", "## Stages (torch)", "", f"| stage | {_heads(scols)} | params | MACs | weights (bytes) | seconds |",
             "|---|" + "---:|" * (len(scols) + 4)]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {_cells(s, scols)} | {s['params']:,} | {s['macs']:,} | "
                     f"{s['size_bytes']:,} | {s['seconds']:.0f} |")
    for s in report["stages"]:
        if s.get("layer_sqnr_db"):
            worst = ", ".join(f"`{n}` {s['layer_sqnr_db'][n]:.1f} dB" for n in s.get("worst_layers", []))
            lines += ["", f"{s['name']}: lowest per-layer SQNR (quantized vs float, calibration data): {worst}"]
        lines += prune_lines(s)
    for s in report["stages"]:
        lines += sensitivity_markdown(s)
    lines += ["", "## Deployments (measured on the runtime)", "",
              f"| stage | backend | precision | status | {_heads(dcols)} | p50 ms (b1, Python call) | p99 ms "
              "| mean ± 95% CI ms | items/s | peak RSS MB | size (bytes) | executed | runtime's timer p50 ms (b1) "
              "| vendor tool ms (b1) | GMAC/s (of int8 limit) |",
              "|---|---|---|---|" + "---:|" * (len(dcols) + 6) + "---|" + "---:|" * 3]
    for d in report["deployments"]:
        lat, thr = d.get("latency_ms") or {}, d.get("throughput") or {}
        executed = (d.get("executed_precision") or {}).get("summary") or d.get("reason") or ""
        executed = executed.replace("|", "\\|")  # a reason's "max |diff|" must not end the cell (GFM escape)
        lines.append(
            f"| {d['stage']} | {d['backend']} | {d['precision']} | {d['status']} | "
            f"{_cells(d, dcols)} | {_fmt(lat.get('p50'), '.3f')} | "
            f"{_fmt(lat.get('p99'), '.3f')} | {_mean_ci(lat)} | {_fmt(thr.get('items_per_s'), ',.0f')} | "
            f"{_fmt((d.get('system') or {}).get('peak_rss_mb'), '.0f')} | "
            f"{_fmt(d['size_bytes'], ',')} | {executed} | {timer_cells(lat, thr)} |")
    lines += ["", TIMERS_NOTE]
    lines += [line for d in report["deployments"] if d.get("runtime_fusion") for line in ("", fusion_note(d))]
    lines += [line for d in report["deployments"] if d.get("float_graph") for line in ("", float_graph_note(d))]
    lines += diverging_markdown(report["deployments"])
    lines += speed_markdown(report["deployments"])
    lines += float_markdown(report["deployments"])
    compared = [d for d in report["deployments"] if d.get("vs_teacher")]
    if compared:
        primary = scols[0]
        lines += ["", "## Compared with the teacher on the same backend", "",
                  f"| stage | backend | smaller (file) | faster (p50 b1) | throughput | {_heads([primary])} Δ |",
                  "|---|---|---:|---:|---:|---:|"]
        for d in compared:
            v = d["vs_teacher"]
            lines.append(f"| {d['stage']} | {d['backend']} | {v['size_ratio']:.1f}× | "
                         f"{v['latency_speedup']:.1f}× | {v['throughput_ratio']:.1f}× | "
                         f"{v[f'{primary}_delta']:+.4f} |")
    env = report["environment"]
    threads = sorted({str(d["latency_ms"].get("threads")) for d in report["deployments"] if d.get("latency_ms")})
    lines += ["", f"threads: {', '.join(threads)} · "
              f"cpu: {env['cpu']} ({env['cores']} cores) · gpu: {env['gpu']} · torch {env['torch']} · "
              f"onnxruntime {env['onnxruntime']} · openvino {env['openvino']} · brevitas {env['brevitas']}", ""]
    return "\n".join(lines)


def add_teacher_ratios(deployments: list[dict], task=None) -> None:
    """Each deployment compared with the teacher's on the same backend (same run, same
    machine, so the ratios are what the numbers are good for on a noisy machine)."""
    teacher = {d["backend"]: d for d in deployments if d["stage"] == "teacher" and d["status"] == "ok"}
    for d in deployments:
        t = teacher.get(d["backend"])
        if d["stage"] == "teacher" or t is None or d["status"] != "ok":
            continue
        d["vs_teacher"] = {
            "size_ratio": t["size_bytes"] / d["size_bytes"],
            "latency_speedup": t["latency_ms"]["p50"] / d["latency_ms"]["p50"],
            "throughput_ratio": d["throughput"]["items_per_s"] / t["throughput"]["items_per_s"],
        }
        primary = get_task(task).primary
        d["vs_teacher"][f"{primary}_delta"] = d[primary] - t[primary]


def add_float_ratios(deployments: list[dict], primary: str = "accuracy") -> None:
    """Each quantized deployment against the float stage it was quantized from (the last fp32
    stage before it on the same backend): "my int8 model is not faster" answered per backend.
    primary: the task's metric, recorded for both rows (which one to ship is a trade the user makes)."""
    last_float: dict = {}
    for d in deployments:
        ok = d["status"] == "ok" and d.get("latency_ms") and d.get("throughput")
        if ok and d["precision"] == "fp32":
            last_float[d["backend"]] = d
        elif ok and d["backend"] in last_float:
            f = last_float[d["backend"]]
            d["vs_float"] = {"stage": f["stage"], "latency_speedup": f["latency_ms"]["p50"] / d["latency_ms"]["p50"],
                             "throughput_ratio": d["throughput"]["items_per_s"] / f["throughput"]["items_per_s"],
                             "artifact": f.get("artifact"), "metric": primary, "float_value": f.get(primary)}


def float_markdown(deployments: list[dict]) -> list[str]:
    rows = [d for d in deployments if d.get("vs_float")]
    if not rows:
        return []
    lines = ["", "## Quantized against its own float model on the same backend", "",
             "| stage | backend | float stage | faster (p50 b1) | throughput |", "|---|---|---|---:|---:|"]
    for d in rows:
        v = d["vs_float"]
        lines.append(f"| {d['stage']} | {d['backend']} | {v['stage']} | {v['latency_speedup']:.2f}× | "
                     f"{v['throughput_ratio']:.2f}× |")
    slower = [f"{d['stage']} @ {d['backend']}" for d in rows
              if min(d["vs_float"]["latency_speedup"], d["vs_float"]["throughput_ratio"]) < 1]
    if slower:
        lines += ["", f"slower than its float model at batch 1 or in throughput: {', '.join(slower)} "
                      f"(one run: below ~1 ms a call, batch-1 times swing between runs on shared or virtual "
                      f"machines; benchmarks/int8_vs_fp32.py repeats both in fresh processes)"]
    for d in rows:  # why a slower one is slower, where the runtime says
        between = (d.get("executed_precision") or {}).get("float_between_qdq")
        if between and f"{d['stage']} @ {d['backend']}" in slower:
            ops = ", ".join(f"{n} {op}" for op, n in between.items())
            lines += ["", f"{d['stage']} @ {d['backend']}: {ops} ran in float between DequantizeLinear and "
                          f"QuantizeLinear (no int8 kernel on this runtime: each pays a dequantize and a quantize "
                          f"pass that its float model does not)"]
    faster = [_float_faster(d) for d in rows]
    return lines + [line for note in faster if note for line in ("", note)]


def _float_faster(d: dict) -> str:
    """Where the float stage measured faster at batch 1 and in throughput: that it did, and both
    rows' metric, so the user can choose per backend."""
    v = d["vs_float"]
    if max(v["latency_speedup"], v["throughput_ratio"]) >= 1 or v.get("float_value") is None:
        return ""
    name = HEADERS.get(v["metric"], v["metric"])
    return (f"{d['stage']} @ {d['backend']}: its float model {v['stage']} measured faster here at batch 1 and in "
            f"throughput, at {name} {v['float_value']:.4f} against this row's {_fmt(d.get(v['metric']), '.4f')}: where "
            f"only {d['backend']} matters and that {name} is enough, {v['stage']}'s artifact "
            f"({v.get('artifact') or 'its row'}) is the faster file")


def write_report(run: RunIdentity, rows: list[dict], deployments: list[dict],
                 log: Callable[[str], None] = print, task=None) -> dict:
    """rows: the stage rows (metrics.json of each stage); deployments: deploy's rows; task: the
    run's compress.tasks.Task (its metrics are the tables' columns; None: classification)."""
    task = get_task(task)
    add_teacher_ratios(deployments, task)
    add_float_ratios(deployments, task.primary)
    env = environment()
    add_compute_rates(deployments, rows, env["hardware"])
    report = {
        "name": run.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_hash": run.config_hash,
        "environment": env,
        "stages": [{**{k: r.get(k) for k in STAGE_KEYS},
                    **{k: v for k, v in r.items() if k not in STAGE_KEYS and k not in PRIVATE_KEYS}}
                   for r in rows],
        "deployments": deployments,
        "task": task.name,
        "columns": task.columns(),
    }
    write_json(run.run_dir / "report.json", report)
    md = write_outputs(run.run_dir, report, {r["name"]: r.get("history") or [] for r in rows}, log)
    log("\n" + md)
    log(f"report: {run.run_dir / 'report.json'}, {run.run_dir / 'report.md'}")
    return report


CHARTS = {"pareto.png": "primary metric vs batch-1 latency", "sizes.png": "size, parameters and MACs per stage",
          "training.png": "training curves per stage"}


def write_outputs(run_dir: Path, report: dict, histories: dict[str, list[dict]],
                  log: Callable[[str], None] = print) -> str:
    """report.md, the charts and report.html, all from report.json's content (+ the stages'
    per-epoch histories) -> the markdown. Nothing is measured here."""
    md = to_markdown(report)
    atomic_write(run_dir / "report.md", lambda p: p.write_text(md))
    try:
        from compress import plots
    except ImportError as e:  # matplotlib is a dependency; a broken install still gets its tables
        log(f"charts skipped: {e} (pip install matplotlib)")
        return md
    from compress.report_html import render
    figs = {"pareto.png": plots.pareto_figure(report), "sizes.png": plots.sizes_figure(report),
            "training.png": plots.curves_figure(histories)}
    charts = {CHARTS[name]: _save_png(fig, run_dir / name) for name, fig in figs.items()}
    page = render(report, md, charts)
    atomic_write(run_dir / "report.html", lambda p: p.write_text(page))
    return md


def _save_png(fig, path: Path) -> bytes:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, lambda p: p.write_bytes(buf.getvalue()))
    return buf.getvalue()


def stage_histories(run_dir: Path, report: dict) -> dict[str, list[dict]]:
    """Each stage's per-epoch history from its NN-name/metrics.json (kept out of report.json)."""
    out = {}
    for s in report["stages"]:
        found = sorted(run_dir.glob(f"[0-9][0-9]-{s['name']}/metrics.json"))
        out[s["name"]] = (json.loads(found[-1].read_text()).get("history") or []) if found else []
    return out


def regenerate(run_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """`compress report RUN_DIR`: report.md, charts and report.html again from report.json."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise UserError(f"{path}: no report.json (expected a finished run directory, e.g. runs/NAME)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    write_outputs(path.parent, report, stage_histories(path.parent, report), log)
    return [path.parent / n for n in ("report.md", *CHARTS, "report.html") if (path.parent / n).exists()]
