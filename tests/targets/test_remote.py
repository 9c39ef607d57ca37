"""Remote devices over a real OpenSSH server on 127.0.0.1: a throwaway host key and user key
made here, a non-default port, running as the current user. A deployment through it gets
the accuracy the local run of the same artifact gets; an unreachable host, a refused key and
a device without the runtime each fail early with one line saying what to do."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compress.config import ConfigError
from compress.config_load import load_config
from compress.evaluate import compare, logits_of, preprocess
from compress.export import export_model
from compress.train import predict
from targets import base
from targets.remote import RemoteDevice, RemoteError, parse_host
from tests.conftest import ROOT

SSHD = "/usr/sbin/sshd"


def _install_sshd() -> str:
    """'' when sshd is there (installed now if needed and possible), else why not."""
    if os.path.exists(SSHD):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "openssh-server is not installed and cannot be installed here (not root / no apt-get)"
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "openssh-server"]):
        if subprocess.run(cmd, capture_output=True, timeout=600).returncode != 0:
            return f"`{' '.join(cmd)}` failed (no network?)"
    return "" if os.path.exists(SSHD) else "openssh-server installed but /usr/sbin/sshd is missing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    why = _install_sshd()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("sshd")
    host_key, user_key, other_key = _keygen(d / "host_key"), _keygen(d / "id"), _keygen(d / "other")
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(f"""ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {d / 'authorized_keys'}
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
PermitRootLogin prohibit-password
PidFile {d / 'sshd.pid'}
""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config"), "-p", str(port)],
                            stderr=open(d / "sshd.log", "w"))
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-300:]}")
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    yield {"url": f"ssh://{user}@127.0.0.1:{port}", "key": str(user_key), "other": str(other_key),
           "known_hosts": str(d / "known_hosts"), "port": port, "user": user}
    proc.terminate()
    proc.wait(timeout=10)


def device(sshd, python=sys.executable, key="key"):
    return RemoteDevice(sshd["url"], python, sshd[key], sshd["known_hosts"])


def test_host_urls_are_checked_in_the_config():
    assert parse_host("ssh://me@board:2200").port == 2200 and parse_host("ssh://board").dest == "board"
    for bad in ("me@board", "ssh://me@board:notaport", "ssh:///path", "https://board"):
        with pytest.raises(ValueError, match="expected ssh://"):
            parse_host(bad)
    with pytest.raises(ConfigError, match=r"targets.0.host: expected ssh://\[user@\]host\[:port\], got 'board:22'"):
        load_config(ROOT / "examples" / "tiny.yaml", ["targets=[{backend: onnxruntime, host: 'board:22'}]"])


def test_unreachable_host_and_refused_key_fail_early_with_one_line(sshd):
    closed = RemoteDevice(f"ssh://{sshd['user']}@127.0.0.1:{_free_port()}", sys.executable, sshd["key"],
                          sshd["known_hosts"])
    with pytest.raises(RemoteError, match=r"127.0.0.1:\d+: host unreachable \(.*Connection refused"):
        closed.check()
    with pytest.raises(RemoteError, match=r"key refused \(.*Permission denied.*\); check identity_file"):
        device(sshd, key="other").check()


def test_a_device_without_the_runtime_names_the_package_and_the_install_command(sshd):
    bare = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p) and subprocess.run(
        [p, "-c", "import onnxruntime"], capture_output=True).returncode != 0), None)
    if bare is None:
        pytest.skip("every system python here has onnxruntime")
    with pytest.raises(RemoteError, match=rf"onnxruntime not importable by {bare} on the device; "
                                          rf"install it there with: {bare} -m pip install .*onnxruntime"):
        device(sshd, python=bare).check()
    with pytest.raises(RemoteError, match=r"targets.python: /no/python not found on"):
        device(sshd, python="/no/python").check()


