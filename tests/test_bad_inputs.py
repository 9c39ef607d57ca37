"""Issue 14 item 4: every bad input a new user tried ends in exit code 2 and one readable line
naming the field or file, before any training. Each case runs the CLI in-process (fast);
benchmarks/bad_inputs.py runs these and more and prints how each ends."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli import app


def base_config(out: Path) -> dict:
    """A tiny run that validates: synthetic data, tiny models, one distill stage."""
    return {"name": "bad", "seed": 0,
            "data": {"dataset": "synthetic", "batch_size": 16,
                     "synthetic": {"train_size": 64, "test_size": 32, "image_size": 16}},
            "teacher": {"model": "resnet_tiny_teacher", "train": {"epochs": 1}},
            "student": {"model": "resnet_tiny"},
            "stages": [{"kind": "distill", "epochs": 1}],
            "targets": [{"backend": "onnxruntime", "threads": 1}],
            "output": {"dir": str(out / "runs")}}


def write(tmp: Path, cfg, name: str = "c.yaml") -> Path:
    p = tmp / name
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return p


@dataclass
class Case:
    id: str
    make: Callable[[Path], list]  # tmp dir -> CLI arguments
    expect: str  # a piece of the one line (the field, file or option it names)
    extra: dict = field(default_factory=dict)


def config(edit: Callable[[dict, Path], object]) -> Callable[[Path], list]:
    """validate a config: the base one changed in place by edit(cfg, tmp)."""
    def make(tmp: Path) -> list:
        cfg = base_config(tmp)
        edit(cfg, tmp)
        return ["validate", write(tmp, cfg)]
    return make


def sets(*assignments: str) -> Callable[[Path], list]:
    def make(tmp: Path) -> list:
        args = ["validate", write(tmp, base_config(tmp))]
        for a in assignments:
            args += ["--set", a]
        return args
    return make


def profile(*args: str) -> Callable[[Path], list]:
    def make(tmp: Path) -> list:
        m = tmp / "m.onnx"
        if not m.exists():
            net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
            torch.onnx.export(net, torch.zeros(1, 4), str(m), dynamo=False)
        return ["profile", m, "--runs", "100", "--warmup", "0", "--throughput-runs", "1", *args]
    return make


def checkpoint(state_or_bytes) -> Callable[[dict, Path], None]:
    def edit(cfg: dict, tmp: Path) -> None:
        p = tmp / "t.pt"
        if isinstance(state_or_bytes, bytes):
            p.write_bytes(state_or_bytes)
        else:
            torch.save(state_or_bytes(), p)
        cfg["teacher"]["checkpoint"] = str(p)
        del cfg["teacher"]["train"]
    return edit


def nan_weights() -> dict:
    from compress.models import build
    state = build("resnet_tiny_teacher", 10, 1, {}, [1, 16, 16]).model.state_dict()
    next(v for k, v in state.items() if k.endswith("weight")).fill_(float("nan"))
    return state


def idx_labels_out_of_range(cfg: dict, tmp: Path) -> None:
    import gzip
    import struct
    root = tmp / "fm"
    root.mkdir()
    for part, n in (("train", 20), ("t10k", 10)):
        images = struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + bytes(n * 28 * 28)
        labels = struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes([3] * (n - 1) + [42])
        (root / f"{part}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (root / f"{part}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    cfg["data"] = {"dataset": "fashion_mnist", "root": str(root), "batch_size": 4}


def _set(path: str, value) -> Callable[[dict, Path], None]:
    def edit(cfg: dict, tmp: Path) -> None:
        node = cfg
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return edit


def read_only_output(cfg: dict, tmp: Path) -> None:
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    cfg["output"]["dir"] = str(d)


def under_a_file(cfg: dict, tmp: Path) -> None:
    (tmp / "f").write_text("")
    cfg["output"]["dir"] = str(tmp / "f" / "runs")


# the examples named in issue 14 item 4, each as a user would type it
ISSUE_CASES = [
    Case("set-unclosed-list", sets("data.batch_size=[1,"), "data.batch_size"),
    Case("set-nested-mapping", sets("name=a: b: c"), "name"),
    Case("set-python-tag", sets("seed=!!python/name:os.system"), "seed"),
    Case("model-spec-dot", config(_set("student.model", ".models:build")), "student.model"),
    Case("error-path-pastes-into-set", sets("stages.0.epochz=2"), "stages.0.epochz"),
    Case("missing-checkpoint", config(_set("teacher", {"model": "resnet_tiny_teacher", "checkpoint": "nope.pt"})),
         "nope.pt"),
    Case("missing-data-root", config(_set("data", {"dataset": "fashion_mnist", "root": "/nonexistent/fm"})),
         "data.root"),
    Case("prune-ignored-unknown", config(_set("stages", [{"kind": "prune", "ratio": 0.3, "epochs": 1,
                                                          "ignored": ["no_such_layer"]}])), "no_such_layer"),
    Case("layer-bits-unknown", config(_set("stages", [{"kind": "quantize", "epochs": 1,
                                                       "layer_bits": {"no_such_layer": 4}}])), "no_such_layer"),
    Case("device-tpu", config(_set("device", "tpu")), "device"),
    Case("device-cuda-without-gpu", config(_set("device", "cuda")), "device"),
    Case("epochs-inf", config(_set("stages.0.epochs", math.inf)), "stages.0.epochs"),
    Case("seed-2-70", config(_set("seed", 2 ** 70)), "seed"),
    Case("nul-in-name", config(_set("name", "a\0b")), "name"),
    Case("two-quantize", config(_set("stages", [{"kind": "quantize", "epochs": 1}, {"kind": "quantize", "epochs": 1}])),
         "stages.1"),
    Case("prune-after-quantize", config(_set("stages", [{"kind": "quantize", "epochs": 1},
                                                        {"kind": "prune", "ratio": 0.3, "epochs": 1}])), "stages.1"),
    Case("export-stages-unknown", config(_set("export", {"stages": ["nope"]})), "export.stages"),
    Case("output-dir-read-only", config(read_only_output), "output.dir"),
    Case("output-dir-under-a-file", config(under_a_file), "output.dir"),
    Case("checkpoint-empty-pt", config(checkpoint(b"")), "t.pt"),
    Case("checkpoint-nan", config(checkpoint(nan_weights)), "NaN"),
    Case("idx-labels-out-of-range", config(idx_labels_out_of_range), "label"),
    Case("limit-train-over-data", config(_set("data.limit_train", 10_000)), "limit_train"),
    Case("calib-samples-over-data", config(_set("data.calib_samples", 10_000)), "calib_samples"),
    Case("profile-batch-0", profile("--batch", "0"), "--batch"),
    Case("profile-batch-neg", profile("--batch", "-1"), "--batch"),
    Case("profile-threads-neg", profile("--threads", "-3"), "--threads"),
    Case("profile-throughput-batch-0", profile("--throughput-batch", "0"), "--throughput-batch"),
    Case("profile-backend-foo", profile("--backend", "foo"), "--backend"),
    Case("epochs-negative", config(_set("stages.0.epochs", -1)), "stages.0.epochs"),
]


def invoke(args: list):
    return CliRunner().invoke(app, [str(a) for a in args])


def outcome(res, expect: str) -> str:
    """clear | partly clear | traceback | accepted: how a bad input ended."""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        return "traceback"
    if res.exit_code == 0:
        return "accepted"
    text = res.output.strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    one = len(lines) == 1 or (len(lines) == 2 and "invalid config" in lines[0])
    if res.exit_code == 2 and one and expect.lower() in text.lower() and "Traceback" not in text:
        return "clear"
    return "partly clear"


@pytest.mark.parametrize("case", ISSUE_CASES, ids=lambda c: c.id)
def test_bad_input_exits_2_with_one_line(case, tmp_path):
    if case.id == "output-dir-read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    if case.id == "device-cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = invoke(case.make(tmp_path))
    assert outcome(res, case.expect) == "clear", (res.exit_code, res.output, repr(res.exception))


class Branchy(torch.nn.Module):
    """Python control flow on a tensor value (as torchvision's swin_t pads only where needed):
    torch.fx cannot trace it."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:
            x = x.relu()
        return self.fc(x.mean((2, 3)))


def _quantize_untraceable(cfg: dict, tmp: Path) -> None:
    cfg["student"]["model"] = "tests.test_bad_inputs:Branchy"
    cfg["stages"].append({"kind": "quantize", "epochs": 0})


def _shuffle(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.size()
    return x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(torch.nn.Module):
    """torchvision ShuffleNetV2's unit, one conv per branch: split (or downsample into two
    branches), concat, channel shuffle."""

    def __init__(self, c: int, down: bool):
        super().__init__()
        self.down = down
        self.branch1 = torch.nn.Conv2d(c, c // 2, 1, stride=2) if down else None
        self.branch2 = torch.nn.Conv2d(c if down else c // 2, c // 2, 1, stride=2 if down else 1)

    def forward(self, x):
        if self.down:
            return _shuffle(torch.cat((self.branch1(x), self.branch2(x)), 1))
        x1, x2 = x.chunk(2, dim=1)
        return _shuffle(torch.cat((x1, self.branch2(x2)), 1))


class Shuffly(torch.nn.Module):
    """A downsampling unit and two split units: torch-pruning 1.6.1's index mapping divides by
    zero on the second shuffle (as on torchvision's shufflenet_v2_x0_5)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
        self.units = torch.nn.Sequential(ShuffleUnit(8, True), ShuffleUnit(8, False), ShuffleUnit(8, False))
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


class Pooly(torch.nn.Module):
    """torchvision VGG's head on small images: 16x16 features pooled to 7x7 (torch upsamples;
    the ONNX exporter refuses)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 4, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(7)
        self.fc = torch.nn.Linear(4 * 7 * 7, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


def _pool_unexportable(cfg: dict, tmp: Path) -> None:
    cfg["student"]["model"] = "tests.test_bad_inputs:Pooly"


class Mixy(torch.nn.Module):
    """timm MixNet's mixed conv: fixed split sizes, which pruning the conv before leaves stale."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels, 16, 3, padding=1)
        self.mix = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, k, padding=k // 2) for k in (3, 5))
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        parts = torch.split(self.stem(x), [8, 8], dim=1)
        x = torch.cat([conv(p) for conv, p in zip(self.mix, parts)], 1)
        return self.fc(x.mean((2, 3)))


def _prune_stale_splits(cfg: dict, tmp: Path) -> None:
    cfg["student"]["model"] = "tests.test_bad_inputs:Mixy"
    cfg["stages"].append({"kind": "prune", "ratio": 0.5, "epochs": 0})


def _prune_unmappable(cfg: dict, tmp: Path) -> None:
    cfg["student"]["model"] = "tests.test_bad_inputs:Shuffly"
    cfg["stages"].append({"kind": "prune", "ratio": 0.3, "epochs": 0})


EXTRA_CASES = [
    Case("quantize-untraceable-student", config(_quantize_untraceable), "stages.1: the quantize stage traces"),
    Case("prune-unmappable-channels", config(_prune_unmappable), "stages.1: torch-pruning cannot build the pruner for"),
    Case("prune-stale-splits", config(_prune_stale_splits), "stages.1: torch-pruning cannot run this student once"),
    Case("export-unexportable-pool", config(_pool_unexportable), "`pool` (AdaptiveAvgPool2d) pools 16x16 to 7x7"),
    Case("epochs-0-distill", config(_set("stages.0.epochs", 0)), "stages.0.epochs"),
    Case("epochs-0-teacher", config(_set("teacher.train.epochs", 0)), "teacher.train.epochs"),
    Case("stdlib-factory", config(_set("student.model", "os:system")), "standard library"),
    Case("builtins-factory", config(_set("data.dataset", "builtins:eval")), "standard library"),
]


@pytest.mark.parametrize("case", EXTRA_CASES, ids=lambda c: c.id)
def test_more_bad_inputs_exit_2(case, tmp_path):
    res = invoke(case.make(tmp_path))
    assert outcome(res, case.expect) == "clear", (res.exit_code, res.output, repr(res.exception))


@pytest.mark.parametrize("kind", ["quantize", "prune"])
def test_epochs_0_is_ptq_for_quantize_and_no_recovery_for_prune(kind, tmp_path):
    res = invoke(config(_set("stages", [{"kind": kind, "epochs": 0}]))(tmp_path))
    assert res.exit_code == 0, res.output


def test_config_named_modules_are_recorded_for_the_report():
    from calib.datasets import IMPORTED, resolve_factory
    resolve_factory("compress.models:build", "model")
    assert "compress.models" in IMPORTED


@pytest.mark.parametrize("command", ["validate", "profile"])
def test_ctrl_c_exits_130_with_one_line(command, tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("compress.preflight.preflight", interrupt)
    monkeypatch.setattr("compress.profile_cli.profile_file", interrupt)
    args = config(lambda c, t: None)(tmp_path) if command == "validate" else profile()(tmp_path)
    res = invoke(args)
    assert res.exit_code == 130 and res.output.strip().splitlines() == [f"interrupted: {command} stopped "
                                                                         f"(nothing was written)"], res.output


def test_error_key_path_pastes_back_into_set(tmp_path):
    """The path an error names is one --set accepts: fixing it there makes the config valid."""
    res = invoke(sets("stages.0.epochs=-1")(tmp_path))
    path = res.output.strip().splitlines()[-1].split(":")[0].strip()
    assert path == "stages.0.epochs"
    assert invoke(sets(f"{path}=2")(tmp_path)).exit_code == 0
