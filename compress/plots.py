"""The report's charts, drawn headless (Agg) from report.json and the stages' histories.

Each figure function returns the Figure and leaves its data on the artists (scatter offsets
and sizes, line data, bar heights, each with a gid), so tests and tools read the plotted
numbers back from the figure itself rather than from pixels."""
from __future__ import annotations

import math

from compress.tasks import HEADERS, TABLE

# Marker area (points^2) per MB of artifact: a 5 MB fp32 teacher ~ 300 pt^2, a 0.3 MB int8
# student still ~ 40 pt^2 (the floor keeps tiny artifacts visible).
AREA_PER_MB, MIN_AREA = 60.0, 25.0
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def primary(report: dict) -> tuple[str, bool]:
    """The task's primary metric and its direction (reports from before tasks: accuracy)."""
    task = TABLE.get(report.get("task") or "classification", TABLE["classification"])
    return task.primary, task.higher_is_better


def points(report: dict) -> list[dict]:
    """Measured deployments as plot points: stage, backend, b1 p50 ms, primary metric, size."""
    key, _ = primary(report)
    out = []
    for d in report["deployments"]:
        lat = d.get("latency_ms") or {}
        if d.get("status") == "ok" and lat.get("p50") is not None and d.get(key) is not None:
            out.append({"stage": d["stage"], "backend": d["backend"], "p50_ms": lat["p50"],
                        "metric": d[key], "size_bytes": d["size_bytes"]})
    return out


def frontier(pts: list[dict], higher_is_better: bool) -> list[dict]:
    """Pareto-optimal points (no other point is both faster and better), fastest first."""
    sign = 1 if higher_is_better else -1
    best, out = -math.inf, []
    for p in sorted(pts, key=lambda p: (p["p50_ms"], -sign * p["metric"])):
        if sign * p["metric"] > best:
            out.append(p)
            best = sign * p["metric"]
    return out


def area(size_bytes: int) -> float:
    return max(MIN_AREA, AREA_PER_MB * size_bytes / 1e6)


def pareto_figure(report: dict, teacher: str = "teacher"):
    """Primary metric vs batch-1 p50 latency: one scatter per backend (gid "backend:NAME"),
    marker area from the file size, the frontier (gid "frontier"), the teacher ringed (gid "teacher")."""
    key, higher = primary(report)
    pts = points(report)
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for i, backend in enumerate(dict.fromkeys(p["backend"] for p in pts)):
        mine = [p for p in pts if p["backend"] == backend]
        sc = ax.scatter([p["p50_ms"] for p in mine], [p["metric"] for p in mine],
                        s=[area(p["size_bytes"]) for p in mine],
                        color=COLORS[i % len(COLORS)], alpha=0.7, label=backend, edgecolors="black", linewidths=0.5)
        sc.set_gid(f"backend:{backend}")
        for p in mine:
            ax.annotate(p["stage"], (p["p50_ms"], p["metric"]), xytext=(4, 4), textcoords="offset points", fontsize=8)
    front = frontier(pts, higher)
    if front:
        ax.step([p["p50_ms"] for p in front], [p["metric"] for p in front], where="post", color="gray",
                linestyle="--", label="frontier", gid="frontier")
    tp = [p for p in pts if p["stage"] == teacher]
    if tp:
        ax.scatter([p["p50_ms"] for p in tp], [p["metric"] for p in tp], s=[area(p["size_bytes"]) * 2.5 for p in tp],
                   facecolors="none", edgecolors="black", linewidths=1.5, label=teacher, gid="teacher")
    ax.set_xscale("log")
    ax.margins(0.1)  # room for the labels of the extreme points
    ax.set_xlabel("batch-1 latency p50 (ms, log)")
    ax.set_ylabel(HEADERS.get(key, key))
    ax.set_title(f"{report['name']}: {HEADERS.get(key, key)} vs latency (marker area: file size)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, markerscale=0.5)
    return fig


SIZE_PANELS = (("size_bytes", "weights (MB)", 1e-6), ("params", "parameters (M)", 1e-6), ("macs", "MACs (M)", 1e-6))


def sizes_figure(report: dict):
    """Per stage: weight bytes, parameters and MACs, one panel each (each bar's gid "bars:KEY")."""
    fig = _figure(9, 3.2)
    names = [s["name"] for s in report["stages"]]
    for ax, (key, label, scale) in zip(fig.subplots(1, len(SIZE_PANELS)), SIZE_PANELS):
        vals = [(s.get(key) or 0) * scale for s in report["stages"]]
        bars = ax.bar(names, vals, color=COLORS[0])
        for b in bars:
            b.set_gid(f"bars:{key}")
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return fig


NOT_CURVES = ("epoch", "steps", "seconds", "prune_step")  # counters and timings, not training signals


def curves_figure(histories: dict[str, list[dict]]):
    """Per stage with a history: loss terms (left axis) and accuracy-like values (right axis)
    per epoch; each line's gid is "STAGE:KEY"."""
    staged = {k: v for k, v in histories.items() if v}
    fig = _figure(4 * max(1, len(staged)), 3.4)
    if not staged:
        fig.text(0.5, 0.5, "no training history", ha="center")
        return fig
    for ax, (stage, hist) in zip(fig.subplots(1, len(staged), squeeze=False)[0], staged.items()):
        # x: the epoch's position in the stage (a prune stage repeats epochs 1..n per pruning step)
        x = list(range(1, len(hist) + 1))
        keys = [k for k in dict.fromkeys(k for h in hist for k in h)
                if k not in NOT_CURVES and all(isinstance(h.get(k, 0.0), (int, float)) for h in hist)]
        right = ax.twinx()
        for k in keys:
            target = right if ("accuracy" in k or k.startswith("val_")) else ax
            target.plot(x, [h.get(k, math.nan) for h in hist], marker="o", markersize=3, label=k, gid=f"{stage}:{k}",
                        linestyle=":" if target is right else "-")
        for i in range(1, len(hist)):  # pruning steps: where the network was cut again
            if hist[i].get("prune_step") != hist[i - 1].get("prune_step"):
                ax.axvline(i + 0.5, color="gray", linewidth=0.8, linestyle="--")
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("epoch" + (" (dashed: next pruning step)" if any("prune_step" in h for h in hist) else ""))
        ax.set_ylabel("loss terms")
        right.set_ylabel("accuracy / val metric")
        lines = [ln for ln in ax.get_lines() + right.get_lines() if ln.get_gid()]  # not the step markers
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="center right")
    return fig

