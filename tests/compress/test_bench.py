"""compress bench: the gate on fabricated results (slower fails naming device, artifact and
metric; equal and noisy pass; accuracy under the floor fails with no baseline), the exact
Mann-Whitney distribution it rests on, the CI outputs, baseline/history files, and the whole
command on a short real run (an FP32 model posing as the int8 one is flagged)."""
import json
import re
import shlex
import shutil
from xml.etree import ElementTree as ET

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from compress import bench_output
from compress.bench import add_relative
from compress.bench_baseline import (
    OK,
    REGRESSION,
    UNMEASURED,
    append_history,
    exit_code,
    judge,
    read_baseline,
    read_history,
    update_baseline,
)
from compress.bench_gate import _u_cdf, ratio_interval
from tests.conftest import ROOT

BASE = [1.00, 1.02, 0.99, 1.01, 1.00]
TEACHER = [2.00, 2.03, 1.98, 2.02, 2.00]


def _case(stage, rounds, accuracy, size, precision, status="ok"):
    metrics = {"latency_p50_ms": {"value": sorted(rounds)[len(rounds) // 2], "rounds": list(rounds)},
               "throughput": {"value": 1000 / rounds[0], "rounds": [1000 / r for r in rounds]},
               "accuracy": {"value": accuracy}, "agreement": {"value": 1.0}, "size_bytes": {"value": size}}
    return {"stage": stage, "backend": "onnxruntime", "precision": precision, "status": status, "reason": None,
            "artifact": f"{stage}/model.onnx", "executed_precision": f"{precision} 7/7", "metrics": metrics}


def result(rounds=BASE, accuracy=0.95, device="dev-a", teacher=0.96, status="ok", size=1000, teacher_rounds=TEACHER):
    """A bench of a teacher and its int8 student on one backend of one device."""
    cases = {"teacher/onnxruntime": _case("teacher", teacher_rounds, teacher, 4000, "fp32"),
             "quantize/onnxruntime": _case("quantize", rounds, accuracy, size, "int8", status)}
    add_relative(cases, "teacher")
    return {"created": "2026-01-01T00:00:00+00:00", "run": "tiny", "rounds": len(rounds), "teacher_accuracy": teacher,
            "devices": {device: {"fingerprint": {"cpu": "test"}, "cases": cases}}}


def student(findings):
    (f,) = [f for f in findings if f.stage == "quantize"]
    return f


def as_baseline(res):
    return {"format": 1, "devices": res["devices"]}


def test_mann_whitney_distribution_matches_the_table():
    # n = m = 5: partitions of u into at most 5 parts of at most 5 -> 1, 1, 2, 3, 5 of C(10, 5) = 252
    cdf = _u_cdf(5, 5)
    assert [round(p * 252) for p in cdf[:5]] == [1, 2, 4, 7, 12]
    assert cdf[-1] == pytest.approx(1.0)
    # the two-sided 5% critical value of U for 5 vs 5 is 2 (standard tables): the interval is
    # the 3rd smallest to the 3rd largest of the 25 pairwise log-ratios
    est, lo, hi = ratio_interval([2.0] * 5, [1.0] * 5)
    assert (est, lo, hi) == pytest.approx((2.0, 2.0, 2.0))
    assert ratio_interval([1, 2, 3], [1, 2, 3])[1:] == (0.0, float("inf"))  # 3 vs 3 cannot reach 95%


def test_a_slower_result_fails_naming_device_artifact_and_metric():
    slow = result([r * 1.3 for r in BASE])
    findings = judge(slow, as_baseline(result()), {}, floor=0.9, gate="both")
    assert exit_code(findings) == REGRESSION
    msgs = student(findings).messages()
    lat = [m for m in msgs if "latency_p50_ms" in m]
    assert lat and lat[0].startswith("dev-a: quantize on onnxruntime: latency_p50_ms regressed: baseline 1 -> 1.3 ms")
    assert "ratio 1.300, 95% CI [1.2" in lat[0] and "tolerance 10%" in lat[0]
    rel = [m for m in msgs if "latency_p50_vs_teacher" in m]
    assert rel and "baseline 0.5 -> 0.65 x teacher (ratio 1.300" in rel[0]
    assert any("throughput" in m for m in msgs)  # bigger is better: fewer items/s regress too
    # the default gate (relative to the teacher) flags it as well
    assert exit_code(judge(slow, as_baseline(result()), {}, floor=0.9)) == REGRESSION


def test_a_machine_slowed_by_other_tenants_passes_the_relative_gate_only():
    loaded = result([r * 1.5 for r in BASE], teacher_rounds=[t * 1.5 for t in TEACHER])
    assert exit_code(judge(loaded, as_baseline(result()), {}, floor=0.9)) == OK
    findings = judge(loaded, as_baseline(result()), {}, floor=0.9, gate="absolute")
    assert exit_code(findings) == REGRESSION
    assert {f.stage for f in findings if f.status == "regressed"} == {"teacher", "quantize"}


def test_equal_passes_and_a_faster_result_passes():
    for gate in ("relative", "absolute", "both"):
        assert exit_code(judge(result(), as_baseline(result()), {}, floor=0.9, gate=gate)) == OK
        assert exit_code(judge(result([r * 0.7 for r in BASE]), as_baseline(result()), {}, 0.9, gate=gate)) == OK


def test_beyond_the_tolerance_but_within_the_measured_noise_passes():
    noisy_base = [1.0, 0.7, 1.4, 0.8, 1.25]
    noisy_now = [1.15, 0.8, 1.6, 0.95, 1.4]  # 12-15% slower per round, but the rounds overlap
    est, lo, hi = ratio_interval(noisy_now, noisy_base)
    assert est > 1.10 and lo < 1  # beyond the 10% tolerance, interval includes "no change"
    findings = judge(result(noisy_now), as_baseline(result(noisy_base)), {}, floor=0.9, gate="both")
    assert exit_code(findings) == OK
    v = [v for v in student(findings).verdicts if v.metric == "latency_p50_ms"][0]
    assert not v.regressed and v.reason == "beyond the tolerance but within the noise"


def test_accuracy_under_the_floor_fails_without_a_baseline():
    findings = judge(result(accuracy=0.90, teacher=0.96), as_baseline({"devices": {}}), {}, floor=0.99)
    assert exit_code(findings) == REGRESSION
    assert "accuracy regressed: baseline — -> 0.9 fraction (floor 0.9504 = 0.99 x teacher 0.9600)" \
        in student(findings).messages()[0]
    assert exit_code(judge(result(accuracy=0.955, teacher=0.96), as_baseline({"devices": {}}), {}, 0.99)) == OK


def test_accuracy_drop_size_growth_and_unmeasured_cases():
    base = as_baseline(result())
    assert exit_code(judge(result(accuracy=0.94), base, {}, 0.9)) == REGRESSION  # 0.01 > 0.005 drop
    assert exit_code(judge(result(accuracy=0.947), base, {}, 0.9)) == OK
    assert exit_code(judge(result(size=1020), base, {}, 0.9)) == REGRESSION  # +2% > 1%
    gone = result(status="skipped")
    for c in gone["devices"]["dev-a"]["cases"].values():
        c.update(status="skipped", reason="onnxruntime not importable", metrics={})
    assert exit_code(judge(gone, base, {}, 0.9)) == UNMEASURED  # measured before, not now
    assert exit_code(judge(gone, as_baseline({"devices": {}}), {}, 0.9)) == UNMEASURED  # nothing measured at all


def test_github_action_benchmark_json_format(tmp_path):
    paths = bench_output.write_github(tmp_path / "bench.json", result())
    smaller, bigger = (json.loads(p.read_text()) for p in paths)
    assert paths[1].name == "bench.bigger.json"
    # BenchmarkResult of github-action-benchmark (src/extract.ts): name, value, unit required;
    # range and extra optional strings; one direction per file (tool: customSmallerIsBetter / ...)
    for entries in (smaller, bigger):
        assert isinstance(entries, list) and entries
        for e in entries:
            assert set(e) == {"name", "unit", "value", "range", "extra"}
            assert isinstance(e["name"], str) and isinstance(e["unit"], str)
            assert isinstance(e["value"], (int, float)) and not isinstance(e["value"], bool)
            assert isinstance(e["range"], str) and isinstance(e["extra"], str)
    names = [e["name"] for e in smaller]
    assert "quantize @ onnxruntime [dev-a] latency_p50_ms" in names and any("size_bytes" in n for n in names)
    assert {e["name"].rsplit(" ", 1)[1] for e in bigger} == {"throughput", "throughput_vs_teacher", "accuracy",
                                                             "agreement"}
    assert len({e["name"] for e in smaller + bigger}) == len(smaller + bigger)  # names are the series keys


def test_junit_has_a_case_per_metric_and_a_failure_for_the_regression(tmp_path):
    findings = judge(result([r * 1.3 for r in BASE]), as_baseline(result()), {}, 0.9)
    bench_output.write_junit(tmp_path / "j.xml", findings)
    suite = ET.parse(tmp_path / "j.xml").getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase") if c.get("classname") == "dev-a.quantize.onnxruntime"}
    assert {"latency_p50_vs_teacher", "throughput_vs_teacher", "accuracy", "accuracy (floor)", "agreement",
            "size_bytes", "latency_p50_ms", "throughput"} == set(cases)
    assert cases["latency_p50_vs_teacher"].find("failure") is not None and cases["accuracy"].find("failure") is None
    assert cases["latency_p50_ms"].find("skipped") is not None  # reported, not gated by the relative gate
    assert suite.get("failures") == "1"  # p50 relative to the teacher (throughput 1/1.3: inside its 25%)
    bench_output.write_junit(tmp_path / "first.xml", judge(result(), as_baseline({"devices": {}}), {}, 0.9))
    first = ET.parse(tmp_path / "first.xml").getroot()
    assert first.get("failures") == "0" and first.get("skipped") == "12"  # measured, no baseline yet
    md = bench_output.summary_markdown(result([r * 1.3 for r in BASE]), findings, "baseline b.json")
    assert "❌ regression" in md and "| `dev-a` | quantize | onnxruntime | regressed |" in md


def test_update_baseline_rewrites_only_its_device(tmp_path):
    path = tmp_path / "baseline.json"
    update_baseline(path, result(device="dev-b"))
    update_baseline(path, result(device="dev-a"))
    before_b = json.dumps(read_baseline(path)["devices"]["dev-b"], sort_keys=True)
    update_baseline(path, result([r * 2 for r in BASE], device="dev-a"))
    after = read_baseline(path)["devices"]
    assert json.dumps(after["dev-b"], sort_keys=True) == before_b
    assert after["dev-a"]["cases"]["quantize/onnxruntime"]["metrics"]["latency_p50_ms"]["value"] == 2.0
    assert after["dev-a"]["cases"]["teacher/onnxruntime"]["metrics"]["latency_p50_ms"]["value"] == 2.0
    assert not list(tmp_path.glob(".baseline.json.*"))  # no temp file left behind


def test_history_window_is_per_device_and_pooled(tmp_path):
    path = tmp_path / "h.jsonl"
    for i in range(4):
        append_history(path, result([r * (1 + i) for r in BASE]))
        append_history(path, result(device="dev-b"))
    window = read_history(path, "dev-a", 2)
    assert [w["cases"]["quantize/onnxruntime"]["metrics"]["latency_p50_ms"]["value"] for w in window] == [3.0, 4.0]
    # pooled over the window (3x and 4x), a 3.5x result is no regression; 5x is
    assert exit_code(judge(result([r * 3.5 for r in BASE]), as_baseline({"devices": {}}), {"dev-a": window}, 0.9)) == OK
    assert exit_code(judge(result([r * 5 for r in BASE]), as_baseline({"devices": {}}), {"dev-a": window}, 0.9)) \
        == REGRESSION


def _short_run(tmp_path):
    return ["--set", f"output.dir={tmp_path}", "--set", "teacher.train.epochs=2",
            "--set", "stages=[{kind: distill, epochs: 2, lr: 0.01, augment: false}, "
                     "{kind: quantize, calib_batches: 2, epochs: 1, lr: 0.0005, augment: false}]",
            "--set", "targets=[{backend: onnxruntime, threads: 1}]",
            "--set", "profile={warmup: 5, max_warmup: 40, runs: 100, throughput_batch: 16, throughput_runs: 5}"]


def workflow_command(device: str, summary) -> list[str]:
    """The `compress bench` line of examples/ci/compress-bench.yml as a push to main runs it."""
    wf = yaml.safe_load((ROOT / "examples" / "ci" / "compress-bench.yml").read_text())
    line = next(s["run"] for s in wf["jobs"]["bench"]["steps"] if "compress bench" in s.get("run", ""))
    line = re.sub(r"\$\{\{ github.ref [^}]*\}\}", "--update-baseline", line)
    line = line.replace("${{ matrix.device }}", device).replace('"$GITHUB_STEP_SUMMARY"', str(summary))
    line = line.replace("${{ matrix.gate }}", "relative")
    args = shlex.split(line)
    assert args[:3] == ["compress", "bench", "examples/tiny.yaml"] and "${{" not in line
    return ["bench", str(ROOT / "examples" / "tiny.yaml"), *args[3:]]


@pytest.mark.slow
def test_bench_a_run_twice_then_an_fp32_model_posing_as_int8_is_flagged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the workflow's relative paths (bench/, bench-out.json) land here
    cli = CliRunner()
    base = tmp_path / "bench" / "baseline.json"
    first = cli.invoke(app, [*workflow_command("ci", tmp_path / "summary.md"), *_short_run(tmp_path)])
    assert first.exit_code == OK, first.output
    run_dir = tmp_path / "tiny"
    assert set(read_baseline(base)["devices"]) == {"ci"} and (run_dir / "config.json").is_file()
    assert (tmp_path / "bench-out.json").is_file() and (tmp_path / "bench-out.bigger.json").is_file()
    assert ET.parse(tmp_path / "bench-junit.xml").getroot().get("tests") != "0"
    assert "## compress bench: tiny" in (tmp_path / "summary.md").read_text()
    # a test machine's load changes under it: the gate's own false-alarm rate is measured in the
    # bench note, not asserted here, so the timing tolerances are wide; the checks below are exact
    loose = ["--tolerance", "latency_p50_vs_teacher=0.5", "--tolerance", "latency_p90_vs_teacher=1",
             "--tolerance", "throughput_vs_teacher=0.7"]
    again = cli.invoke(app, ["bench", str(run_dir), "--device", "ci", "--baseline", str(base), "--floor", "0",
                             "--json", "gh.json", *loose])
    assert again.exit_code == OK, again.output
    assert "up to date, skipped" in again.output and "running" not in again.output  # nothing retrained
    names = [e["name"] for e in json.loads((tmp_path / "gh.json").read_text())]
    assert "teacher @ onnxruntime [ci] latency_p50_ms" in names
    shutil.copy(run_dir / "00-teacher" / "model.onnx", run_dir / "02-quantize" / "model.onnx")  # FP32, bigger
    # as if the exporter had written it: the manifest vouches for it (a hand-swapped file is exported again)
    from compress.checkpoint import write_sealed
    manifest = json.loads((run_dir / "02-quantize" / "manifest.json").read_text())
    write_sealed(run_dir / "02-quantize" / "manifest.json", manifest, list(manifest["files"].values()))
    fake = cli.invoke(app, ["bench", str(run_dir), "--device", "ci", "--baseline", str(base), "--floor", "0", *loose])
    assert fake.exit_code == REGRESSION, fake.output
    assert "ci: quantize on onnxruntime: size_bytes regressed" in fake.output
    # deploy's own gate fails it: parity with the int8 torch model, or no int8 kernel ran
    assert re.search(r"ci: quantize on onnxruntime: failed deploy's gate: (parity: top-1 agreement|int8 artifact)",
                     fake.output), fake.output


def test_bench_arguments_are_checked(tmp_path):
    res = CliRunner().invoke(app, ["bench", str(tmp_path), "--rounds", "5"])
    assert res.exit_code == 2 and "config.json: not found" in res.output
    res = CliRunner().invoke(app, ["bench", str(tmp_path), "--rounds", "3"])
    assert res.exit_code == 2 and "--rounds 3: at least 4" in res.output
    res = CliRunner().invoke(app, ["bench", str(tmp_path), "--tolerance", "latency=0.2"])
    assert res.exit_code == 2 and "unknown metric 'latency'" in res.output
