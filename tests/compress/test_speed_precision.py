"""Per-layer precision chosen by measured speed (compress/speed_precision.py, keep_float.py, `precision: speed`):
the rewrite keeps chosen layers float with the int8 graph's own numbers, runtimes then really run
them float, the search keeps float exactly the layers a (fake) timer makes faster, and the
deployment row says which layers run in which precision and why."""
import numpy as np
import onnx
import pytest

from compress import keep_float as kf
from compress import speed_precision as sp
from compress.config import TargetConfig
from compress.export import export_qcdq
from compress.quantize import QuantizeConfig
from targets import base
from tests.compress.test_export_qdq import SHAPE, calibrated, ort_run

LAYERS = 24  # compute layers of mobilenet_tiny (tests/compress/test_export_qdq.py)
KEPT = [0, 2, 22, LAYERS - 1]  # stem (1 channel), a depthwise conv, /mix.0/Conv (reads a Concat), the Gemm


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((16, *SHAPE)).astype(np.float32)
    d = tmp_path_factory.mktemp("speed")
    export_qcdq(calibrated("mobilenet_tiny", QuantizeConfig(), x), d / "int8.onnx", SHAPE, uint8_activations=True)
    return d / "int8.onnx", x


def rewritten(int8, tmp_path, layers):
    path, x = int8
    layers = [kf.quantized_layers(onnx.load(str(path)))[i] for i in layers]
    out = tmp_path / "mixed.onnx"
    onnx.save(kf.keep_float(onnx.load(str(path)), layers), str(out))
    return out, layers, x


def test_keep_float_is_the_int8_graph_with_those_layers_dequantized(int8, tmp_path):
    # the 1-channel stem, a depthwise conv, the conv after the Ghost block's Concat, the Gemm
    mixed, layers, x = rewritten(int8, tmp_path, KEPT)
    assert layers[0].endswith("Conv") and layers[-1].endswith("Gemm")
    # Q/DQ as float ops: the rewrite computes exactly what the int8 graph's DQ computed
    np.testing.assert_allclose(ort_run(mixed, x, False), ort_run(int8[0], x, False), rtol=0, atol=1e-5)
    g = onnx.load(str(mixed)).graph
    kept = {n.name: n for n in g.node if n.name in layers}
    inits = {i.name for i in g.initializer}
    assert all(n.input[1] in inits for n in kept.values())  # float weights, no DQ in front


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_runtimes_run_the_kept_layers_float_and_the_rest_int8(int8, tmp_path, backend):
    mixed, layers, x = rewritten(int8, tmp_path, KEPT)
    runner = base.get(backend).compile(mixed, base.CompileOptions(threads=1, work_dir=tmp_path))
    ep = runner.info["executed_precision"]
    # ORT would re-quantize a float-weight Conv behind a per-tensor DQ (WeightBiasQuantization):
    # not here, the stem (1 channel) included; OpenVINO compiles the conv after the Concat
    assert (ep["int8_layers"], ep["compute_layers"]) == (LAYERS - len(KEPT), LAYERS), ep["detail"]
    ref = ort_run(mixed, x, False)
    out = runner(x)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9 and np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_keep_float_refuses_a_name_that_is_not_a_quantized_layer(int8):
    with pytest.raises(ValueError, match="not quantized compute layers"):
        kf.keep_float(onnx.load(str(int8[0])), ["/nope/Conv"])


def fake_timer(int8_ms: dict, float_ms: dict, log: list, whole: float = 1e9):
    """Score = the sum of each layer's time in its precision: what a perfect runtime would measure;
    `whole`: the score of the whole graph in float (its activations unquantized too)."""
    def timer(cands):
        log.append(cands)
        return [whole if kf.WHOLE in c else sum(float_ms[k] if k in c else int8_ms[k] for k in int8_ms)
                for c in cands]
    return timer


