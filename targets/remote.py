"""A deployment on another machine over SSH: the artifact, its manifest's preprocessing and a
self-contained runner script (targets/remote_runner.py: numpy + onnxruntime, no torch, no
project install) are copied to the device, the test split is copied once and cached there by
digest, and the device evaluates and times every artifact itself (so no network time is in
its latency) and answers with one JSON object.

Why the system `ssh`/`scp` (subprocess) and not paramiko/asyncssh: it is what people already
use to reach the board, so ~/.ssh/config, ProxyJump, agents, hardware keys and known_hosts work
as they do for them, and an error reads as the one they would see by hand; it adds no
dependency; and connection multiplexing (ControlMaster) makes each further call cost a few
milliseconds instead of a handshake. BatchMode=yes makes a refused key an error, never a
password prompt in CI.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import numpy as np

from compress.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# what the device runs: the runner and the three numpy-only project files it imports
SUPPORT = {"remote_runner.py": ROOT / "targets" / "remote_runner.py",
           "compress_evaluate.py": ROOT / "compress" / "evaluate.py",
           "compress_profile.py": ROOT / "targets" / "profile.py",
           "compress_fingerprint.py": ROOT / "compress" / "fingerprint.py"}
CACHE = ".cache/compress-bench"  # relative to the remote user's home (ssh's working directory)
BACKENDS = ("onnxruntime",)  # what the runner script can run


class RemoteError(UserError):
    """The device cannot be used: unreachable, key refused, runtime missing."""


@dataclass(frozen=True)
class SshUrl:
    user: Optional[str]
    host: str
    port: int = 22

    @property
    def dest(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return f"ssh://{self.dest}:{self.port}"


def parse_host(url: str) -> SshUrl:
    """ssh://[user@]host[:port] -> SshUrl; ValueError (one line) for anything else."""
    parts = urlsplit(url)
    try:
        port = parts.port or 22
    except ValueError:
        port = None
    if parts.scheme != "ssh" or not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"expected ssh://[user@]host[:port], got {url!r}")
    return SshUrl(parts.username, parts.hostname, port)


def classify(url: SshUrl, stderr: str) -> str:
    """ssh's failure as one line a person can act on."""
    err = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    if "Permission denied" in stderr:
        return f"{url}: key refused ({err}); check identity_file and the device's authorized_keys"
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION" in stderr:
        return f"{url}: host key does not match known_hosts ({err})"
    return f"{url}: host unreachable ({err})"


