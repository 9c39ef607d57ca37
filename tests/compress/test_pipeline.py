"""The whole chain on examples/tiny.yaml, as a user runs it (through the CLI)."""
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from compress.checkpoint import record_shapes
from compress.config_load import load_config
from compress.evaluate import preprocess
from compress.pipeline import Pipeline, load_data
from compress.structure import Structure, rebuild
from compress.train import accuracy, predict
from tests.compress.test_stages import identity_kind  # noqa: F401 (a fixture)
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
TINY = str(ROOT / "examples" / "tiny.yaml")
STAGES = ["teacher", "distill", "prune", "quantize"]


def run_cli(*args):
    return CliRunner().invoke(app, ["run", TINY, *args])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    res = run_cli("--set", f"output.dir={out}")
    assert res.exit_code == 0, res.output
    run_dir = out / "tiny"
    return run_dir, json.loads((run_dir / "report.json").read_text()), res.output, out


def test_report_contract(tiny_run):
    _, report, output, _ = tiny_run
    assert {"name", "created", "config_hash", "environment", "stages", "deployments"} <= set(report)
    assert {"python", "torch", "onnxruntime", "openvino", "brevitas", "torch_pruning", "cpu",
            "gpu"} <= set(report["environment"])
    assert [s["name"] for s in report["stages"]] == STAGES
    for s in report["stages"]:
        assert {"accuracy", "params", "macs", "size_bytes", "seconds"} <= set(s)
    assert len(report["deployments"]) == len(STAGES) * 3
    keys = {"stage", "backend", "precision", "status", "reason", "executed_precision", "accuracy",
            "agreement", "max_abs_diff", "latency_ms", "throughput", "size_bytes", "artifact"}
    for d in report["deployments"]:
        assert keys <= set(d)
        if d["backend"] == "tensorrt" and d["status"] == "skipped":
            assert d["reason"]
        else:
            assert d["status"] == "ok", d
            assert {"batch", "threads", "p50", "p90", "p99"} <= set(d["latency_ms"])
            assert d["latency_ms"]["batch"] == 1 and d["throughput"]["batch"] == 64
    assert "| quantize | openvino | int8 | ok |" in output  # the table is printed


def test_stages_shrink_and_keep_accuracy(tiny_run):
    _, report, _, _ = tiny_run
    s = {r["name"]: r for r in report["stages"]}
    assert s["teacher"]["accuracy"] >= 0.95
    assert s["distill"]["accuracy"] >= 0.9
    assert s["prune"]["params"] < s["distill"]["params"] and s["prune"]["macs"] < s["distill"]["macs"]
    assert s["quantize"]["accuracy"] >= 0.8
    # the safetensors keep float fake-quant weights, so compare what ships: the weights in the
    # ONNX files (the whole file is no measure here: on so small a model the QDQ nodes outweigh
    # the weights). int8 weights + int32 biases + scales measured 0.36x the pruned float ones.
    run_dir = tiny_run[0]
    q, p = (weight_bytes(run_dir / d / "model.onnx") for d in ("03-quantize", "02-prune"))
    assert q < 0.5 * p, (q, p)


def weight_bytes(path) -> int:
    import onnx
    from onnx import numpy_helper
    return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)


def test_int8_deployments_run_int8_kernels_and_agree(tiny_run):
    _, report, _, _ = tiny_run
    for d in report["deployments"]:
        if d["backend"] == "tensorrt" and d["status"] == "skipped":
            continue  # no GPU on this machine; the skip reason is checked in test_report_contract
        assert d["status"] == "ok", d  # a failed int8 row must not slip past the int8 checks
        if d["stage"] == "quantize":
            ep = d["executed_precision"]
            assert ep["int8_layers"] == ep["compute_layers"] > 0, d["backend"]
            assert d["agreement"] >= 0.98, d["backend"]
        else:
            assert d["executed_precision"]["int8_layers"] == 0
            assert d["agreement"] == 1.0 and d["max_abs_diff"] < 1e-3


