"""What CI tools read from `compress bench`: github-action-benchmark JSON, JUnit XML, and a
markdown summary for $GITHUB_STEP_SUMMARY.

github-action-benchmark's custom tools take one direction per file (`tool:
customSmallerIsBetter` or `customBiggerIsBetter`), each a JSON list of BenchmarkResult
{name, value, unit, range?, extra?} with range and extra strings (src/extract.ts,
extractCustomBenchmarkResult), so `--json FILE` writes FILE (smaller is better: latency,
size) and FILE with `.bigger` before its suffix (bigger is better: throughput, accuracy,
agreement)."""
from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from compress.bench_baseline import Finding
from compress.bench_gate import METRICS


def bigger_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.bigger{path.suffix or '.json'}")


def _rows(result: dict):
    for dev, entry in result["devices"].items():
        for key, c in entry["cases"].items():
            for name, m in c.get("metrics", {}).items():
                if m.get("value") is not None:
                    yield dev, key, c, name, m


def github_benchmark(result: dict) -> tuple[list[dict], list[dict]]:
    """(smaller-is-better entries, bigger-is-better entries)."""
    smaller, bigger = [], []
    for dev, key, c, name, m in _rows(result):
        spec = METRICS[name]
        rounds = m.get("rounds") or []
        entry = {"name": f"{c['stage']} @ {c['backend']} [{dev}] {name}", "unit": spec.unit, "value": m["value"],
                 "range": f"± {float(np.std(rounds, ddof=1)):.4g}" if len(rounds) > 1 else "± 0",
                 "extra": f"device: {dev}\nprecision: {c.get('precision')}\nexecuted: {c.get('executed_precision')}\n"
                          f"rounds: {len(rounds)}"}
        (smaller if spec.lower_is_better else bigger).append(entry)
    return smaller, bigger


def write_github(path: Path, result: dict) -> list[Path]:
    smaller, bigger = github_benchmark(result)
    path.write_text(json.dumps(smaller, indent=2) + "\n")
    bigger_path(path).write_text(json.dumps(bigger, indent=2) + "\n")
    return [path, bigger_path(path)]


def write_junit(path: Path, findings: list[Finding]) -> None:
    """One testcase per (artifact, backend, metric); a failure element for each regression,
    an error for what could not be measured, skipped for a backend the device lacks."""
    suite = ET.Element("testsuite", name="compress bench")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for f in findings:
        cls = f"{f.device}.{f.stage}.{f.backend}"
        if f.status in ("unmeasured", "skipped"):
            tc = ET.SubElement(suite, "testcase", classname=cls, name="measure")
            kind = "error" if f.status == "unmeasured" else "skipped"
            ET.SubElement(tc, kind, message=f.reason or "")
            counts["tests"] += 1
            counts["errors" if kind == "error" else "skipped"] += 1
            continue
        for v in f.verdicts:
            tc = ET.SubElement(suite, "testcase", classname=cls, name=v.metric + (f" ({v.check})" if v.check else ""))
            counts["tests"] += 1
            if v.regressed:
                counts["failures"] += 1
                msg = [m for m in f.messages() if f" {v.metric} " in m]
                ET.SubElement(tc, "failure", message=msg[0] if msg else v.interval).text = v.interval
        for metric in [m for m in f.measured if m not in {v.metric for v in f.verdicts if not v.check}]:
            tc = ET.SubElement(suite, "testcase", classname=cls, name=metric)  # measured, nothing to compare with
            ET.SubElement(tc, "skipped", message="not compared: no baseline for this device, or not gated (--gate)")
            counts["tests"] += 1
            counts["skipped"] += 1
    for k, n in counts.items():
        suite.set(k, str(n))
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def summary_markdown(result: dict, findings: list[Finding], source: str) -> str:
    bad = [m for f in findings for m in f.messages()]
    statuses = {f.status for f in findings}
    head = ("❌ regression" if "regressed" in statuses else
            "⚠️ could not measure everything" if "unmeasured" in statuses else "✅ no regression")
    lines = [f"## compress bench: {result['run']} — {head}", "",
             f"{result['rounds']} interleaved rounds · compared with: {source}", ""]
    lines += [f"- {m}" for m in bad] + ([""] if bad else [])
    lines += ["| device | artifact | backend | status | accuracy | p50 ms | p90 ms | items/s | vs baseline p50 |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    by_case = {(f.device, f.case): f for f in findings}
    for dev, entry in result["devices"].items():
        for key, c in entry["cases"].items():
            m, f = c.get("metrics", {}), by_case.get((dev, key))
            p50 = next((v for v in (f.verdicts if f else []) if v.metric == "latency_p50_ms"), None)

            def val(name, spec):
                return format(m[name]["value"], spec) if m.get(name) else "—"
            lines.append(f"| `{dev}` | {c['stage']} | {c['backend']} | {f.status if f else c['status']} | "
                         f"{val('accuracy', '.4f')} | {val('latency_p50_ms', '.3f')} | {val('latency_p90_ms', '.3f')} "
                         f"| {val('throughput', ',.0f')} | {p50.interval if p50 else '—'} |")
    return "\n".join(lines) + "\n"


def console(findings: list[Finding], source: str) -> list[str]:
    lines = [m for f in findings for m in f.messages()]
    n = sum(len(f.verdicts) for f in findings)
    noisy = [f"{f.device}: {f.stage} on {f.backend}: {v.metric}: {v.reason} ({v.interval})"
             for f in findings for v in f.verdicts if not v.regressed and v.reason]
    return lines + noisy + [f"compared with {source}: {n} checks, "
                            f"{sum(f.status == 'regressed' for f in findings)} regressed case(s)"]