def test_search_keeps_float_exactly_the_layers_the_timer_makes_faster():
    int8_ms = {"a": 1.0, "b": 5.0, "c": 1.0, "d": 2.0}
    float_ms = {"a": 3.0, "b": 1.0, "c": 0.99, "d": 1.0}  # c: 1% of 9 ms faster, inside the margin
    log = []
    out = sp.search(list(int8_ms), fake_timer(int8_ms, float_ms, log), "onnxruntime")
    assert out["float_layers"] == ["b", "d"]
    assert {k: v["precision"] for k, v in out["layers"].items()} == {"a": "int8", "b": "fp32", "c": "int8",
                                                                   "d": "fp32"}
    # first the whole graph float (slower here), then each step compares the
    # choices so far with one more layer float; a flip is measured twice
    assert log[0] == [frozenset(), frozenset({kf.WHOLE})] and not out["whole_graph_float"]
    assert log[1] == [frozenset(), frozenset({"a"})]
    assert log[2:4] == [[frozenset(), frozenset({"b"})], [frozenset({"b"}), frozenset()]]
    assert out["layers"]["b"]["int8_score"] == 9.0 and out["layers"]["b"]["float_score"] == 5.0
    assert out["layers"]["b"]["why"] == "float measured 1.80x as fast as int8 on onnxruntime"
    assert "within the 3% margin" in out["layers"]["c"]["why"]
    assert out["layers"]["a"]["why"].startswith("int8 measured")


def test_the_whole_graph_goes_float_when_that_beats_every_per_layer_choice():
    int8_ms, float_ms = {"a": 2.0, "b": 2.0}, {"a": 1.0, "b": 1.5}
    out = sp.search(["a", "b"], fake_timer(int8_ms, float_ms, [], whole=2.5), "onnxruntime")
    assert out["whole_graph_float"] and out["float_layers"] == ["a", "b"]
    assert out["layers"]["a"]["why"] == ("whole graph float (activation Q/DQ removed) measured 1.60x as fast "
                                         "as int8 on onnxruntime")


def test_float_graph_removes_activation_qdq_and_runs_float(int8, tmp_path):
    path, x = int8
    out = tmp_path / "float.onnx"
    onnx.save(kf.float_graph(onnx.load(str(path))), str(out))
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    runner = base.get("onnxruntime").compile(out, base.CompileOptions(threads=1, work_dir=tmp_path))
    assert runner.info["executed_precision"]["int8_layers"] == 0
    # the int8 graph without its activation rounding: close, not equal
    ref, got = ort_run(path, x, False), runner(x)
    assert 0 < np.abs(got - ref).max() < 0.1 * np.abs(ref).max() and (got.argmax(1) == ref.argmax(1)).mean() >= 0.8


def test_a_flip_that_the_second_measurement_contradicts_is_not_kept():
    # whole graph: not faster; then layer a: faster once, slower when measured again
    answers = iter([[1.0, 1.0], [2.0, 1.0], [2.0, 1.0]])
    out = sp.search(["a"], lambda c: next(answers))
    assert out["float_layers"] == []


def test_backend_timer_times_real_candidates_on_onnxruntime(int8, tmp_path, monkeypatch):
    monkeypatch.setattr(sp, "MAX_LAYERS", 2)
    monkeypatch.setattr(sp, "ROUNDS", 2)
    out = sp.choose(int8[0], "onnxruntime", tmp_path / "w", int8[1], threads=1, batches=(1, 4))
    assert list(out["layers"]) == kf.quantized_layers(onnx.load(str(int8[0])))[:2]
    for step in out["layers"].values():  # each decision follows its own measured scores
        assert step["int8_score"] > 0 and step["float_score"] > 0
        faster = step["float_score"] < step["int8_score"] * (1 - sp.MARGIN)
        assert step["precision"] == "int8" or faster
    assert out["backend"] == "onnxruntime" and out["batches"] == [1, 4] and out["seconds"] >= 0


def test_a_pair_goes_float_only_when_it_beats_the_next_layer_float_alone():
    # a float island costs its edges: a and b are only faster in float together (0.5 saved by the
    # shared edge), c is faster alone; d's pair gain comes from e alone, so d stays int8
    int8_ms = {"a": 1.0, "b": 1.0, "c": 2.0, "d": 1.0, "e": 2.0}
    float_ms = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0}

    def timer(cands):
        return [sum(float_ms[k] if k in c else int8_ms[k] for k in int8_ms) - (0.5 if {"a", "b"} <= c else 0)
                for c in cands]
    out = sp.search(list(int8_ms), timer, "onnxruntime")
    assert out["float_layers"] == ["a", "b", "c", "e"]
    assert out["layers"]["a"]["why"].startswith("float with `b`: the two measured")
    assert out["layers"]["b"]["why"].startswith("float with `a`")
    assert out["layers"]["d"]["precision"] == "int8" and out["layers"]["e"]["precision"] == "fp32"


