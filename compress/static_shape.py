"""Static shapes for a deployment's fixed batches, where measured faster (issue 16 item 6,
`shapes: auto` on a target).

Our exports have a dynamic batch axis so one file serves every batch; a runtime compiling a
dynamic shape may pick slower kernels or re-check shapes per call (measured on OpenVINO: the
demo student's IR reshaped to a static [1,1,28,28] ran 1.09-1.27x faster at batch 1). Here
each batch the deployment times (1 and the throughput batch) gets a copy of the artifact made
from a static-batch ONNX by the target's own `prepare`, compiled beside the dynamic one; the two
are timed interleaved and the static one serves that batch only where it was faster by more
than MARGIN. Every other batch (accuracy passes, parity) runs on the dynamic artifact.

`latency_threads: auto` routes batch 1 the same way, to a one-thread compile where that was
faster than the configured threads (`one_thread_at_batch1`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx

from compress.checkpoint import atomic_write
from targets.profile import mean_ms

MARGIN = 0.03  # below this, the dynamic artifact (one file for every batch) is kept
ROUNDS = 7


def static_onnx(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """The model with every symbolic first dimension of its inputs and outputs fixed to `batch`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for v in list(out.graph.input) + list(out.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    return out


def paired_ms(a, b, x: np.ndarray, rounds: int = ROUNDS) -> tuple[float, float]:
    """Median over rounds of each runner's mean time (ms) on x, the two alternating."""
    n = max(2, 64 // x.shape[0])
    ta, tb = [], []
    for _ in range(rounds):
        a(x), b(x)
        ta.append(mean_ms(a, x, n))
        tb.append(mean_ms(b, x, n))
    return float(np.median(ta)), float(np.median(tb))


class StaticBatches:
    """A Runner: the static runner of a batch where it was chosen, the dynamic one otherwise.
    `info` is the dynamic runner's plus `static_shapes` (per batch: times and the choice)."""

    def __init__(self, dynamic, static: dict, record: dict, key: str = "static_shapes"):
        self.dynamic, self.static = dynamic, static
        self.info = {**dynamic.info, key: record}
        self.inner_ms: list[float] = []  # the runtime's own per-call times of whichever runner ran

    def _for(self, batch: np.ndarray):
        return self.static.get(int(batch.shape[0]), self.dynamic)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        run = self._for(batch)
        out = run(batch)
        inner = getattr(run, "inner_ms", None)
        if inner:
            self.inner_ms.append(inner[-1])
        return out

    def __getattr__(self, name):
        # the optional Runner methods, answered by the runner of the batch they are asked about:
        # throughput mode, the runtime's own timer, the vendor tool on that runner's file
        if name not in PER_BATCH or all(getattr(r, name, None) is None for r in (*self.static.values(), self.dynamic)):
            raise AttributeError(name)
        pick = PER_BATCH[name]
        return lambda first, *rest: getattr(self.static.get(pick(first), self.dynamic), name)(first, *rest)


PER_BATCH = {  # method -> the batch size its first argument asks about
    "run_many": lambda batches: int(batches[0].shape[0]),
    "runtime_latency": lambda x: int(x.shape[0]),
    "vendor_latency": lambda shape: int(shape[0]),
}


def auto(target, onnx_path: Path, dynamic, cfg, x: np.ndarray, batches: Sequence[int], work: Path,
         backend: str = "static"):
    """`shapes: auto`: compile a static artifact per batch, keep it where it measured faster
    (files named by `backend`: two targets of one stage share its folder)."""
    model = onnx.load(str(onnx_path))
    static, record = {}, {}
    for b in dict.fromkeys(batches):
        src = work / f"{onnx_path.stem}.{backend}.b{b}.onnx"
        m = static_onnx(model, b)
        atomic_write(src, lambda tmp: onnx.save(m, str(tmp)))
        artifact = target.prepare(src, work)
        runner = target.compile(artifact, cfg)
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])), np.float32)
        dyn_ms, st_ms = paired_ms(dynamic, runner, xb)
        chosen = st_ms < dyn_ms * (1 - MARGIN)
        record[str(b)] = {"shape": "static" if chosen else "dynamic", "dynamic_ms": round(dyn_ms, 4),
                          "static_ms": round(st_ms, 4), "chosen_by": "measurement (shapes: auto)"}
        if chosen:  # kept beside the dynamic artifact: what a fixed-batch deployment ships (and the vendor tool times)
            static[b] = runner
            record[str(b)]["artifact"] = artifact.name
        else:
            for f in {src, artifact, *([artifact.with_suffix(".bin")] if artifact.suffix == ".xml" else [])}:
                f.unlink(missing_ok=True)
    return StaticBatches(dynamic, static, record)


def one_thread_at_batch1(target, artifact: Path, runner, cfg, x: np.ndarray, cores: Optional[int] = None):
    """`latency_threads: auto`: batch 1 on a one-thread compile of `artifact` (what batch 1 runs)
    where it measured faster than `runner` at the configured threads. Measured here: ONNX
    Runtime ran the demo's int8 student at batch 1 in 0.200 ms on 2 threads and 0.113 ms on 1
    (benchmarks/RESULTS.md, "At 2 threads"): on a model this small the pool's wake-ups cost more
    than the work they share. Other batches keep the configured threads. cores: what `threads`
    unset means (default: the CPUs this process may use)."""
    from compress.hardware import allowed_cores
    threads = cfg.threads or cores or allowed_cores()
    if threads <= 1:
        return runner
    one = target.compile(artifact, dataclasses.replace(cfg, threads=1))
    xb = np.ascontiguousarray(x[:1], np.float32)
    base_ms, one_ms = paired_ms(runner, one, xb)
    chosen = one_ms < base_ms * (1 - MARGIN)
    record = {"threads": 1 if chosen else threads, "configured_threads": threads, "configured_ms": round(base_ms, 4),
              "one_thread_ms": round(one_ms, 4), "chosen_by": "measurement (latency_threads: auto)"}
    return StaticBatches(runner, {1: one} if chosen else {}, {"1": record}, key="latency_threads")
