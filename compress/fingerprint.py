"""What a benchmark result is keyed by: the device it ran on. Latency numbers are only
comparable on the same CPU model with the same instruction set (an int8 model runs VNNI or
AMX kernels where the CPU has them, and 3-4x slower ones where it does not), core count,
memory, GPU, OS and runtime versions; the key is a short digest of exactly those.

Self-contained on purpose (standard library only): targets/remote_runner.py carries a copy of
`describe()`'s logic to fingerprint a device that has neither torch nor this project."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import subprocess

# /proc/cpuinfo flag names (x86 `flags`, ARM `Features`) -> the name reported
FLAGS = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512_vnni": "AVX512-VNNI", "avx512vnni": "AVX512-VNNI",
         "avx_vnni": "AVX-VNNI", "amx_tile": "AMX", "amx_int8": "AMX-INT8", "asimd": "NEON", "neon": "NEON",
         "asimddp": "NEON-DOTPROD", "i8mm": "I8MM", "sve": "SVE"}
RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "numpy")


def cpuinfo(text: str) -> tuple[str, list[str]]:
    """(CPU model, the instruction-set flags that change which kernels run) from /proc/cpuinfo."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags |= {FLAGS[f] for f in value.split() if f in FLAGS}
    return model, sorted(flags)


def _gpu() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def _memory_gib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        return round(kib / 2**20)  # whole GiB: the kernel's reserved memory varies by boot
    except (OSError, AttributeError):
        return None


def _versions() -> dict:
    out = {}
    for pkg in RUNTIMES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def describe() -> dict:
    """This machine, as results are keyed by."""
    try:
        with open("/proc/cpuinfo") as f:
            model, flags = cpuinfo(f.read())
    except OSError:  # macOS, Windows: no /proc
        model, flags = "", []
    return {"cpu": model or platform.processor() or platform.machine(), "flags": flags,
            "arch": platform.machine(), "cores": os.cpu_count(), "memory_gib": _memory_gib(), "gpu": _gpu(),
            "os": f"{platform.system()} {platform.release()}", "runtimes": _versions()}


def key(desc: dict) -> str:
    """A readable, stable key: arch, a slug of the CPU model, and a digest of everything."""
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", str(desc.get("cpu", "")).lower()).strip("-")[:40]
    return f"{desc.get('arch', 'unknown')}-{slug}-{digest}" if slug else f"{desc.get('arch')}-{digest}"