def test_remote_deployment_gets_the_local_accuracy(sshd, trained_tiny, tiny_data, tmp_path):
    manifest = export_model(trained_tiny, tmp_path, tiny_data, 17, False, "tiny")
    onnx = tmp_path / manifest["files"]["onnx"]
    images, labels = tiny_data.test.images.numpy(), tiny_data.test.labels.numpy()
    ref = predict(trained_tiny, tiny_data.test, tiny_data)
    x = preprocess(images, manifest)
    runner = base.get("onnxruntime").compile(onnx, base.CompileOptions(threads=1, work_dir=tmp_path))
    local = compare(logits_of(runner, x, 128), labels, ref)
    job = {"key": "tiny/onnxruntime", "artifact": onnx, "manifest": {"input": manifest["input"]}, "threads": 1,
           "graph_optimization": "ORT_ENABLE_ALL", "inter_op_threads": 1, "int8_ops": sorted(base.INT8_ORT_OPS),
           "float_ops": sorted(base.FLOAT_ORT_COMPUTE)}
    profile = {"warmup": 5, "runs": 100, "max_warmup": 40, "settle_tolerance": 0.05, "throughput_batch": 16,
               "throughput_runs": 5}
    dev = device(sshd)
    try:
        assert dev.check()["versions"]["onnxruntime"]
        res = dev.measure([job], images, labels, {job["key"]: ref}, profile, rounds=4, batch_size=128)
        first = set(dev.copied)
        dev.measure([job], images, labels, {job["key"]: ref}, profile, rounds=4, batch_size=128)
        again = dev.copied
    finally:
        dev.close()
    row = res["results"][job["key"]]
    assert local["accuracy"] >= 0.9
    assert row["accuracy"] == local["accuracy"] and row["agreement"] == local["agreement"]
    assert np.isclose(row["max_abs_diff"], local["max_abs_diff"], atol=1e-5)
    assert row["executed_precision"]["summary"] == runner.info["executed_precision"]["summary"]
    assert len(row["rounds"]) == 4 and row["latency_ms"]["p50"] > 0 and row["throughput"]["items_per_s"] > 0
    assert res["key"] and res["fingerprint"]["cores"] == os.cpu_count()
    # the first bench copies the split, the references, the model and the job; the next one
    # nothing at all (names carry content digests; the device may hold them from an earlier test run)
    assert {n.split("-")[0] for n in first} <= {"inputs", "refs", "model", "job"} and again == []


@pytest.mark.slow
def test_compress_bench_measures_a_host_target_like_the_local_one(sshd, tmp_path):
    """The whole command on a short run: the same artifacts on ORT here and on ORT through sshd."""
    from typer.testing import CliRunner

    from cli import app
    from tests.compress.test_bench import _short_run
    remote = (f"{{backend: onnxruntime, threads: 1, host: '{sshd['url']}', python: {sys.executable}, "
              f"identity_file: {sshd['key']}, known_hosts: {sshd['known_hosts']}}}")
    args = [a if not a.startswith("targets=") else f"targets=[{{backend: onnxruntime, threads: 1}}, {remote}]"
            for a in _short_run(tmp_path)]
    res = CliRunner().invoke(app, ["bench", str(ROOT / "examples" / "tiny.yaml"), *args, "--floor", "0",
                                   "--device", "here"])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "tiny" / "bench.json").read_text())
    here = out["devices"].pop("here")["cases"]
    (there,) = out["devices"].values()
    assert there["host"] == sshd["url"] and set(there["cases"]) == set(here) == {
        "teacher/onnxruntime", "distill/onnxruntime", "quantize/onnxruntime"}
    for key, c in here.items():
        r = there["cases"][key]
        assert r["status"] == c["status"] == "ok" and r["executed_precision"] == c["executed_precision"]
        for m in ("accuracy", "agreement", "size_bytes"):
            assert r["metrics"][m]["value"] == c["metrics"][m]["value"], (key, m)
    assert set(out["remote_overhead_s"][sshd["url"]]) >= {"connect", "check", "measure", "on_device"}


def test_compress_run_never_measures_a_remote_target_here(tmp_path):
    """A host: target in `compress run` is a skipped row naming the device and `compress bench`
    (measuring it on this machine under the device's name would be a wrong number)."""
    from types import SimpleNamespace

    from compress.deploy import deploy_one
    from compress.plan import target_spec
    entry = SimpleNamespace(backend="onnxruntime", threads=1, device="cpu", options=None,
                            parity=SimpleNamespace(model_dump=lambda: {}), host="ssh://me@board:2222")
    spec = target_spec(entry)
    assert spec.host == "ssh://me@board:2222"
    row = deploy_one(SimpleNamespace(task=None), "quantize", tmp_path,
                     {"precision": "int8", "files": {"onnx": "model.onnx"}}, spec, None, None, None)
    assert row["status"] == "skipped" and "ssh://me@board:2222" in row["reason"]
    assert "compress bench" in row["reason"] and row["latency_ms"] is None
