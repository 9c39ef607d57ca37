"""`compress compare`: on two tiny runs the test makes (prune ratio 0.5 vs 0.25), every delta
is B's number minus A's from the two report.json files; the latency noise is "unknown"
without bench results and judged by bench_gate's interval with them; `compress report`
regenerates the same report.md from report.json."""
import json

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from compress.compare import compare
from compress.config_load import load_config
from compress.pipeline import Pipeline


def config(out, ratio):
    return {"name": "cmp", "seed": 0,
            "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 64,
                     "synthetic": {"train_size": 256, "test_size": 64, "image_size": 16}},
            "teacher": {"model": "resnet_tiny_teacher",
                        "train": {"epochs": 1, "lr": 0.01, "optimizer": "adamw", "augment": False}},
            "student": {"model": "resnet_tiny"},
            "stages": [{"kind": "prune", "ratio": ratio, "round_to": 4, "epochs": 0.25, "augment": False}],
            "export": {"stages": ["teacher", "prune"]},
            "targets": [{"backend": "onnxruntime", "threads": 1}],
            "profile": {"warmup": 0, "max_warmup": 0, "runs": 100, "throughput_batch": 4, "throughput_runs": 2},
            "output": {"dir": str(out)}}


def make_run(root, ratio):
    root.mkdir()
    (root / "c.yaml").write_text(yaml.safe_dump(config(root, ratio)))
    Pipeline(load_config(root / "c.yaml"), log=lambda _: None).run()
    return root / "cmp"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    return make_run(base / "a", 0.5), make_run(base / "b", 0.25)


def reports(a, b):
    return [json.loads((d / "report.json").read_text()) for d in (a, b)]


def test_deltas_are_b_minus_a(two_runs):
    a, b = two_runs
    rows, md = compare([a, b])
    ra, rb = reports(a, b)
    dep = [{(d["stage"], d["backend"]): d for d in r["deployments"]} for r in (ra, rb)]
    params = [{s["name"]: s["params"] for s in r["stages"]} for r in (ra, rb)]
    assert [(r["stage"], r["backend"]) for r in rows] == [("teacher", "onnxruntime"), ("prune", "onnxruntime")]
    for r in rows:
        da, db = dep[0][(r["stage"], r["backend"])], dep[1][(r["stage"], r["backend"])]
        assert r["metric"] == "accuracy"
        assert r["metric_delta"] == pytest.approx(db["accuracy"] - da["accuracy"])
        assert r["agreement_delta"] == pytest.approx(db["agreement"] - da["agreement"])
        assert r["p50_delta"] == pytest.approx(db["latency_ms"]["p50"] - da["latency_ms"]["p50"])
        assert r["throughput_ratio"] == pytest.approx(db["throughput"]["items_per_s"] / da["throughput"]["items_per_s"])
        assert r["size_delta"] == db["size_bytes"] - da["size_bytes"]
        assert r["params_delta"] == params[1][r["stage"]] - params[0][r["stage"]]
        assert r["noise"] == "unknown" and r["source"] == "report.json"
        assert f"{r['size_a']:,} → {r['size_b']:,} ({r['size_delta']:+,})" in md
    teacher, prune = rows
    # same seed, same teacher config: the teacher is the same model, file and accuracy
    assert teacher["params_delta"] == 0 and teacher["metric_delta"] == 0 and teacher["size_delta"] == 0
    # pruning a quarter instead of half the channels keeps more parameters and a bigger file
    # (2,830 vs 2,102 params here), and each kept fp32 weight is 4 more bytes of model.onnx
    assert prune["params_delta"] > 500
    assert 3.5 * prune["params_delta"] < prune["size_delta"] < 4.5 * prune["params_delta"]
    assert "latency noise unknown: report.json holds percentiles only" in md
    assert "measured only in" not in md  # the same stages and backend in both


def bench_json(run_dir, rounds: dict, created="2999-01-01T00:00:00+00:00"):
    """What `compress bench` leaves in a run (bench.json), with the given p50 rounds per case."""
    cases = {k: {"metrics": {"latency_p50_ms": {"value": sorted(v)[len(v) // 2], "rounds": v}}}
             for k, v in rounds.items()}
    (run_dir / "bench.json").write_text(json.dumps({"created": created, "devices": {"box": {"cases": cases}}}))


def test_latency_noise_from_bench_rounds(two_runs):
    a, b = two_runs
    try:
        slow = [2.0, 2.1, 1.9, 2.05, 1.95]
        bench_json(a, {"teacher/onnxruntime": [1.0, 1.1, 0.9, 1.05, 0.95],
                       "prune/onnxruntime": [1.0, 1.4, 0.7, 1.2, 0.9]})
        bench_json(b, {"teacher/onnxruntime": slow, "prune/onnxruntime": [1.1, 0.8, 1.3, 0.9, 1.0]})
        rows, md = compare([a, b])
        teacher, prune = rows
        assert teacher["source"] == "bench box" and teacher["noise"] == "outside"
        assert teacher["ratio"] == pytest.approx(2.0) and teacher["interval"][0] > 1
        assert teacher["p50_a"] == pytest.approx(1.0) and teacher["p50_b"] == pytest.approx(2.0)
        assert teacher["p50_delta"] == pytest.approx(1.0)
        assert prune["noise"] == "within" and prune["interval"][0] < 1 < prune["interval"][1]
        assert "outside (ratio 2.000, 95% CI [" in md
        bench_json(a, {"teacher/onnxruntime": slow}, created="2000-01-01T00:00:00+00:00")  # older than the run
        assert compare([a, b])[0][0]["noise"] == "unknown"
    finally:
        for d in (a, b):
            (d / "bench.json").unlink(missing_ok=True)


def test_cli_compare_and_report(two_runs, tmp_path):
    a, b = two_runs
    res = CliRunner().invoke(app, ["compare", str(a), str(b), "--json", str(tmp_path / "rows.json")])
    assert res.exit_code == 0, res.output
    assert "| prune | onnxruntime |" in res.output
    assert json.loads((tmp_path / "rows.json").read_text()) == json.loads(json.dumps(compare([a, b])[0]))
    res = CliRunner().invoke(app, ["compare", str(a), str(tmp_path)])
    assert res.exit_code == 2 and "no report.json" in res.output
    md = (a / "report.md").read_text()
    for name in ("report.md", "pareto.png", "report.html"):
        (a / name).unlink()
    res = CliRunner().invoke(app, ["report", str(a)])
    assert res.exit_code == 0, res.output
    assert (a / "report.md").read_text() == md  # from report.json alone: the same markdown
    assert (a / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (a / "report.html").is_file()
