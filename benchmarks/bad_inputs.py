"""Try bad inputs as a new user would (issue 14 item 4) and print how each ends: clear (exit 2,
one line naming the field, file or option), partly clear (exit 2 but not one line, or not
naming it), traceback (an exception escaped), accepted (exit 0). In-process through the CLI.

    python benchmarks/bad_inputs.py [--code DIR]   # DIR: another checkout's code (a before/after count)
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def cases_module():
    """tests/test_bad_inputs.py of this checkout, whatever code --code puts first on the path."""
    spec = importlib.util.spec_from_file_location("bad_cases", HERE / "tests" / "test_bad_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bad_cases"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def more_cases(m) -> list:
    """Bad inputs beyond the issue's list: files, types, sizes, nested unknown keys, CLI options."""
    C, cfg, sets, prof, s = m.Case, m.config, m.sets, m.profile, m._set

    def text(t: str | bytes):
        def make(tmp: Path) -> list:
            p = tmp / "c.yaml"
            p.write_bytes(t if isinstance(t, bytes) else t.encode())
            return ["validate", p]
        return make

    def drop(key: str):
        return cfg(lambda c, t: c.pop(key))

    def ckpt(data: bytes, suffix: str = ".pt"):
        def edit(c: dict, tmp: Path) -> None:
            (tmp / f"t{suffix}").write_bytes(data)
            c["teacher"] = {"model": "resnet_tiny_teacher", "checkpoint": str(tmp / f"t{suffix}")}
        return cfg(edit)

    def other_model_ckpt(c: dict, tmp: Path) -> None:
        import torch
        torch.save(torch.nn.Linear(3, 2).state_dict(), tmp / "lin.pt")
        c["teacher"] = {"model": "resnet_tiny_teacher", "checkpoint": str(tmp / "lin.pt")}

    def checkpoint_dir(c: dict, tmp: Path) -> None:
        (tmp / "d.pt").mkdir()
        c["teacher"] = {"model": "resnet_tiny_teacher", "checkpoint": str(tmp / "d.pt")}

    def model_file(name: str, data: bytes | None):
        def make(tmp: Path) -> list:
            p = tmp / name
            p.mkdir() if data is None else p.write_bytes(data)
            return ["profile", p]
        return make

    def missing_config(tmp: Path) -> list:
        return ["validate", tmp / "nope.yaml"]

    def dir_config(tmp: Path) -> list:
        (tmp / "d.yaml").mkdir()
        return ["validate", tmp / "d.yaml"]

    def output_is_file(c: dict, tmp: Path) -> None:
        (tmp / "out").write_text("")
        c["output"]["dir"] = str(tmp / "out")

    return [
        C("file-empty", text(""), "c.yaml"),
        C("file-top-level-list", text("- name: a\n- seed: 1\n"), "c.yaml"),
        C("file-top-level-scalar", text("just a string\n"), "c.yaml"),
        C("file-not-utf8", text(b"name: \xff\xfe\x00bad\n"), "c.yaml"),
        C("file-is-a-directory", dir_config, "d.yaml"),
        C("file-missing", missing_config, "nope.yaml"),
        C("file-bad-yaml", text("name: [a,\nseed: 1\n"), "c.yaml"),
        C("file-python-tag", text("name: !!python/object/apply:os.system ['true']\n"), "c.yaml"),
        C("file-duplicate-key", text("name: a\nname: b\nteacher: {model: resnet_tiny_teacher, train: {epochs: 1}}\n"
                                     "data: {dataset: synthetic}\n"), "name"),
        C("name-missing", drop("name"), "name"),
        C("name-empty", cfg(s("name", "")), "name"),
        C("name-slash", cfg(s("name", "a/b")), "name"),
        C("seed-string", cfg(s("seed", "abc")), "seed"),
        C("seed-negative", cfg(s("seed", -1)), "seed"),
        C("seed-float", cfg(s("seed", 1.5)), "seed"),
        C("batch-size-0", cfg(s("data.batch_size", 0)), "data.batch_size"),
        C("batch-size-negative", cfg(s("data.batch_size", -4)), "data.batch_size"),
        C("batch-size-string", cfg(s("data.batch_size", "big")), "data.batch_size"),
        C("dataset-unknown", cfg(s("data.dataset", "imagenet")), "data.dataset"),
        C("dataset-factory-missing-module", cfg(s("data.dataset", "no_such_mod:make")), "data.dataset"),
        C("synthetic-one-class", cfg(s("data.synthetic.num_classes", 1)), "data.synthetic.num_classes"),
        C("nested-unknown-key-data", cfg(s("data.synthetic.colour", 3)), "data.synthetic.colour"),
        C("nested-unknown-key-train", cfg(s("teacher.train.epoch", 3)), "teacher.train.epoch"),
        C("nested-unknown-key-target", cfg(s("targets.0.thread", 3)), "targets.0.thread"),
        C("image-folder-missing-root", cfg(s("data", {"dataset": "image_folder", "root": "/nonexistent"})),
          "/nonexistent"),
        C("limit-test-over-data", cfg(s("data.limit_test", 10_000)), "limit_test"),
        C("calib-samples-0", cfg(s("data.calib_samples", 0)), "data.calib_samples"),
        C("teacher-missing", drop("teacher"), "teacher"),
        C("teacher-empty-list", cfg(s("teacher", [])), "teacher"),
        C("teacher-model-unknown", cfg(s("teacher.model", "resnet_huge")), "teacher.model"),
        C("teacher-both-train-and-checkpoint", cfg(s("teacher.checkpoint", "x.pt")), "teacher"),
        C("checkpoint-is-directory", cfg(checkpoint_dir), "d.pt"),
        C("checkpoint-random-bytes", ckpt(b"\x00garbage" * 10), "t.pt"),
        C("checkpoint-bad-safetensors", ckpt(b"\x10\x00\x00\x00\x00\x00\x00\x00{}", ".safetensors"), "t.safetensors"),
        C("checkpoint-other-model", cfg(other_model_ckpt), "teacher"),
        C("student-kwargs-unknown", cfg(s("student.kwargs", {"no_such_arg": 3})), "student"),
        C("stages-not-a-list", cfg(s("stages", {"kind": "distill"})), "stages"),
        C("stage-kind-unknown", cfg(s("stages.0.kind", "sparsify")), "stages.0"),
        C("stage-kind-missing", cfg(lambda c, t: c["stages"][0].pop("kind")), "stages.0"),
        C("stage-lr-negative", cfg(s("stages.0.lr", -0.1)), "stages.0.lr"),
        C("stage-loss-unknown", cfg(s("stages.0.loss", [{"kind": "hinge"}])), "stages.0.loss"),
        C("stage-loss-weight-string", cfg(s("stages.0.loss", [{"kind": "kl", "weight": "heavy"}])), "stages.0.loss"),
        C("stage-features-unknown-layer", cfg(s("stages.0.features", [{"student": "nope", "teacher": "fc"}])),
          "nope"),
        C("prune-ratio-1.5", cfg(s("stages", [{"kind": "prune", "ratio": 1.5}])), "stages.0.ratio"),
        C("quantize-act-bits-99", cfg(s("stages", [{"kind": "quantize", "act_bits": 99}])), "stages.0.act_bits"),
        C("export-opset-7", cfg(s("export", {"opset": 7})), "export.opset"),
        C("export-openvino-ir-moved", cfg(s("export", {"openvino_ir": True})), "openvino_ir"),
        C("target-backend-unknown", cfg(s("targets.0.backend", "tflite")), "targets.0.backend"),
        C("target-threads-0", cfg(s("targets.0.threads", 0)), "targets.0.threads"),
        C("target-host-bad", cfg(s("targets.0.host", "ftp://x")), "targets.0.host"),
        C("targets-a-string", cfg(s("targets", "onnxruntime")), "targets"),
        C("profile-runs-5", cfg(s("profile", {"runs": 5})), "profile.runs"),
        C("profile-throughput-batch-0-config", cfg(s("profile", {"throughput_batch": 0})), "profile.throughput_batch"),
        C("output-dir-is-a-file", cfg(output_is_file), "output.dir"),
        C("output-a-string", cfg(s("output", "runs")), "output"),
        C("device-upper-case", cfg(s("device", "CUDA")), "device"),
        C("task-unknown", cfg(s("task", "detection")), "task"),
        C("metric-no-colon", cfg(s("metric", "accuracy")), "metric"),
        C("set-without-equals", sets("seed"), "--set"),
        C("set-index-out-of-range", sets("stages.5.epochs=1"), "stages.5"),
        C("set-into-a-scalar", sets("name.x=1"), "name"),
        C("set-config-dir", sets("config_dir=/"), "config_dir"),
        C("profile-missing-file", lambda t: ["profile", t / "gone.onnx"], "gone.onnx"),
        C("profile-directory", model_file("d.onnx", None), "d.onnx"),
        C("profile-garbage-onnx", model_file("g.onnx", b"\x08\x01garbage"), "g.onnx"),
        C("profile-wrong-suffix", model_file("m.tflite", b"x"), "m.tflite"),
        C("profile-shape-bad", prof("--shape", "axb"), "--shape"),
        C("profile-option-unknown", prof("--option", "no_such=1"), "--option"),
        C("profile-option-no-equals", prof("--option", "threads"), "--option"),
        C("profile-runs-5", prof("--runs", "5"), "--runs"),
        C("profile-warmup-negative", prof("--warmup", "-1"), "--warmup"),
        C("profile-throughput-runs-0", prof("--throughput-runs", "0"), "--throughput-runs"),
        C("profile-batch-string", prof("--batch", "two"), "--batch"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--code", type=Path, default=HERE, help="checkout whose compress/cli code is tried")
    args = ap.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    os.chdir(args.code)
    m = cases_module()
    rows = [("issue", c) for c in m.ISSUE_CASES + m.EXTRA_CASES] + [("own", c) for c in more_cases(m)]
    counts: dict = collections.defaultdict(collections.Counter)
    for group, case in rows:
        if case.id == "output-dir-read-only" and os.geteuid() == 0:
            print(f"{'skipped':13} {group:5} {case.id:36} root writes into read-only folders")
            continue
        with tempfile.TemporaryDirectory() as d:
            try:
                res = m.invoke(case.make(Path(d)))
                how = m.outcome(res, case.expect)
                first = (res.output.strip().splitlines() or [repr(res.exception)])[-1 if how == "clear" else 0]
            except Exception as e:  # the harness itself (e.g. an old checkout lacks a helper)
                how, first = "traceback", f"{type(e).__name__}: {e}"
            if how == "traceback" and res.exception is not None:
                first = f"{type(res.exception).__name__}: {res.exception}"
        counts[group][how] += 1
        print(f"{how:13} {group:5} {case.id:36} {' '.join(str(first).split())[:110]}")
    kinds = ("clear", "partly clear", "traceback", "accepted")
    print(f"\n{'':13} {'total':>5} " + " ".join(f"{k:>12}" for k in kinds))
    for group in ("issue", "own"):
        c = counts[group]
        print(f"{group:13} {sum(c.values()):5} " + " ".join(f"{c[k]:12}" for k in kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
