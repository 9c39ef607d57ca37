"""The charts and report.html of a tiny run the test makes: the plotted points are the
report's rows (read back from the figure's artists, not from pixels), the frontier is the
Pareto set, report.html is self-contained, and (slow) headless Chromium renders it."""
import base64
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from compress import plots
from compress.config_load import load_config
from compress.pipeline import Pipeline
from tests.compress.test_compare import config

BACKENDS = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    cfg = {**config(root, 0.5), "targets": [{"backend": b, "threads": 1} for b in BACKENDS]}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    Pipeline(load_config(root / "c.yaml"), log=lambda _: None).run()
    run_dir = root / "cmp"
    return run_dir, json.loads((run_dir / "report.json").read_text())


def by_gid(artists, gid):
    found = [a for a in artists if a.get_gid() == gid]
    assert len(found) == 1, gid
    return found[0]


def test_pareto_points_are_the_reports_rows(tiny):
    run_dir, report = tiny
    ax = plots.pareto_figure(report).axes[0]
    assert ax.get_ylabel() == "accuracy" and ax.get_xscale() == "log"
    for backend in BACKENDS:
        rows = [d for d in report["deployments"] if d["backend"] == backend]
        assert [d["stage"] for d in rows] == ["teacher", "prune"] and all(d["status"] == "ok" for d in rows)
        sc = by_gid(ax.collections, f"backend:{backend}")
        np.testing.assert_allclose(sc.get_offsets(), [[d["latency_ms"]["p50"], d["accuracy"]] for d in rows])
        np.testing.assert_allclose(sc.get_sizes(), [max(25.0, 60.0 * d["size_bytes"] / 1e6) for d in rows])
    teacher = [d for d in report["deployments"] if d["stage"] == "teacher"]
    np.testing.assert_allclose(by_gid(ax.collections, "teacher").get_offsets(),
                               [[d["latency_ms"]["p50"], d["accuracy"]] for d in teacher])
    # the frontier: every point no other point beats on both axes (brute force), fastest first
    pts = [(d["latency_ms"]["p50"], d["accuracy"]) for d in report["deployments"]]
    pareto = sorted(p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in pts))
    line = by_gid(ax.get_lines(), "frontier")
    np.testing.assert_allclose(np.c_[line.get_xdata(), line.get_ydata()], pareto)
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written by the run


def test_frontier_follows_the_tasks_direction():
    """RMSE (regression): lower is better, so the frontier keeps the low-error points."""
    dep = [{"stage": s, "backend": "onnxruntime", "status": "ok", "rmse": e, "size_bytes": 10**6,
            "latency_ms": {"p50": t}} for s, t, e in (("teacher", 3.0, 0.10), ("a", 1.0, 0.30), ("b", 2.0, 0.20),
                                                      ("c", 2.5, 0.40))]
    report = {"name": "r", "task": "regression", "deployments": dep}
    line = by_gid(plots.pareto_figure(report).axes[0].get_lines(), "frontier")
    assert list(zip(line.get_xdata(), line.get_ydata())) == [(1.0, 0.30), (2.0, 0.20), (3.0, 0.10)]
    assert plots.pareto_figure(report).axes[0].get_ylabel() == "RMSE"


def test_size_bars_and_training_curves_are_the_reports_numbers(tiny):
    run_dir, report = tiny
    fig = plots.sizes_figure(report)
    for key, _, scale in plots.SIZE_PANELS:
        bars = [p for ax in fig.axes for p in ax.patches if p.get_gid() == f"bars:{key}"]
        assert [b.get_height() for b in bars] == pytest.approx([s[key] * scale for s in report["stages"]])
    hist = json.loads((run_dir / "01-prune" / "metrics.json").read_text())["history"]
    assert hist, "the prune stage recorded no epochs"
    fig = plots.curves_figure({"prune": hist})
    lines = [ln for ax in fig.axes for ln in ax.get_lines()]
    for key in ("loss", "train_accuracy"):
        assert list(by_gid(lines, f"prune:{key}").get_ydata()) == pytest.approx([h[key] for h in hist])
    assert not any(ln.get_gid() == "prune:prune_step" for ln in lines)  # a counter, not a curve


def key_numbers(report) -> list[str]:
    """Numbers a reader looks for, formatted as report.md prints them."""
    out = [f"{s['params']:,}" for s in report["stages"]]
    for d in report["deployments"]:
        out += [f"{d['accuracy']:.4f}", f"{d['latency_ms']['p50']:.3f}", f"{d['size_bytes']:,}"]
    return out


def test_report_html_is_self_contained_with_tables_and_charts(tiny):
    run_dir, report = tiny
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') == 3
    for chunk in page.split('src="data:image/png;base64,')[1:]:
        assert base64.b64decode(chunk.split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("<table>") == 3  # stages, deployments, compared with the teacher
    for n in key_numbers(report):
        assert n in page, n


def chromium() -> str:
    """The browser, installed with apt-get when missing (skips with the reason where it cannot be)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium missing and cannot be installed here (needs root and apt-get): apt-get install chromium")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode:
            pytest.skip(f"chromium missing; `{' '.join(cmd)}` failed: {res.stderr.strip()[-300:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


@pytest.mark.slow
def test_chromium_renders_report_html(tiny, tmp_path):
    from PIL import Image
    run_dir, report = tiny
    browser = chromium()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (run_dir / "report.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    for n in key_numbers(report):
        assert n in dom.stdout, n
    shot = tmp_path / "shot.png"
    res = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", url],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-500:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (2400, 1280)
    assert img.std() > 20  # a blank page (all white) has 0; text, tables and charts give ~50-60
    assert (img < 128).mean() > 0.01  # dark pixels: text, grid lines, markers
    if os.environ.get("REPORT_SCREENSHOT"):  # keep it for a person to look at
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])


def test_a_pipe_inside_a_cell_stays_in_its_cell():
    """Reasons such as TensorRT's "max |diff| ..." are escaped in report.md and unescaped in the page."""
    from compress.report import to_markdown
    from compress.report_html import markdown_to_html
    dep = {"stage": "s", "backend": "tensorrt", "precision": "fp32", "status": "skipped", "size_bytes": None,
           "reason": "ONNX check: max |diff| 0.1 on ORT"}
    md = to_markdown({"name": "r", "created": "now", "config_hash": "h", "stages": [], "deployments": [dep],
                      "environment": {k: "x" for k in ("cpu", "cores", "gpu", "torch", "onnxruntime", "openvino",
                                                       "brevitas")}})
    assert "max \\|diff\\| 0.1 on ORT |" in md
    row = markdown_to_html(md).split("<tr>")[-1]  # 17 columns, as the header has
    assert row.count("<td") == 17 and "<td>ONNX check: max |diff| 0.1 on ORT</td>" in row
