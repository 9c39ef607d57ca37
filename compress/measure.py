"""Measurement services a stage may call without knowing backends or the exporter
(RunContext carries them): model statistics, and latency of candidate models on a backend,
exported, compiled and timed against a reference in the same process, interleaved."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from compress.errors import UserError

ROUNDS = 5  # interleaved rounds: a ratio of medians over rounds survives this machine's noise


def model_stats(model: nn.Module, float_model: nn.Module, input_shape) -> dict:
    """Parameters of `model`, MACs of its float counterpart (brevitas layers are not counted
    by torch-pruning's op counter)."""
    import torch_pruning as tp

    from compress.models import count_params
    macs, _ = tp.utils.count_ops_and_params(float_model.eval(), torch.zeros(1, *input_shape))
    return {"params": count_params(model), "macs": int(macs)}


class LatencySession:
    """Candidates compiled on one backend (threads, batch fixed), timed pairwise. Owns a
    temporary folder for the exports; close() (or `with`) removes it."""

    def __init__(self, backend: str, threads: Optional[int], x: np.ndarray, input_shape, opset: int):
        from targets import base
        self.backend, self.threads, self.x, self.shape, self.opset = backend, threads, x, input_shape, opset
        self.target = base.get(backend)
        self.work = Path(tempfile.mkdtemp(prefix="latency-"))
        self._n = 0

    def compile(self, model: nn.Module) -> Any:
        """Export `model` in float, compile it on the backend; returns a runner to time."""
        from compress.export import export_float
        from targets.base import CompileOptions
        self._n += 1
        work = self.work / f"m{self._n}"
        work.mkdir(parents=True)
        path = work / "model.onnx"
        export_float(model, path, self.shape, opset=self.opset)
        artifact = self.target.prepare(path, work)  # what this backend compiles (ONNX, IR, ...)
        return self.target.compile(artifact, CompileOptions(threads=self.threads, precision="fp32", work_dir=work))

    def paired_p50(self, base: Any, cand: Any, runs: int) -> tuple[float, float]:
        """Median over rounds of each runner's p50 (ms), the two alternating within a round."""
        from targets.profile import latency
        per = max(5, runs // ROUNDS)
        b, c = [], []
        for _ in range(ROUNDS):
            # short warm-ups: both runners were warmed in earlier rounds
            b.append(latency(base, self.x, warmup=3, runs=per, max_warmup=40)["p50"])
            c.append(latency(cand, self.x, warmup=3, runs=per, max_warmup=40)["p50"])
        return float(np.median(b)), float(np.median(c))

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> "LatencySession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LatencyService:
    """`ctx.latency`: checks a backend is usable, opens timing sessions on it."""

    def __init__(self, input_shape, opset: int = 17):
        self.input_shape, self.opset = tuple(input_shape), opset

    def check(self, backend: str, where: str) -> None:
        from targets import base
        try:
            ok, why = base.get(backend).available()
        except ValueError as e:
            raise UserError(f"{where}={backend}: {e}") from None
        if not ok:
            raise UserError(f"{where}={backend}: not available here ({why})")

    def session(self, backend: str, threads: Optional[int], x: np.ndarray) -> LatencySession:
        """x: the float32 batch every candidate is timed on (its first dim is the batch)."""
        return LatencySession(backend, threads, np.ascontiguousarray(x, np.float32), self.input_shape, self.opset)