def test_candidates_are_timed_the_way_the_deployment_runs_each_batch():
    # batch 1 on one thread under latency_threads: auto; the throughput batch as single-threaded
    # callers where the backend streams; else the configured threads
    assert sp.modes((1, 64), 2, True, True) == {1: (1, 1), 64: (1, 2)}
    assert sp.modes((1, 64), 2, False, False) == {1: (2, 1), 64: (2, 1)}
    assert sp.modes((1, 64), 4, False, True) == {1: (4, 1), 64: (1, 4)}
    assert sp.modes((1, 64), 1, True, True) == {1: (1, 1), 64: (1, 1)}


def test_a_saved_choice_is_reused_only_for_the_same_timing(int8, tmp_path):
    path, x = int8
    names = kf.quantized_layers(onnx.load(str(path)))
    log, calls = [], []
    fast = fake_timer(dict.fromkeys(names, 1.0), {**dict.fromkeys(names, 1.5), names[1]: 0.2}, log)

    def choose(how):
        calls.append(how)
        return sp.speed_artifact(path, tmp_path, "onnxruntime", x, 2, (1, 4), lambda s: None, fast, how)
    one = {"latency_one_thread": True, "streams": True}
    first = choose(one)[1]
    searched = len(log)
    assert first["float_layers"] == [names[1]] and first["how"] == one
    assert choose(dict(one))[1] == first and len(log) == searched  # same timing: read back, not searched
    choose({**one, "streams": False})
    assert len(log) > searched  # timed another way: searched again


def test_backend_timer_on_two_threads_times_one_thread_compiles(int8, tmp_path, monkeypatch):
    monkeypatch.setattr(sp, "MAX_LAYERS", 1)
    monkeypatch.setattr(sp, "ROUNDS", 1)
    out = sp.choose(int8[0], "onnxruntime", tmp_path / "w", int8[1], threads=2, batches=(1, 4),
                    how={"latency_one_thread": True, "streams": True})
    assert out["timed"] == {"1": "1 thread(s)", "4": "1 thread(s), as 2 callers at once"}
    assert out["how"] == {"latency_one_thread": True, "streams": True}


def test_precision_speed_is_a_target_key():
    from compress.plan import target_spec
    assert target_spec(TargetConfig(backend="openvino", precision="speed")).precision == "speed"
    assert target_spec(TargetConfig(backend="openvino")).precision == "as_exported"
    with pytest.raises(ValueError, match="precision"):
        TargetConfig(backend="onnxruntime", precision="fastest")


def deploy_speed(int8, tmp_path, monkeypatch, fast: int, whole: float = 1e9, parity: dict = None, model=None):
    """deploy_one on the int8 export with `precision: speed` (ORT, 1 thread), a fake timer making
    layer `fast` faster in float and the whole float graph score `whole`; parity: the gate's changes;
    model: the torch model deploy_one gets (the one exported)."""
    import dataclasses

    from compress.deploy import deploy_one
    from compress.plan import deployment_plan, target_spec
    from tests.compress.test_deploy_options import CFG
    path, x = int8
    d = tmp_path / "stage"
    d.mkdir()
    (d / "model.onnx").write_bytes(path.read_bytes())
    names = kf.quantized_layers(onnx.load(str(path)))
    int8_ms, float_ms = dict.fromkeys(names, 1.0), {**dict.fromkeys(names, 1.5), names[fast]: 0.2}
    monkeypatch.setattr(sp, "BackendTimer", lambda *a, **k: fake_timer(int8_ms, float_ms, [], whole))
    plan = deployment_plan(CFG, [], {}, None, tmp_path, log=lambda s: None)
    ref = ort_run(path, x, False)
    manifest = {"precision": "int8", "files": {"onnx": "model.onnx"},
                "quant_format": {"weight_bits": dict.fromkeys(names, 8)}}
    spec = target_spec(TargetConfig(backend="onnxruntime", threads=1, precision="speed"))
    spec = dataclasses.replace(spec, parity=dataclasses.replace(spec.parity, **(parity or {})))
    return deploy_one(plan, "quantize", d, manifest, spec, x, ref.argmax(1), ref, model=model), names, d


