"""The three latency figures (Python call, the runtime's own timer, the vendor's tool) and the
OpenVINO throughput search: present, positive, labelled. Never timed against a bound."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from compress.report import timer_cells
from targets import base, ov_throughput, vendor
from targets.profile import PYTHON_TIMER, profile
from tests.targets.test_backends import tiny_onnx


class Fake:
    info = {"threads": 1}

    def __init__(self, own=True, tool=True):
        self.calls, self.asked = 0, []
        if own:
            self.runtime_latency = lambda x, runs: {"p50": 0.5, "runs": runs, "timer": "fake C++ timer"}
        if tool:
            self.vendor_latency = lambda shape, s: self.asked.append((shape, s)) or {"tool": "fakebench", "p50": 0.4}

    def __call__(self, x):
        self.calls += 1
        return np.zeros((len(x), 2), np.float32)


class Inner(Fake):
    """A runner that records the runtime's timer per call (as TensorRT's CUDA events do)."""
    inner_ms: list = []

    def __call__(self, x):
        self.inner_ms.append(0.25)
        return super().__call__(x)


def test_each_figure_is_labelled_and_the_vendor_tool_gets_the_latency_shape():
    r = Fake()
    lat = profile(r, np.zeros((4, 1, 2, 2), np.float32), warmup=1, runs=100, throughput_batch=4,
                  throughput_runs=1, vendor_seconds=3)["latency_ms"]
    assert lat["timer"] == PYTHON_TIMER and lat["runtime"] == {"p50": 0.5, "runs": 100, "timer": "fake C++ timer"}
    assert lat["vendor"]["tool"] == "fakebench" and r.asked == [((1, 1, 2, 2), 3)]


def test_without_hooks_the_runtime_figure_comes_from_inner_ms_or_is_none():
    bare = Fake(own=False, tool=False)
    lat = profile(bare, np.zeros((2, 3), np.float32), warmup=1, runs=100, throughput_batch=2, throughput_runs=1)
    assert lat["latency_ms"]["runtime"] is None and lat["latency_ms"]["vendor"] is None
    lat = profile(Inner(own=False, tool=False), np.zeros((2, 3), np.float32), warmup=1, runs=100, throughput_batch=2,
                  throughput_runs=1, vendor_seconds=0)["latency_ms"]
    assert lat["runtime"]["p50"] == 0.25 and "per-call timer" in lat["runtime"]["timer"]


def test_benchmark_app_command_carries_our_settings_and_its_median_parses():
    ours = {"threads": 2, "streams": 1, "pinning": True, "precision": "f32", "hint": "LATENCY"}
    cmd = vendor.benchmark_app_cmd(["benchmark_app"], "m.xml", ours, (64, 1, 28, 28), 2)
    text = " ".join(cmd)
    assert "-hint none -nthreads 2 -nstreams 1 -nireq 1 -pin YES -infer_precision f32" in text
    assert "-data_shape [64,1,28,28] -t 2" in text  # a dynamic model stays dynamic, as ours runs
    static = vendor.benchmark_app_cmd(["benchmark_app"], "m.xml", {**ours, "static": True}, (1, 3), 1)
    assert "-shape [1,3]" in " ".join(static)
    assert vendor.parse_median_ms("[ INFO ]    Median:        83.97 us\n") == pytest.approx(0.08397)
    assert vendor.parse_median_ms("[ INFO ]    Median:        2.71 ms\n") == pytest.approx(2.71)
    with pytest.raises(ValueError):
        vendor.parse_median_ms("[ ERROR ] no model")


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_real_backends_report_their_own_timer_and_the_vendor_tool(backend, tmp_path):
    path = tmp_path / "tiny.onnx"
    tiny_onnx(path, np.random.default_rng(0))
    res = CliRunner().invoke(app, ["profile", str(path), "--backend", backend, "--threads", "1", "--runs", "100",
                                   "--throughput-runs", "2", "--warmup", "2", "--json"])
    assert res.exit_code == 0, res.output
    lat = json.loads(res.output)["latency_ms"]
    assert lat["p50"] > 0 and lat["runtime"]["p50"] > 0 and lat["runtime"]["runs"] == 100
    if backend == "openvino":
        assert "InferRequest.latency" in lat["runtime"]["timer"]
        assert lat["vendor"]["tool"] == "benchmark_app" and lat["vendor"]["p50"] > 0, lat["vendor"]
        cmd = lat["vendor"]["command"]
        assert "-nthreads 1 -nstreams 1" in cmd and "-data_shape [1,1,8,8]" in cmd
    else:
        assert "model_run" in lat["runtime"]["timer"]
        assert lat["vendor"]["tool"] == "onnxruntime_perf_test" and lat["vendor"]["p50"] is None
        assert "onnxruntime_perf_test" in lat["vendor"]["status"]


def test_throughput_grid_holds_the_hints_choice_and_splits_only_dynamic_batches():
    g = ov_throughput.grid(2, 64, True, (2, 2))
    assert (2, 2, 64) in g and (1, 1, 16) in g and len(g) == len(set(g)) == 8
    assert {c[2] for c in ov_throughput.grid(2, 64, False, (2, 2))} == {64}
    assert ov_throughput.grid(4, 8, True, (3, 3))[0] == (3, 3, 8)
    parts = ov_throughput.split([np.zeros((8, 1)), np.ones((8, 1))], 2)
    assert len(parts) == 8 and all(len(p) == 2 for p in parts) and parts[-1][0, 0] == 1


def test_openvino_throughput_is_the_searched_best(tmp_path):
    path = tmp_path / "tiny.onnx"
    tiny_onnx(path, np.random.default_rng(0))
    r = base.get("openvino").compile(path, base.CompileOptions(threads=2, work_dir=tmp_path))
    out = r.run_many([np.zeros((16, 1, 8, 8), np.float32)] * 2)
    best = max(out["search"], key=lambda row: row["items_per_s"])
    assert (out["streams"], out["infer_requests"], out["request_batch"]) == (
        best["streams"], best["infer_requests"], best["request_batch"])
    assert all(row["items_per_s"] > 0 for row in out["search"]) and "by measurement" in out["mode"]
    hint = out["hint_choice"]
    assert any((row["streams"], row["infer_requests"]) == (hint["streams"], hint["infer_requests"])
               for row in out["search"])


def test_report_cells_show_each_figure_and_the_share_of_the_limit():
    lat = {"runtime": {"p50": 0.0912}, "vendor": {"tool": "benchmark_app", "p50": 0.0874}}
    cells = timer_cells(lat, {"gmac_per_s": 217.04, "int8_limit_fraction": 0.653})
    assert cells == "0.091 | 0.087 (benchmark_app) | 217.0 (65%)"
    assert timer_cells({}, {}) == "— | — | —"


def test_onnxruntime_throughput_is_the_searched_best(tmp_path):
    path = tmp_path / "tiny.onnx"
    tiny_onnx(path, np.random.default_rng(0))
    r = base.get("onnxruntime").compile(path, base.CompileOptions(threads=2, work_dir=tmp_path))
    out = r.run_many([np.zeros((16, 1, 8, 8), np.float32)] * 3)
    assert {(row["callers"], row["intra_op_threads"]) for row in out["search"]} == {(1, 2), (2, 1)}
    best = max(out["search"], key=lambda row: row["items_per_s"])
    assert (out["callers"], out["intra_op_threads"]) == (best["callers"], best["intra_op_threads"])
    callers = r._many.candidates[(2, 1)]  # each caller runs its own single-threaded session of the file
    assert len({id(s) for s in callers}) == 2 and all(
        s.get_session_options().intra_op_num_threads == 1 for s in callers)
    one = base.get("onnxruntime").compile(path, base.CompileOptions(threads=1, work_dir=tmp_path))
    assert [(row["callers"], row["intra_op_threads"]) for row in one.run_many([np.zeros((4, 1, 8, 8), np.float32)])
            ["search"]] == [(1, 1)]  # one thread: nothing to split