class Ssh:
    """Commands and copies to one host through one multiplexed connection."""

    def __init__(self, url: SshUrl, identity_file: Optional[str] = None, known_hosts: Optional[str] = None,
                 timeout: float = 10):
        self.url = url
        self._dir = tempfile.TemporaryDirectory(prefix="compress-ssh-")  # the control socket
        self.opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}",
                     "-o", "ControlMaster=auto", "-o", f"ControlPath={self._dir.name}/%C", "-o", "ControlPersist=60",
                     # trust on first use: a board re-flashed with a new key is then refused, not silently accepted
                     "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR"]
        if identity_file:
            self.opts += ["-i", str(Path(identity_file).expanduser()), "-o", "IdentitiesOnly=yes"]
        if known_hosts:
            self.opts += ["-o", f"UserKnownHostsFile={Path(known_hosts).expanduser()}"]

    def run(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        res = subprocess.run(["ssh", *self.opts, "-p", str(self.url.port), self.url.dest, command],
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode == 255:  # ssh's own failure, not the command's
            raise RemoteError(classify(self.url, res.stderr))
        return res

    def put(self, files: dict[str, Path], remote_dir: str) -> None:
        """Each file streamed through the connection into a temp name, then renamed: needs only
        sh on the device (scp needs an sftp-server or the legacy protocol, which boards lack),
        and an interrupted copy never leaves a file whose digest name lies."""
        for name, src in files.items():
            dest = shlex.quote(f"{remote_dir}/{name}")
            with open(src, "rb") as f:
                res = subprocess.run(["ssh", *self.opts, "-p", str(self.url.port), self.url.dest,
                                      f"cat > {dest}.part && mv {dest}.part {dest}"],
                                     stdin=f, capture_output=True, timeout=600)
            if res.returncode != 0:
                err = res.stderr.decode(errors="replace")
                raise RemoteError(classify(self.url, err) if res.returncode == 255 else
                                  f"{self.url}: copying {name} to {remote_dir} failed: {err.strip()[-300:]}")

    def close(self) -> None:
        subprocess.run(["ssh", *self.opts, "-O", "exit", "-p", str(self.url.port), self.url.dest],
                       capture_output=True, timeout=10)
        self._dir.cleanup()


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    """Of the contents, not of an .npz (whose zip entries carry the time they were written)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class RemoteDevice:
    """One targets[] entry with a host: check it early, then measure artifacts there."""

    def __init__(self, host: str, python: str = "python3", identity_file: Optional[str] = None,
                 known_hosts: Optional[str] = None, where: str = "targets"):
        self.url, self.python, self.where = parse_host(host), python, where
        self.ssh = Ssh(self.url, identity_file, known_hosts)
        self.overhead: dict[str, float] = {}  # seconds per step, for the report
        self.device_seconds = 0.0
        self.copied: list[str] = []  # what the last measure() had to copy (the rest was cached)

    def _timed(self, step: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.overhead[step] = self.overhead.get(step, 0.0) + time.perf_counter() - t0
        return out

    def _sync(self, files: dict[str, Path]) -> None:
        """Copy what the device does not hold yet (names carry a digest: present means same)."""
        have = set(self._timed("connect", self.ssh.run, f"mkdir -p {CACHE} && ls -1 {CACHE}").stdout.split())
        self.copied = [n for n in files if n not in have]
        self._timed("copy", self.ssh.put, {n: files[n] for n in self.copied}, CACHE)

    def _script(self) -> str:
        if not hasattr(self, "tag"):
            raise RuntimeError("RemoteDevice.check() first: it installs the runner on the device")
        return f"{CACHE}/{self.tag}/remote_runner.py"

    def check(self) -> dict:
        """Reachable, key accepted, numpy + onnxruntime importable: or one RemoteError why."""
        self.tag = "runner-" + hashlib.sha256(b"".join(p.read_bytes() for p in SUPPORT.values())).hexdigest()[:12]
        have = self._timed("connect", self.ssh.run, f"mkdir -p {CACHE}/{self.tag} && ls -1 {CACHE}/{self.tag}")
        missing = {n: p for n, p in SUPPORT.items() if n not in set(have.stdout.split())}
        self._timed("copy", self.ssh.put, missing, f"{CACHE}/{self.tag}")
        res = self._timed("check", self.ssh.run, f"{shlex.quote(self.python)} {self._script()} check")
        if res.returncode == 127 or "No such file" in res.stderr and not res.stdout:
            raise RemoteError(f"{self.where}.python: {self.python} not found on {self.url}")
        if res.returncode != 0:
            raise RemoteError(f"{self.url}: the runner failed to start: {res.stderr.strip()[-300:]}")
        info = json.loads(res.stdout)
        if info["missing"]:
            pkgs = " ".join(info["missing"])
            raise RemoteError(f"{self.url}: {pkgs} not importable by {self.python} on the device; install it there "
                              f"with: {self.python} -m pip install {pkgs}")
        self.info = info
        return info

    def measure(self, jobs: list[dict], images: np.ndarray, labels: np.ndarray, refs: dict[str, np.ndarray],
                profile: dict, rounds: int, batch_size: int, throughput_round_s: float = 0.2) -> dict:
        """jobs: {key, artifact (local Path), manifest, threads, graph_optimization,
        inter_op_threads, int8_ops, float_ops}; refs: key -> the torch logits of that artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            inputs = {"images": images, "labels": labels}
            np.savez(tmp / "inputs.npz", **inputs)
            np.savez(tmp / "refs.npz", **refs)
            files = {f"inputs-{digest_arrays(inputs)}.npz": tmp / "inputs.npz",
                     f"refs-{digest_arrays(refs)}.npz": tmp / "refs.npz"}
            remote_jobs = []
            for job in jobs:
                name = f"model-{digest(job['artifact'])}.onnx"
                files[name] = job["artifact"]
                remote_jobs.append({**{k: v for k, v in job.items() if k != "parity"}, "artifact": f"{CACHE}/{name}"})
            names = list(files)
            spec = {"inputs": f"{CACHE}/{names[0]}", "refs": f"{CACHE}/{names[1]}", "jobs": remote_jobs,
                    "profile": profile, "rounds": rounds, "batch_size": batch_size,
                    "throughput_round_s": throughput_round_s}
            (tmp / "job.json").write_text(json.dumps(spec, default=str))
            files[f"job-{digest(tmp / 'job.json')}.json"] = tmp / "job.json"
            self._sync(files)
            job_name = list(files)[-1]
            res = self._timed("measure", self.ssh.run,
                              f"{shlex.quote(self.python)} {self._script()} measure {CACHE}/{job_name}")
        if res.returncode != 0:
            raise RemoteError(f"{self.url}: the runner failed: {res.stderr.strip()[-500:]}")
        out = json.loads(res.stdout)
        self.device_seconds = out["seconds"]  # of the "measure" step's wall time; the rest is ssh + startup
        return out

    def close(self) -> None:
        self.ssh.close()