def test_deployment_row_says_which_layers_run_float_and_why(int8, tmp_path, monkeypatch):
    row, names, d = deploy_speed(int8, tmp_path, monkeypatch, fast=1)
    slow = names[1]  # the fake timer makes this one layer faster in float
    assert row["status"] == "ok", row["reason"]
    sp_row = row["speed_precision"]
    assert sp_row["float_layers"] == [slow] and sp_row["backend"] == "onnxruntime"
    assert sp_row["layers"][slow]["precision"] == "fp32" and "as fast as int8" in sp_row["layers"][slow]["why"]
    assert all(sp_row["layers"][n]["precision"] == "int8" for n in names if n != slow)
    assert row["executed_precision"]["int8_layers"] == LAYERS - 1
    assert row["artifact"].endswith("model.onnxruntime-speed.onnx")
    assert (d / "speed-onnxruntime.json").is_file() and not (d / ".speed-onnxruntime").exists()


def test_a_whole_float_graph_that_fails_parity_is_not_shipped(int8, tmp_path):
    path, x = int8
    names = kf.quantized_layers(onnx.load(str(path)))
    slow = names[2]
    log = []
    timer = fake_timer(dict.fromkeys(names, 1.0), {**dict.fromkeys(names, 1.5), slow: 0.2}, log, whole=1.0)
    judged = []

    def accept(artifact):  # what deploy passes: the parity gate's reasons, or None
        judged.append(len(kf.quantized_layers(onnx.load(str(artifact)))))
        return "agreement with torch 0.9400 < min_agreement 0.98"
    out, choice = sp.speed_artifact(path, tmp_path, "onnxruntime", x, 1, (1, 4), lambda s: None, timer,
                                    accept=accept)
    assert judged == [0]  # judged: the whole graph float, no quantized layer left
    assert not choice["whole_graph_float"] and choice["float_layers"] == [slow]
    assert choice["whole_graph_rejected"].startswith("agreement with torch 0.9400")
    assert len(kf.quantized_layers(onnx.load(str(out)))) == len(names) - 1  # the per-layer graph is what ships
    assert sp.speed_artifact(path, tmp_path, "onnxruntime", x, 1, (1, 4), lambda s: None, timer,
                             accept=accept)[1] == choice and judged == [0, 0]  # reused, judged again
    searched = len(log)
    # the user relaxes the gate: the saved whole-graph choice ships, without timing anything again
    out, relaxed = sp.speed_artifact(path, tmp_path, "onnxruntime", x, 1, (1, 4), lambda s: None, timer,
                                     accept=lambda artifact: None)
    assert relaxed["whole_graph_float"] and "whole_graph_rejected" not in relaxed and len(log) == searched
    assert kf.quantized_layers(onnx.load(str(out))) == []
    assert sp.read_json(tmp_path / "speed-onnxruntime.json") == relaxed


def test_deploy_judges_the_whole_float_graph_with_the_targets_parity_gate(int8, tmp_path, monkeypatch):
    from compress.report import speed_markdown
    # a gate the float graph (activations unrounded) cannot pass: logits within 1e-3 of the int8 graph's
    row, names, _ = deploy_speed(int8, tmp_path, monkeypatch, fast=0, whole=1.0, parity={"max_abs_diff": 1e-3})
    chosen = row["speed_precision"]
    assert "max_abs_diff 0.001" in chosen["whole_graph_rejected"] and chosen["float_layers"] == [names[0]]
    assert "; its accuracy 1.0000, torch's 1.0000" in chosen["whole_graph_rejected"]  # tiny data: both exact
    # the per-layer graph, written where the rejected one was, is scored afresh: it has the int8 numbers
    assert row["status"] == "ok" and row["max_abs_diff"] < 1e-3, row["reason"]
    assert any("failed parity" in line for line in speed_markdown([row]))


