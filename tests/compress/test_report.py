"""`export.stages` (only the named stages are exported and deployed) and report.md: its
Stages, Deployments and Compared-with-the-teacher tables show report.json's numbers."""
import json
import re

import pytest
import yaml

from compress.config_load import load_config
from compress.pipeline import Pipeline

BACKENDS = ["onnxruntime", "openvino"]
EXPORTS = ("model.onnx", "model.xml", "manifest.json")


def config(out, export_stages):
    return {"name": "rep", "seed": 0,
            "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 64,
                     "synthetic": {"train_size": 256, "test_size": 64, "image_size": 16}},
            "teacher": {"model": "resnet_tiny_teacher",
                        "train": {"epochs": 1, "lr": 0.01, "optimizer": "adamw", "augment": False}},
            "student": {"model": "resnet_tiny"},
            "stages": [{"kind": "distill", "epochs": 0.5, "lr": 0.01, "augment": False},
                       {"kind": "prune", "ratio": 0.5, "round_to": 4, "epochs": 0.25, "augment": False}],
            "export": {"stages": export_stages},
            "targets": [{"backend": b, "threads": 1} for b in BACKENDS],
            "profile": {"warmup": 0, "max_warmup": 0, "runs": 100, "throughput_batch": 4, "throughput_runs": 2,
                        "vendor_seconds": 0, "throughput_search": False},
            "output": {"dir": str(out)}}