def test_artifacts_and_manifest_reproduce_reported_accuracy(tiny_run):
    import onnxruntime as ort
    run_dir, report, _, _ = tiny_run
    for i, name in enumerate(STAGES):
        d = run_dir / f"{i:02d}-{name}"
        for f in ("model.safetensors", "structure.json", "metrics.json", "model.onnx",
                  "model.xml", "model.bin", "manifest.json"):
            assert (d / f).is_file(), d / f
    qdir = run_dir / "03-quantize"
    manifest = json.loads((qdir / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["input"]["scale"] == pytest.approx(1 / 255)
    # a user: the file, the manifest, the test split; nothing from our pipeline
    data = load_data(load_config(TINY))
    sess = ort.InferenceSession(str(qdir / "model.onnx"))
    x = preprocess(data.test.images.numpy(), manifest)
    acc = float((sess.run(None, {manifest["input"]["name"]: x})[0].argmax(1) == data.test.labels.numpy()).mean())
    row = next(r for r in report["deployments"] if r["stage"] == "quantize" and r["backend"] == "onnxruntime")
    assert acc == pytest.approx(row["accuracy"], abs=1e-9)
    # and the stage model rebuilds from factory + structure.json + safetensors
    model = rebuild(Structure.read(qdir / "structure.json"), qdir / "model.safetensors")
    with torch.no_grad():
        torch_pred = model(torch.from_numpy(x)).argmax(1).numpy()
    assert (torch_pred == data.test.labels.numpy()).mean() == pytest.approx(
        report["stages"][3]["accuracy"], abs=1e-9)


def copy_run(tiny_run, tmp_path):
    """A copy of the finished tiny run, for tests that change it."""
    shutil.copytree(tiny_run[0], tmp_path / "tiny")
    return tmp_path / "tiny"


def stages_of(out, *overrides):
    """Pipeline.run_stages on the tiny config (no deployment) -> (rows, models, log lines)."""
    lines = []
    rows, models, _ = Pipeline(load_config(TINY, [f"output.dir={out}", *overrides]), log=lines.append).run_stages()
    return rows, models, lines


def assert_rebuilt_models_reproduce_their_rows(rows, models, out):
    """Every stage's model, rebuilt from disk, gives exactly the accuracy recorded when it ran."""
    data = load_data(load_config(TINY, [f"output.dir={out}"]))
    for row in rows:
        model = models[row["name"]][0]
        assert accuracy(predict(model, data.test, data), data.test.labels) == row["accuracy"], row["name"]


def test_rerun_skips_every_stage_kind_and_rebuilds_identical_models(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    before = {p: p.stat().st_mtime for p in run_dir.glob("*/metrics.json")}
    rows, models, lines = stages_of(tmp_path)
    assert [ln for ln in lines if ln.startswith("[")] == [f"[{n}] up to date, skipped" for n in STAGES]
    assert [(r["name"], r["accuracy"]) for r in rows] == [(r["name"], r["accuracy"]) for r in tiny_run[1]["stages"]]
    assert_rebuilt_models_reproduce_their_rows(rows, models, tmp_path)
    assert before == {p: p.stat().st_mtime for p in run_dir.glob("*/metrics.json")}


def test_a_changed_stage_reruns_with_the_later_ones_only(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    _, _, lines = stages_of(tmp_path, "stages.1.lr=0.004")
    assert "[teacher] up to date, skipped" in lines and "[distill] up to date, skipped" in lines
    assert "[prune] running (02-prune)" in lines and "[quantize] running (03-quantize)" in lines
    _, _, lines = stages_of(tmp_path, "stages.1.lr=0.004")  # and now that is what is on disk
    assert sum("up to date, skipped" in ln for ln in lines) == 4
    assert json.loads((run_dir / "02-prune" / "metrics.json").read_text())["config"]["lr"] == 0.004


def test_an_old_run_directory_resumes_and_a_corrupt_record_reruns_with_one_line(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    _, models, _ = stages_of(tmp_path)
    # structure.json as the pipeline wrote it before the typed record: no version field
    for i, name in enumerate(STAGES):
        s = json.loads((run_dir / f"{i:02d}-{name}" / "structure.json").read_text())
        s.pop("version")
        if name in ("distill", "prune"):  # it recorded every module's shapes after a float stage
            s["shapes"] = record_shapes(models[name][0])
        (run_dir / f"{i:02d}-{name}" / "structure.json").write_text(json.dumps(s))
        m = json.loads((run_dir / f"{i:02d}-{name}" / "metrics.json").read_text())  # and no digests, as then
        (run_dir / f"{i:02d}-{name}" / "metrics.json").write_text(json.dumps(
            {k: v for k, v in m.items() if k not in ("digest", "digests")}))
    rows, models, lines = stages_of(tmp_path)
    assert sum("up to date, skipped" in ln for ln in lines) == 4 and not any("rerunning" in ln for ln in lines)
    assert_rebuilt_models_reproduce_their_rows(rows, models, tmp_path)
    (run_dir / "03-quantize" / "structure.json").write_text("{truncated")
    _, _, lines = stages_of(tmp_path)
    why = [ln for ln in lines if "rerunning" in ln]
    assert why == [f"[quantize] rerunning: {run_dir / '03-quantize' / 'structure.json'}: not readable JSON "
                   f"(JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"]
    assert "[quantize] running (03-quantize)" in lines
    assert Structure.read(run_dir / "03-quantize" / "structure.json").quantize.weight_bits == 8


def test_synthetic_calibration_reruns_only_the_calibrating_stage(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    _, _, lines = stages_of(tmp_path, "data.calibration=synthetic", "data.synthesis.steps=3")
    assert sum("up to date, skipped" in ln for ln in lines) == 3 and "[quantize] running (03-quantize)" in lines
    assert any("fitting 256 images to the teacher's BatchNorm statistics" in ln for ln in lines)
    assert len(list((run_dir / "cache").glob("synthetic-calib-*.safetensors"))) == 1
    m = json.loads((run_dir / "03-quantize" / "metrics.json").read_text())
    # QAT distilled on the 256 synthetic images (4 steps at batch 64), not the 2048 real ones (32)
    assert m["calibration"] == "synthetic" and [h["steps"] for h in m["history"]] == [4]
    assert m["accuracy"] >= 0.5  # a broken calibration lands at chance, 0.1


def test_a_stage_kind_registered_from_a_test_runs_and_resumes(identity_kind, tiny_run, tmp_path):  # noqa: F811
    run_dir = copy_run(tiny_run, tmp_path)
    distill = "{kind: distill, epochs: 4, lr: 0.01, loss: [{kind: kl, weight: 0.9, temperature: 2}, " \
              "{kind: ce, weight: 0.1}], augment: false}"
    override = f"stages=[{distill}, {{kind: identity, note: hello}}]"
    rows, models, lines = stages_of(tmp_path, override)
    assert "[distill] up to date, skipped" in lines and "[identity] running (02-identity)" in lines
    assert rows[-1]["note"] == "hello" and rows[-1]["accuracy"] == rows[-2]["accuracy"]
    assert rows[-1]["params"] == rows[-2]["params"]
    rows2, models2, lines = stages_of(tmp_path, override)
    assert "[identity] up to date, skipped" in lines and rows2 == json.loads(json.dumps(rows, default=str))
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(models2["identity"][0](x), models["distill"][0](x))
    assert (run_dir / "02-identity" / "structure.json").is_file()


def test_missing_dataset_fails_before_work_with_one_clear_line(tmp_path):
    res = run_cli("--set", f"output.dir={tmp_path}", "--set", "data.dataset=fashion_mnist",
                  "--set", f"data.root={tmp_path / 'nowhere'}")
    assert res.exit_code == 2
    assert "data.root=" in res.output and "train-images-idx3-ubyte.gz" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "tiny").exists()


def test_wrong_teacher_checkpoint_is_named(tmp_path):
    from compress.checkpoint import save_weights
    from compress.models import build_model
    save_weights(build_model("resnet8", 10, 1), tmp_path / "t.safetensors")
    res = run_cli("--set", f"output.dir={tmp_path}", "--set", "teacher.train=null",
                  "--set", f"teacher.checkpoint={tmp_path / 't.safetensors'}")
    assert res.exit_code == 2
    assert "teacher.checkpoint=" in res.output and "does not fit the model" in res.output
    assert "Traceback" not in res.output


def test_unknown_prune_exclusion_fails_before_training(tmp_path):
    res = run_cli("--set", f"output.dir={tmp_path}", "--set", "stages.1.ignored=[fc, layer.0]")
    assert res.exit_code == 2 and "stages.1.ignored: no module named 'layer.0'" in res.output
    assert not (tmp_path / "tiny" / "00-teacher").exists()


def test_ensemble_teachers_and_cached_distillation(tmp_path):
    """Two teachers (an ensemble), a distill stage reading a full teacher-output cache."""
    cfg = tmp_path / "ens.yaml"
    cfg.write_text(f"""
name: ens
data: {{dataset: synthetic, batch_size: 64, synthetic: {{train_size: 2048, test_size: 256}}}}
teacher:
  - {{model: resnet_tiny_teacher, train: {{epochs: 3, optimizer: adamw, lr: 0.01, augment: false}}}}
  - {{model: resnet_tiny, weight: 0.5, train: {{epochs: 3, optimizer: adamw, lr: 0.01, augment: false}}}}
student: {{model: resnet_tiny}}
stages:
  - kind: distill
    epochs: 4
    lr: 0.01
    augment: false
    cache: full
    ensemble: probs
    loss: [{{kind: kl, weight: 0.9, temperature: 2}}, {{kind: dkd, weight: 0.1, temperature: 2}},
           {{kind: ce, weight: 0.1}}]
targets: [{{backend: onnxruntime, threads: 1}}]
profile: {{runs: 100, throughput_runs: 2, vendor_seconds: 0, throughput_search: false}}
output: {{dir: {tmp_path}}}
""")
    res = CliRunner().invoke(app, ["run", str(cfg)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "ens" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["teacher", "teacher-2", "distill"]
    assert "teacher cache: wrote" in res.output
    assert len(list((tmp_path / "ens" / "cache").glob("teacher-*-full.safetensors"))) == 1
    hist = json.loads((tmp_path / "ens" / "01-distill" / "metrics.json").read_text())["history"]
    assert {"dkd", "kl", "ce", "val_accuracy"} <= set(hist[-1]) and len(hist) == 4
    assert report["stages"][2]["accuracy"] >= 0.8


def test_parity_gate_fails_a_corrupted_export_and_passes_a_correct_one(tiny_run):
    """Scale one weight of the exported ONNX: the gate must catch it; the intact file passes."""
    import onnx
    from onnx import numpy_helper

    from compress.deploy import deploy_one

    run_dir, _, _, out = tiny_run
    cfg = load_config(TINY, [f"output.dir={out}"])
    data = load_data(cfg)
    sdir = run_dir / "01-distill"
    manifest = json.loads((sdir / "manifest.json").read_text())
    model = rebuild(Structure.read(sdir / "structure.json"), sdir / "model.safetensors")
    x = preprocess(data.test.images.numpy(), manifest)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    labels = data.test.labels.numpy()

    from compress.plan import deployment_plan
    P = deployment_plan(load_config(TINY, [f"output.dir={out}", "profile.runs=100", "profile.throughput_runs=1"]),
                        [], {}, data, out / "tiny", log=lambda s: None)
    tcfg = P.targets[0]
    good = deploy_one(P, "distill", sdir, manifest, tcfg, x, labels, ref)
    assert good["status"] == "ok", good["reason"]

    bad_dir = out / "tiny" / "corrupt"
    bad_dir.mkdir(exist_ok=True)
    m = onnx.load(str(sdir / "model.onnx"))
    init = next(i for i in m.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3.0, init.name))
    onnx.save(m, str(bad_dir / "model.onnx"))
    bad = deploy_one(P, "distill", bad_dir, {**manifest, "files": {"onnx": "model.onnx"}}, tcfg, x, labels, ref)
    assert bad["status"] == "failed" and bad["reason"].startswith("parity: top-1 agreement")


def test_parity_gate_default_fails_just_below_098():
    """The configured default, through the gate itself: 0.979 fails, 0.98 passes."""
    from compress.config import ParityConfig
    from compress.deploy import parity_failures
    from compress.plan import Parity

    gate = Parity(**ParityConfig().model_dump())
    row = {"accuracy": 0.9, "max_abs_diff": 0.0}
    low = parity_failures({**row, "agreement": 0.979}, 0.9, gate)
    assert len(low) == 1 and low[0].startswith("top-1 agreement"), low
    assert parity_failures({**row, "agreement": 0.98}, 0.9, gate) == []


def test_a_stage_kind_used_twice_keeps_both(tmp_path):
    """Two prune stages: both get their own row, folder and deployment, none overwritten."""
    res = run_cli("--set", f"output.dir={tmp_path}",
                  "--set", "stages=[{kind: distill, epochs: 1, lr: 0.01, augment: false}, "
                  "{kind: prune, ratio: 0.2, round_to: 2, epochs: 0.5, augment: false}, "
                  "{kind: prune, ratio: 0.2, round_to: 2, epochs: 0.5, augment: false}]",
                  "--set", "targets=[{backend: onnxruntime, threads: 1}]", "--set", "profile.throughput_runs=1")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    names = [s["name"] for s in report["stages"]]
    assert names == ["teacher", "distill", "prune-2", "prune-3"]
    params = {s["name"]: s["params"] for s in report["stages"]}
    assert params["prune-3"] < params["prune-2"] < params["distill"]
    assert [d["stage"] for d in report["deployments"]] == names
    assert all((tmp_path / "tiny" / d / "model.onnx").is_file() for d in ("02-prune", "03-prune"))


def test_a_stage_after_quantize_counts_the_float_models_macs(tmp_path):
    """The op counter cannot see brevitas layers: a distill stage after quantize reports the
    MACs of the last float model, as the quantize stage does, not of its quant layers."""
    res = run_cli("--set", f"output.dir={tmp_path}",
                  "--set", "stages=[{kind: quantize, calib_batches: 2, epochs: 0, augment: false}, "
                  "{kind: distill, epochs: 0.2, lr: 0.001, augment: false}]",
                  "--set", "export.stages=[teacher]",
                  "--set", "targets=[{backend: onnxruntime, threads: 1}]", "--set", "profile.throughput_runs=1")
    assert res.exit_code == 0, res.output
    macs = {s["name"]: s["macs"] for s in json.loads((tmp_path / "tiny" / "report.json").read_text())["stages"]}
    assert macs["distill"] == macs["quantize"] > 0


def test_deployment_reuses_the_stage_logits_and_agrees_with_a_fresh_pass(tmp_path, monkeypatch):
    """A run scores each stage once in torch: deployment takes that pass's logits as its
    reference instead of scoring the same model again. A resumed run (stages read from disk)
    scores afresh, and its agreement must be the first run's."""
    import compress.deploy as deploy
    calls = []
    real = deploy.predict
    monkeypatch.setattr(deploy, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = ("--set", f"output.dir={tmp_path}", "--set", "stages=[{kind: quantize, calib_batches: 2, epochs: 0}]",
            "--set", "targets=[{backend: onnxruntime, threads: 1}]", "--set", "profile.throughput_runs=1")
    assert run_cli(*args).exit_code == 0
    first = json.loads((tmp_path / "tiny" / "report.json").read_text())["deployments"]
    assert calls == [] and len(first) == 2
    res = run_cli(*args)
    assert res.exit_code == 0 and len(calls) == 2, res.output
    again = json.loads((tmp_path / "tiny" / "report.json").read_text())["deployments"]
    assert [d["agreement"] for d in again] == [d["agreement"] for d in first]
