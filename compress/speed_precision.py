"""Per-layer precision chosen by measured speed on the target (issue 16, `precision: speed`).

An int8 Q/DQ graph is not faster layer by layer on every runtime: measured on this machine
(benchmarks/int8_layers.py), ONNX Runtime's QLinearConv on the demo's 1-channel stem runs 13x
slower than its float Conv at batch 64 and a strided 8->16 conv 7x slower at batch 1, while
deeper layers run 2-5x faster in int8. So a deployment may keep some layers float: the weights
of a chosen layer are dequantized into a float initializer (its activation Q/DQ stays, so the
numbers are those of the int8 graph with that layer computed in float: exact up to float
summation order), and which layers is decided by timing the candidates on the backend itself,
greedily in graph order, interleaved. The parity gate then judges the chosen graph like any other.
Candidates are timed on, and the artifact written from, the graph with the backend's exact
rewrites applied (ORT: SiLU as one QuickGelu, targets/ort_fusions.py), so a backend's artifact
holds them even where every layer stays int8.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx

from compress.checkpoint import atomic_write, write_json
from compress.keep_float import WHOLE, candidate, float_graph, keep_float, quantized_layers
from targets.profile import mean_ms

MARGIN = 0.03  # a layer goes float only when that is this much faster: below it, timing noise decides
ROUNDS = 5  # interleaved rounds per comparison; the median of each candidate's round means is compared
# one candidate's compile + timing is ~0.1-1 s for the demo-sized nets this targets; a net with more
# layers than this is searched over its first MAX_LAYERS quantized layers only (the rest stay int8)
MAX_LAYERS = 64


def _why(step: dict, backend: str, margin: float = MARGIN) -> str:
    ratio = step["int8_score"] / step["float_score"]
    if step["precision"] == "fp32":
        return f"float measured {ratio:.2f}x as fast as int8 on {backend}"
    if ratio > 1:
        return f"float only {ratio:.2f}x as fast as int8 on {backend} (within the {margin:.0%} margin): int8 kept"
    return f"int8 measured {1 / ratio:.2f}x as fast as float on {backend}"


def search(layers: Sequence[str], timer: Callable[[list[frozenset]], list[float]], backend: str = "",
           margin: float = MARGIN, whole_graph: bool = True) -> dict:
    """Greedy in graph order: each layer is tried float on top of the choices so far and kept
    float when the candidate's score is lower by more than `margin`. timer(candidates) -> one
    score per candidate (a set of float layers), lower is faster, measured interleaved.
    whole_graph: try the whole graph float (activation Q/DQ removed) first."""
    current, steps = frozenset(), {}
    whole = _faster(timer, frozenset(), frozenset({WHOLE}), margin) if whole_graph else None
    if whole is not None:  # the whole graph float beats int8 outright: nothing left to choose per layer
        ratio = whole[0] / whole[1]
        why = f"whole graph float (activation Q/DQ removed) measured {ratio:.2f}x as fast as int8 on {backend}"
        steps = {n: {"precision": "fp32", "int8_score": round(whole[0], 4), "float_score": round(whole[1], 4),
                     "why": why} for n in layers}
        return {"float_layers": list(layers), "whole_graph_float": True, "layers": steps, "margin": margin}
    for i, layer in enumerate(layers):
        if layer in current:  # went float with the layer before it (a pair)
            continue
        cand = current | {layer}
        t_cur, t_cand = timer([current, cand])
        fp = t_cand < t_cur * (1 - margin)
        if fp:  # a second measurement, in the other order, must agree: one noisy round flips nothing
            t_cand2, t_cur2 = timer([cand, current])
            fp = t_cand2 < t_cur2 * (1 - margin)
            t_cur, t_cand = (t_cur + t_cur2) / 2, (t_cand + t_cand2) / 2
        steps[layer] = {"precision": "fp32" if fp else "int8", "int8_score": round(t_cur, 4),
                        "float_score": round(t_cand, 4)}
        steps[layer]["why"] = _why(steps[layer], backend, margin)
        current = cand if fp else current
        if not fp and t_cand < t_cur * (1 + margin) and i + 1 < len(layers):
            current = _pair(timer, current, layer, layers[i + 1], steps, backend, margin)
    return {"float_layers": [n for n in layers if n in current], "whole_graph_float": False, "layers": steps,
            "margin": margin}


def _pair(timer, current: frozenset, layer: str, nxt: str, steps: dict, backend: str, margin: float) -> frozenset:
    """A layer no slower in float alone is tried float together with the next one: a float
    island in an int8 graph costs layout changes and Q/DQ at its edges, which a float neighbour
    shares (measured: ORT at 1 thread, the demo student's stem and both convs of its first block
    float scored 6% below the stem alone, either conv added alone 2-3%, inside the margin). Kept
    only if the pair beats both the choices so far and the next layer float alone, in two
    measurements."""
    both, alone = current | {layer, nxt}, current | {nxt}
    scores = [timer([current, alone, both]), timer([both, alone, current])[::-1]]
    if not all(s[2] < min(s[0], s[1]) * (1 - margin) for s in scores):
        return current
    t_cur, t_alone, t_both = (np.mean(v) for v in zip(*scores))
    for n in (layer, nxt):
        steps[n] = {"precision": "fp32", "int8_score": round(float(t_cur), 4), "float_score": round(float(t_both), 4),
                    "why": f"float with `{nxt if n == layer else layer}`: the two measured "
                           f"{t_cur / t_both:.2f}x as fast as int8 and {t_alone / t_both:.2f}x as fast as "
                           f"`{nxt}` float alone on {backend}"}
    return both


def _faster(timer, base: frozenset, cand: frozenset, margin: float) -> Optional[tuple[float, float]]:
    """(base score, candidate score), averaged over two measurements in both orders, when the
    candidate was faster by more than `margin` in both; else None."""
    t_base, t_cand = timer([base, cand])
    if not t_cand < t_base * (1 - margin):
        return None
    t_cand2, t_base2 = timer([cand, base])
    return ((t_base + t_base2) / 2, (t_cand + t_cand2) / 2) if t_cand2 < t_base2 * (1 - margin) else None


def modes(batches: Sequence[int], threads: int, latency_one_thread: bool, streams: bool) -> dict:
    """batch -> (threads of the compile, divisor): how candidates are timed at that batch, the way
    the deployment will run it. Batch 1 on one thread where `latency_threads: auto` may send it
    there; a throughput batch as one call on one thread over `threads` where the backend runs
    `threads` single-threaded callers or streams at once (measured: two ORT callers of the int8
    demo student reached 22,443 items/s against 2 x 11,315 for one alone). Else the configured
    threads. One thread where the deployment allows it, also because sessions with thread pools
    timed side by side slow each other: ORT's FP32 student at batch 64, 2 threads, took 5.4 ms
    alone and 7.6 ms interleaved with a second session, while one-thread timings stayed within 2%.
    Which threads the chosen artifact runs on is still decided by measurement at deployment."""
    one = {b: (1, 1 if b == 1 else threads) for b in batches
           if threads > 1 and (latency_one_thread if b == 1 else streams)}
    return {b: one.get(b, (threads, 1)) for b in batches}


class BackendTimer:
    """Scores candidates (sets of float layers) of one Q/DQ graph on one backend: each is
    rewritten, compiled the way the target compiles it, and timed at every batch in `batches`
    the way the deployment runs that batch (`modes`); score = sum over batches of that time /
    the all-int8 graph's first time there, so batch 1 and batch 64 weigh alike. Compiled
    candidates are kept while they are compared."""

    def __init__(self, model: onnx.ModelProto, backend: str, work: Path, x: np.ndarray,
                 threads: Optional[int] = None, batches: Sequence[int] = (1, 64), latency_one_thread: bool = False,
                 streams: bool = False, options=None):
        from compress.hardware import allowed_cores
        from targets import base
        self.model, self.backend, self.work, self.options = model, backend, Path(work), options
        self.threads = threads or allowed_cores()
        self.target = base.get(backend)
        self.x = {b: np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])), np.float32) for b in batches}
        self.modes = modes(batches, self.threads, latency_one_thread, streams)
        # ~equal work per timing at each batch, and at least 4 runs: with 2 runs of batch 64 a loaded
        # 2-core machine hid a 19% gain at batch 64 (the demo's stem kept float, ORT)
        self.runs = {b: max(4, 128 // b) for b in batches}
        self._runners: dict[tuple, object] = {}
        self._ref: dict[int, float] = {}
        self._made = 0

    def described(self) -> dict:
        """batch -> how it was timed, for the record."""
        return {str(b): f"{t} thread(s)" + (f", as {d} callers at once" if d > 1 else "")
                for b, (t, d) in self.modes.items()}

    def _runner(self, floats: frozenset, threads: int):
        from targets.base import CompileOptions
        if (floats, threads) not in self._runners:
            self.work.mkdir(parents=True, exist_ok=True)
            self._made += 1
            path = self.work / f"cand{self._made}.onnx"
            onnx.save(candidate(self.model, floats), str(path))
            # the ONNX itself: OpenVINO reads a Q/DQ graph as to_ir keeps it (Core.read_model)
            self._runners[floats, threads] = self.target.compile(path, CompileOptions(
                threads=threads, precision="int8", work_dir=self.work, options=self.options))
        return self._runners[floats, threads]

    def __call__(self, candidates: list[frozenset]) -> list[float]:
        times = {(i, b): [] for i in range(len(candidates)) for b in self.x}
        for _ in range(ROUNDS):
            for b, x in self.x.items():
                threads, div = self.modes[b]
                for i, c in enumerate(candidates):
                    r = self._runner(c, threads)
                    r(x)
                    times[i, b].append(mean_ms(r, x, self.runs[b]) / div)
        med = {k: float(np.median(v)) for k, v in times.items()}
        for b in self.x:
            self._ref.setdefault(b, med[0, b])
        in_use = {(c, m[0]) for c in candidates for m in self.modes.values()}
        for key in list(self._runners):  # keep the compiled candidates still in play
            if key not in in_use:
                del self._runners[key]
        return [sum(med[i, b] / self._ref[b] for b in self.x) for i in range(len(candidates))]


def choose(onnx_path: Path, backend: str, work: Path, x: np.ndarray, threads: Optional[int] = None,
           batches: Sequence[int] = (1, 64), timer: Optional[Callable] = None, how: Optional[dict] = None,
           whole_graph: bool = True) -> dict:
    """The speed-chosen precision of every quantized layer of `onnx_path` on `backend`. how:
    BackendTimer's keywords saying how the deployment runs each batch (latency_one_thread,
    streams, options)."""
    model, fused = backend_graph(onnx.load(str(onnx_path)), backend)
    layers = quantized_layers(model)[:MAX_LAYERS]
    t0 = time.time()
    timer = timer or BackendTimer(model, backend, work, x, threads, batches, **(how or {}))
    out = search(layers, timer, backend, whole_graph=whole_graph)
    out.update(backend=backend, threads=threads, batches=list(batches), seconds=round(time.time() - t0, 1),
               fused=fused, source_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(), how=key_of(how),
               timed=getattr(timer, "described", dict)())
    return out


def backend_graph(model: onnx.ModelProto, backend: str) -> tuple[onnx.ModelProto, dict]:
    """The graph with the backend's exact rewrites (targets/ort_fusions.py) and what they did:
    candidates are timed, and the artifact written, from this graph."""
    from targets import base
    rewrite = getattr(base.get(backend), "exact_rewrites", None)
    return rewrite(model) if rewrite else (model, {})


def rewritten(choice: dict) -> bool:
    """Whether the deployment's artifact differs from the stage's ONNX."""
    return bool(choice["float_layers"] or choice.get("fused"))


def key_of(how: Optional[dict]) -> dict:
    """The parts of `how` a saved choice must match to be reused (options as their values)."""
    how = dict(how or {})
    if how.get("options") is not None:
        how["options"] = how["options"].model_dump()
    return how


def read_json(path: Path) -> Optional[dict]:
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def chosen_graph(model: onnx.ModelProto, choice: dict) -> onnx.ModelProto:
    return float_graph(model) if choice.get("whole_graph_float") else keep_float(model, choice["float_layers"])


def mixed_onnx(onnx_path: Path, out_dir: Path, backend: str) -> Path:
    """Where speed_artifact writes the mixed-precision ONNX for `backend`."""
    return out_dir / f"{onnx_path.stem}.{backend}-speed.onnx"


def speed_artifact(onnx_path: Path, out_dir: Path, backend: str, x: np.ndarray, threads: Optional[int] = None,
                   batches: Sequence[int] = (1, 64), log: Callable[[str], None] = print,
                   timer: Optional[Callable] = None, how: Optional[dict] = None,
                   accept: Optional[Callable[[Path], Optional[str]]] = None) -> tuple[Path, dict]:
    """The artifact `backend` deploys under `precision: speed` and the choice it holds. The
    choice is saved beside it (speed-<backend>.json) and reused while the ONNX it was made
    from, the threads, batches and `how` are the same. accept(artifact) -> None, or why the
    whole graph in float may not ship: that graph computes other numbers than the int8 one (its
    activations are not rounded), so it is judged first, and where it fails the layers are
    chosen one by one, each kept float with the int8 graph's own numbers. A rejected whole
    graph is kept in the choice and judged again at every deployment."""
    record = out_dir / f"speed-{backend}.json"
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    choice = read_json(record)
    wanted = (digest, threads, list(batches), key_of(how))
    fresh = not choice or tuple(choice.get(k) for k in ("source_sha256", "threads", "batches", "how")) != wanted \
        or "fused" not in choice or ("whole_graph_rejected" in choice and "whole_graph_choice" not in choice)
    # (the last two: saved before exact rewrites, or before a rejected whole graph was kept to judge again)
    work = out_dir / f".speed-{backend}"
    try:
        choice = choose(onnx_path, backend, work, x, threads, batches, timer, how) if fresh else choice
        choice, written, changed = _judged(onnx_path, out_dir, backend, choice, accept, log, lambda: choose(
            onnx_path, backend, work, x, threads, batches, timer, how, whole_graph=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if fresh or changed:
        write_json(record, choice)
        fused = ", ".join(f"{n} x {op}" for op, n in choice["fused"].items())
        floats = "the whole graph" if choice["whole_graph_float"] else choice["float_layers"] or "none"
        log(f"  precision: speed on {backend}: float {floats} "
            f"({choice['seconds']} s of timing)" + (f"; exact rewrites: {fused}" if fused else ""))
    if not rewritten(choice):  # the stage's ONNX itself; a rejected whole graph's files (ONNX, and the
        # backend's prepared artifact from it: OpenVINO's .xml/.bin) are not left as if they shipped
        for f in out_dir.glob(f"{mixed_onnx(onnx_path, out_dir, backend).stem}.*"):
            f.unlink(missing_ok=True)
        return onnx_path, choice
    return written or _write(onnx_path, out_dir, backend, choice), choice


def _judged(onnx_path: Path, out_dir: Path, backend: str, choice: dict, accept, log, per_layer: Callable[[], dict]):
    """The whole graph in float, chosen now or rejected before (kept as `whole_graph_choice`),
    judged by the parity gate on every deployment: the gate's settings may have changed since.
    -> (the choice, the whole graph's artifact where it ships, whether the choice changed)."""
    whole = choice if choice["whole_graph_float"] else choice.get("whole_graph_choice")
    if not accept or not whole:
        return choice, None, False
    written = _write(onnx_path, out_dir, backend, whole)
    rejected = accept(written)
    if not rejected:
        if whole is not choice:
            log(f"  precision: speed on {backend}: the whole graph in float now passes parity: it ships")
        return whole, written, whole is not choice
    if not choice["whole_graph_float"]:  # still rejected: the per-layer choice stands
        return {**choice, "whole_graph_rejected": rejected}, None, rejected != choice.get("whole_graph_rejected")
    log(f"  precision: speed on {backend}: the whole graph in float fails parity ({rejected}); choosing per layer")
    return {**per_layer(), "whole_graph_rejected": rejected, "whole_graph_choice": whole}, None, True


def _write(onnx_path: Path, out_dir: Path, backend: str, choice: dict) -> Path:
    """The chosen graph, written beside the stage and prepared for `backend`."""
    from targets import base
    mixed = mixed_onnx(onnx_path, out_dir, backend)
    model = chosen_graph(backend_graph(onnx.load(str(onnx_path)), backend)[0], choice)
    atomic_write(mixed, lambda tmp: onnx.save(model, str(tmp)))
    return base.get(backend).prepare(mixed, out_dir)


def search_file(onnx_path: Path, backend: str, work: Path, threads: Optional[int] = None,
                shape=(1, 28, 28), how: Optional[dict] = None) -> tuple[Path, dict]:
    """For benchmarks: speed_artifact on random inputs of `shape`, the ONNX itself returned
    (OpenVINO and ORT both compile it) rather than the backend's prepared artifact."""
    work.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((64, *shape)).astype(np.float32)
    choice = choose(onnx_path, backend, work / "cands", x, threads, how=how)
    mixed = work / f"{onnx_path.stem}.{backend}-speed.onnx"
    onnx.save(chosen_graph(backend_graph(onnx.load(str(onnx_path)), backend)[0], choice), str(mixed))
    return mixed, choice