def test_the_whole_float_graph_is_judged_against_torch_computing_it(int8, tmp_path, monkeypatch):
    """With the torch model at hand, a float graph that misses the gate against the int8 model (its
    activations are not rounded: logits 1.2e-3 apart here) is judged against the same model with
    activation and bias quantizers off (4e-7 apart), and ships; the row keeps the int8 agreement."""
    from compress.quantize import QuantizeConfig
    from compress.report import float_graph_note
    from tests.compress.test_export_qdq import calibrated
    _, x = int8
    q = calibrated("mobilenet_tiny", QuantizeConfig(), x)  # the model the fixture exported
    row, _, _ = deploy_speed(int8, tmp_path, monkeypatch, fast=0, whole=1.0, parity={"max_abs_diff": 1e-3}, model=q)
    assert row["status"] == "ok", row["reason"]
    assert row["speed_precision"]["whole_graph_float"] and row["executed_precision"]["int8_layers"] == 0
    assert row["max_abs_diff"] > 1e-3 and row["float_graph"]["passes"] and row["float_graph"]["max_abs_diff"] < 1e-5
    assert "with torch computing the float graph 1.0000" in float_graph_note(row)


def test_the_float_graph_is_held_to_the_int8_models_accuracy(monkeypatch, tmp_path):
    """Agreeing with torch computing it is not enough: a float graph less accurate than the int8
    model stays rejected, and says why."""
    import compress.deploy as deploy
    import compress.runtime_arith as ra
    from compress.plan import deployment_plan, target_spec
    from tests.compress.test_deploy_options import CFG
    plan = deployment_plan(CFG, [], {}, None, tmp_path, log=lambda s: None)
    spec = target_spec(TargetConfig(backend="onnxruntime", precision="speed"))
    labels = np.arange(8) % 4
    ref = np.eye(4, dtype=np.float32)[labels]  # the int8 model: all 8 right
    wrong = np.eye(4, dtype=np.float32)[(labels + 1) % 4]
    for right, passes in ((8, True), (6, False)):
        got = np.concatenate([ref[:right], wrong[right:]])
        monkeypatch.setattr(ra, "float_activation_logits", lambda model, x, batch: got)  # torch computing it
        row = deploy.compare(got, labels, ref, plan.task, spec.parity)
        again = deploy.judge_float_graph(plan, row, object(), got, np.zeros((8, 1)), labels, ref, spec)
        assert row["float_graph"]["agreement"] == 1.0 and (again == []) == passes, again
        assert passes or "accuracy" in again[0]


def test_an_accepted_whole_float_graph_is_scored_once(int8, tmp_path, monkeypatch):
    import compress.deploy as deploy
    calls, real = [], deploy.logits_of
    monkeypatch.setattr(deploy, "logits_of", lambda *a, **k: calls.append(1) or real(*a, **k))
    row, names, _ = deploy_speed(int8, tmp_path, monkeypatch, fast=0, whole=1.0,
                                 parity={"min_agreement": 0.0, "max_acc_drop": 1.0})
    assert row["status"] == "ok", row["reason"]
    assert row["speed_precision"]["whole_graph_float"] and "whole_graph_rejected" not in row["speed_precision"]
    assert row["executed_precision"]["int8_layers"] == 0
    assert len(calls) == 1 and 0 < row["agreement"] <= 1  # the gate's pass is the row's accuracy pass


def test_a_rejected_whole_graph_leaves_no_file_that_looks_deployed(int8, tmp_path):
    path, x = int8
    names = kf.quantized_layers(onnx.load(str(path)))
    timer = fake_timer(dict.fromkeys(names, 1.0), dict.fromkeys(names, 1.5), [], whole=1.0)  # only the whole
    out, choice = sp.speed_artifact(path, tmp_path, "openvino", x, 1, (1, 4), lambda s: None, timer,
                                    accept=lambda artifact: "agreement with torch 0.9 < min_agreement 0.98")
    assert out == path and choice["float_layers"] == [] and choice["whole_graph_rejected"]
    assert not sp.mixed_onnx(path, tmp_path, "openvino").exists()
    assert not list(tmp_path.glob("*openvino-speed*"))  # nor the IR prepared from it