def run(out, export_stages):
    logs = []
    (out / "c.yaml").write_text(yaml.safe_dump(config(out, export_stages)))
    returned = Pipeline(load_config(out / "c.yaml"), log=logs.append).run()
    report = json.loads((out / "rep" / "report.json").read_text())  # what tools and CI read
    assert report == json.loads(json.dumps(returned))
    return report, (out / "rep" / "report.md").read_text(), logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run twice: teacher and prune exported; then distill alone (stages reused)."""
    out = tmp_path_factory.mktemp("report")
    first = run(out, ["teacher", "prune"])
    not_exported = [f for f in EXPORTS if not (out / "rep" / "01-distill" / f).exists()]
    second = run(out, ["distill"])
    return out / "rep", (*first, not_exported), second


def table(md: str, heading: str) -> list[list[str]]:
    """The cells of the table under a '## heading' (header and separator rows left out)."""
    section = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def num(cell: str) -> float:
    return float(re.sub(r"[,×]", "", cell))


def test_only_named_stages_are_exported_and_deployed(runs):
    run_dir, (report, _, _, not_exported), _ = runs
    assert [s["name"] for s in report["stages"]] == ["teacher", "distill", "prune"]  # all trained
    assert not_exported == list(EXPORTS)  # distill: trained and saved, not exported
    assert [(d["stage"], d["backend"]) for d in report["deployments"]] == [
        (s, b) for s in ("teacher", "prune") for b in BACKENDS]
    for sdir, exported in (("00-teacher", True), ("02-prune", True)):
        assert all((run_dir / sdir / f).is_file() for f in EXPORTS) == exported, sdir


def test_a_second_run_exports_another_stage_and_reuses_the_trained_ones(runs):
    run_dir, _, (report, md, logs) = runs
    assert all(f"[{s}] up to date, skipped" in logs for s in ("teacher", "distill", "prune"))
    assert [(d["stage"], d["backend"]) for d in report["deployments"]] == [("distill", b) for b in BACKENDS]
    assert all((run_dir / "01-distill" / f).is_file() for f in EXPORTS)
    assert [r[0] for r in table(md, "Deployments")] == ["distill", "distill"]
    assert "## Compared with the teacher" not in md  # no teacher row to compare with


def test_stages_table_shows_report_json(runs):
    _, (report, md, _, _), _ = runs
    rows = table(md, "Stages (torch)")
    assert [r[0] for r in rows] == [s["name"] for s in report["stages"]]
    for cells, s in zip(rows, report["stages"]):
        assert num(cells[1]) == pytest.approx(s["accuracy"], abs=5e-5)
        assert (num(cells[2]), num(cells[3]), num(cells[4])) == (s["params"], s["macs"], s["size_bytes"])
        assert num(cells[5]) == pytest.approx(s["seconds"], abs=0.5)
    params = {s["name"]: s["params"] for s in report["stages"]}
    assert params["prune"] < params["distill"] < params["teacher"]


def test_deployments_table_shows_report_json(runs):
    _, (report, md, _, _), _ = runs
    rows = table(md, "Deployments (measured on the runtime)")
    assert [(r[0], r[1]) for r in rows] == [(d["stage"], d["backend"]) for d in report["deployments"]]
    for cells, d in zip(rows, report["deployments"]):
        assert d["status"] == "ok", d["reason"]
        assert cells[2:4] == [d["precision"], d["status"]]
        assert num(cells[4]) == pytest.approx(d["accuracy"], abs=5e-5)
        assert num(cells[5]) == pytest.approx(d["agreement"], abs=5e-5)
        assert num(cells[6]) == pytest.approx(d["max_abs_diff"], rel=0.01, abs=1e-30)
        lat = d["latency_ms"]
        assert num(cells[7]) == pytest.approx(lat["p50"], abs=5e-4)
        assert num(cells[8]) == pytest.approx(lat["p99"], abs=5e-4)
        mean, ci = (float(v) for v in cells[9].split("±"))
        assert mean == pytest.approx(lat["mean"], abs=5e-4) and ci == pytest.approx(lat["ci95"], abs=5e-4)
        assert num(cells[10]) == pytest.approx(d["throughput"]["items_per_s"], abs=0.5)
        assert num(cells[12]) == d["size_bytes"]
        assert cells[13] == d["executed_precision"]["summary"]
        # profile.vendor_seconds: 0 and throughput_search: false (these runs) reach the harness
        assert lat["vendor"] is None and d["throughput"]["mode"] == "sequential"


def test_compared_with_teacher_table_shows_report_json_and_its_ratios_are_right(runs):
    _, (report, md, _, _), _ = runs
    rows = table(md, "Compared with the teacher on the same backend")
    by = {(d["stage"], d["backend"]): d for d in report["deployments"]}
    assert [(r[0], r[1]) for r in rows] == [("prune", b) for b in BACKENDS]
    for cells in rows:
        d, t = by[(cells[0], cells[1])], by[("teacher", cells[1])]
        v = d["vs_teacher"]
        # the ratios are of the two rows' own numbers, same backend, same run
        assert v["size_ratio"] == pytest.approx(t["size_bytes"] / d["size_bytes"])
        assert v["latency_speedup"] == pytest.approx(t["latency_ms"]["p50"] / d["latency_ms"]["p50"])
        thr = d["throughput"]["items_per_s"] / t["throughput"]["items_per_s"]
        assert v["throughput_ratio"] == pytest.approx(thr)
        assert v["accuracy_delta"] == pytest.approx(d["accuracy"] - t["accuracy"])
        assert v["size_ratio"] > 1.5  # half the channels of a smaller net: a much smaller file
        for cell, key in zip(cells[2:5], ("size_ratio", "latency_speedup", "throughput_ratio")):
            assert num(cell) == pytest.approx(v[key], abs=0.05 + 1e-9)
        assert num(cells[5]) == pytest.approx(v["accuracy_delta"], abs=5e-5)


def test_size_is_the_deployed_artifact_itself(runs):
    """ONNX rows count the self-contained model.onnx alone (not OpenVINO's model.bin beside
    it); IR rows count model.xml + model.bin."""
    run_dir, (report, _, _, _), _ = runs
    folders = {"teacher": "00-teacher", "prune": "02-prune"}
    for d in report["deployments"]:
        sdir = run_dir / folders[d["stage"]]
        files = {"onnxruntime": ["model.onnx"], "openvino": ["model.xml", "model.bin"]}[d["backend"]]
        assert d["size_bytes"] == sum((sdir / f).stat().st_size for f in files), d["backend"]


def test_speed_choices_are_shown_with_their_times():
    from compress.report import speed_markdown
    d = {"stage": "quantize", "backend": "onnxruntime",
         "speed_precision": {"margin": 0.03, "float_layers": ["stem"], "layers": {
             "stem": {"precision": "fp32", "int8_score": 0.52, "float_score": 0.14, "why": "float 3.7x as fast"},
             "fc": {"precision": "int8", "int8_score": 0.14, "float_score": 0.141, "why": "int8 not slower"}}},
         "runtime": {"static_shapes": {"1": {"shape": "static", "dynamic_ms": 0.092, "static_ms": 0.076}},
                     "latency_threads": {"1": {"threads": 1, "configured_threads": 2, "configured_ms": 0.2,
                                               "one_thread_ms": 0.113}}}}
    text = "\n".join(speed_markdown([d, {"stage": "distill", "backend": "openvino"}]))
    assert "batch 1 runs on 1 thread(s), chosen by measurement (0.200 ms on 2, 0.113 ms on 1)" in text
    assert "| `stem` | fp32 | 0.5200 | 0.1400 | float 3.7x as fast |" in text
    assert "| `fc` | int8 |" in text
    assert "batch 1: static (0.092 ms dynamic, 0.076 ms static)" in text
    assert "distill" not in text  # rows without choices add nothing


def test_quantized_rows_are_compared_with_their_own_float_stage():
    from compress.report import add_float_ratios, float_markdown

    def row(stage, backend, precision, p50, items, status="ok"):
        return {"stage": stage, "backend": backend, "precision": precision, "status": status,
                "latency_ms": {"p50": p50}, "throughput": {"items_per_s": items}}
    rows = [row("teacher", "onnxruntime", "fp32", 1.5, 700), row("prune", "onnxruntime", "fp32", 0.10, 16000),
            row("prune", "openvino", "fp32", 0.15, 16000), row("quantize", "onnxruntime", "int8", 0.08, 25000),
            row("quantize", "openvino", "int8", 0.30, 32000),
            row("quantize", "tensorrt", "int8", None, None, "skipped")]
    add_float_ratios(rows)
    ort, ov = rows[3]["vs_float"], rows[4]["vs_float"]
    assert ort["stage"] == "prune" and ort["latency_speedup"] == pytest.approx(1.25)
    assert ort["throughput_ratio"] == pytest.approx(25000 / 16000)
    assert ov["latency_speedup"] == pytest.approx(0.5) and "vs_float" not in rows[5]
    assert all("vs_float" not in r for r in rows[:3])  # float rows are the reference, not compared
    md = float_markdown(rows)
    assert "| quantize | onnxruntime | prune | 1.25× | 1.56× |" in md
    assert any(line.startswith("slower than its float model at batch 1 or in throughput: quantize @ openvino")
               for line in md)
    assert not any("measured faster here" in line for line in md)  # openvino's int8 row has the throughput


def test_a_float_stage_faster_on_both_counts_is_named_with_both_metrics():
    from compress.report import add_float_ratios, float_markdown
    rows = [{"stage": "prune", "backend": "onnxruntime", "precision": "fp32", "status": "ok", "accuracy": 0.7394,
             "latency_ms": {"p50": 0.137}, "throughput": {"items_per_s": 16931}, "artifact": "02-prune/model.onnx"},
            {"stage": "quantize", "backend": "onnxruntime", "precision": "int8", "status": "ok", "accuracy": 0.7478,
             "latency_ms": {"p50": 0.180}, "throughput": {"items_per_s": 16545}}]
    add_float_ratios(rows, "accuracy")
    md = "\n".join(float_markdown(rows))
    assert ("quantize @ onnxruntime: its float model prune measured faster here at batch 1 and in throughput, at "
            "accuracy 0.7394 against this row's 0.7478") in md and "(02-prune/model.onnx) is the faster file" in md
