"""Per-layer precision chosen by measured speed on the target (issue 16, `precision: speed`).

An int8 Q/DQ graph is not faster layer by layer on every runtime: measured on this machine
(benchmarks/int8_layers.py), ONNX Runtime's QLinearConv on the demo's 1-channel stem runs 13x
slower than its float Conv at batch 64 and a strided 8->16 conv 7x slower at batch 1, while
deeper layers run 2-5x faster in int8. So a deployment may keep some layers float: the weights
of a chosen layer are dequantized into a float initializer (its activation Q/DQ stays, so the
numbers are those of the int8 graph with that layer computed in float: exact up to float
summation order), and which layers is decided by timing the candidates on the backend itself,
greedily in graph order, interleaved. The parity gate then judges the chosen graph like any other.
"""
from __future__ import annotations

import copy
import hashlib
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from compress.checkpoint import atomic_write, write_json
from compress.onnx_graph import consumers, producers
from targets.profile import mean_ms

COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
MARGIN = 0.03  # a layer goes float only when that is this much faster: below it, timing noise decides
ROUNDS = 5  # interleaved rounds per comparison; the median of each candidate's round means is compared
# one candidate's compile + timing is ~0.1-1 s for the demo-sized nets this targets; a net with more
# layers than this is searched over its first MAX_LAYERS quantized layers only (the rest stay int8)
MAX_LAYERS = 64


def _weight_dq(tensor: str, prod: dict, inits: dict) -> Optional[onnx.NodeProto]:
    """The DequantizeLinear that makes `tensor` from an integer initializer, or None."""
    n = prod.get(tensor)
    return n if n is not None and n.op_type == "DequantizeLinear" and n.input[0] in inits else None


def quantized_layers(model: onnx.ModelProto) -> list[str]:
    """Compute nodes (in graph order) whose weight is a DequantizeLinear of an integer initializer:
    the layers a runtime can run in int8, and so the layers that may be kept float."""
    g = model.graph
    prod, inits = producers(g), {i.name for i in g.initializer}
    return [n.name for n in g.node if n.op_type in COMPUTE and len(n.input) > 1
            and _weight_dq(n.input[1], prod, inits) is not None]


def _dequantized(dq: onnx.NodeProto, inits: dict) -> np.ndarray:
    """DequantizeLinear(q, scale, zero point, axis) in numpy, as ONNX Runtime computes it:
    float32(q - zp) * scale, per-tensor or per-channel along `axis`."""
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
    s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    z = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int64) if len(dq.input) > 2 and dq.input[2] else 0
    if np.ndim(s) == 1 and q.ndim > 1:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        s = s.reshape(shape)
        z = np.reshape(z, shape) if np.ndim(z) == 1 else z
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def _drop_dead(g: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read (the weight DQs a rewrite bypassed), then
    initializers nothing reads."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        live = [n for n in g.node if any(o in used for o in n.output)]
        if len(live) == len(g.node):
            break
        del g.node[:]
        g.node.extend(live)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _in_channels(n: onnx.NodeProto, w: np.ndarray) -> int:
    attr = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    if n.op_type == "Conv":
        return w.shape[1] * attr.get("group", 1)
    if n.op_type == "ConvTranspose":
        return w.shape[0]
    return w.shape[1] if attr.get("transB", 0) and n.op_type == "Gemm" else w.shape[0]


def _per_channel_input(g: onnx.GraphProto, n: onnx.NodeProto, prod: dict, inits: dict) -> None:
    """Read the layer's activation through its own DequantizeLinear with the per-tensor scale and
    zero point repeated per channel (axis 1): the same numbers, but ONNX Runtime's
    WeightBiasQuantization (onnxruntime/core/optimizer/qdq_transformer/weight_bias_quantization.cc)
    re-quantizes the float weight of any Conv/Gemm whose input is a per-tensor DQ, per-tensor
    int8 (other numbers, and an int8 kernel again); it leaves a per-channel input alone."""
    dq = prod.get(n.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits or len(dq.input) < 3:
        return
    s, z = (numpy_helper.to_array(inits[t]) for t in dq.input[1:3])
    if s.size != 1:
        return
    c = _in_channels(n, _dequantized(prod[n.input[1]], inits))
    names = [f"{n.name}_float_x_scale", f"{n.name}_float_x_zp", f"{n.name}_float_x"]
    at, make = list(g.node).index(n), onnx.helper.make_node
    q = prod.get(dq.input[0])
    after_concat = q is not None and q.input[0] in prod and prod[q.input[0]].op_type == "Concat"
    if c > 1 and not after_concat:
        g.initializer.extend([numpy_helper.from_array(np.full(c, s.item(), s.dtype), names[0]),
                              numpy_helper.from_array(np.full(c, z.item(), z.dtype), names[1])])
        nodes = [make("DequantizeLinear", [dq.input[0], *names[:2]], [names[2]], name=names[2], axis=1)]
    else:  # one channel (a grey-image stem): a scale of shape [1] counts as per-tensor; after a
        # Concat, OpenVINO 2026.4's MoveFakeQuantize moves a per-channel FakeQuantize into the
        # Concat's inputs and fails on the channel count. Spell the DQ out instead:
        # float(q) - zp, times scale (exact: integers below 2^24, then one rounding)
        g.initializer.extend([numpy_helper.from_array(s.astype(np.float32).reshape(()), names[0]),
                              numpy_helper.from_array(z.astype(np.float32).reshape(()), names[1])])
        cast, sub = f"{names[2]}_cast", f"{names[2]}_sub"
        nodes = [make("Cast", [dq.input[0]], [cast], name=cast, to=onnx.TensorProto.FLOAT),
                 make("Sub", [cast, names[1]], [sub], name=sub),
                 make("Mul", [sub, names[0]], [names[2]], name=names[2])]
    for k, node in enumerate(nodes):
        g.node.insert(at + k, node)
    n.input[0] = names[2]


def keep_float(model: onnx.ModelProto, layers: Iterable[str], own_input_dq: bool = True) -> onnx.ModelProto:
    """A copy of the Q/DQ graph in which the named compute layers read float weights and bias
    (their DequantizeLinear computed once, into an initializer): no runtime can pick an int8
    kernel for them, and each computes what the int8 graph's reference semantics compute."""
    out = copy.deepcopy(model)
    g, wanted = out.graph, set(layers)
    unknown = wanted - set(quantized_layers(model))
    if unknown:
        raise ValueError(f"not quantized compute layers of this graph: {sorted(unknown)}")
    prod, inits = producers(g), {i.name: i for i in g.initializer}
    for n in list(g.node):
        if n.name not in wanted:
            continue
        if own_input_dq:  # float_graph removes the input's Q/DQ altogether
            _per_channel_input(g, n, prod, inits)
        for k in range(1, len(n.input)):  # weight, bias: every input made from an initializer
            dq = _weight_dq(n.input[k], prod, inits)
            if dq is not None:
                name = f"{n.name}_float_in{k}"
                g.initializer.append(numpy_helper.from_array(_dequantized(dq, inits), name))
                n.input[k] = name
    _drop_dead(g)
    return out


WHOLE = "*"  # the candidate "every layer float, activation Q/DQ removed too"


def float_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every layer float and every activation QuantizeLinear -> DequantizeLinear pair removed:
    the float network with the quantized weights' values. Where a runtime has no int8 kernel
    for the activations between layers (ONNX Runtime runs a Q/DQ MobileNet's SiLU and Hardswish
    as DQ -> Sigmoid -> Mul -> Q in float, unfused: 2.6x the time of the float graph's fused
    QuickGelu, benchmarks/int8_layers.py), keeping only the convolutions float cannot win, but
    this can. Its numbers differ from the int8 graph's by the activation rounding: the parity
    gate judges it like any other artifact."""
    out = keep_float(model, quantized_layers(model), own_input_dq=False)
    g = out.graph
    cons, inits = consumers(g), {i.name for i in g.initializer}
    to = {}  # a pair's DQ output -> the Q's float input
    for q in g.node:
        users = cons.get(q.output[0], []) if q.op_type == "QuantizeLinear" else []
        if users and q.input[0] not in inits and all(u.op_type == "DequantizeLinear" for u in users):
            to.update({u.output[0]: q.input[0] for u in users})
    for name in list(to):  # chains (a requantization Q -> DQ -> Q -> DQ) end at the first float tensor
        while to[name] in to:
            to[name] = to[to[name]]
    for n in g.node:
        for k, i in enumerate(n.input):
            n.input[k] = to.get(i, i)
    keep = [n for n in g.node if n.output[0] not in to]  # the pairs' DQs; their Qs go as dead nodes
    del g.node[:]
    g.node.extend(keep)
    for o in g.output:  # an output made by a removed DQ: an Identity of the float tensor
        if o.name in to:
            g.node.append(onnx.helper.make_node("Identity", [to[o.name]], [o.name], name=f"{o.name}_float"))
    _drop_dead(g)
    return out


def candidate(model: onnx.ModelProto, floats: frozenset) -> onnx.ModelProto:
    return float_graph(model) if WHOLE in floats else keep_float(model, floats)


def _why(step: dict, backend: str, margin: float = MARGIN) -> str:
    ratio = step["int8_score"] / step["float_score"]
    if step["precision"] == "fp32":
        return f"float measured {ratio:.2f}x as fast as int8 on {backend}"
    if ratio > 1:
        return f"float only {ratio:.2f}x as fast as int8 on {backend} (within the {margin:.0%} margin): int8 kept"
    return f"int8 measured {1 / ratio:.2f}x as fast as float on {backend}"


def search(layers: Sequence[str], timer: Callable[[list[frozenset]], list[float]], backend: str = "",
           margin: float = MARGIN) -> dict:
    """Greedy in graph order: each layer is tried float on top of the choices so far and kept
    float when the candidate's score is lower by more than `margin`. timer(candidates) -> one
    score per candidate (a set of float layers), lower is faster, measured interleaved."""
    current, steps = frozenset(), {}
    whole = _faster(timer, frozenset(), frozenset({WHOLE}), margin)
    if whole is not None:  # the whole graph float beats int8 outright: nothing left to choose per layer
        ratio = whole[0] / whole[1]
        why = f"whole graph float (activation Q/DQ removed) measured {ratio:.2f}x as fast as int8 on {backend}"
        steps = {n: {"precision": "fp32", "int8_score": round(whole[0], 4), "float_score": round(whole[1], 4),
                     "why": why} for n in layers}
        return {"float_layers": list(layers), "whole_graph_float": True, "layers": steps, "margin": margin}
    for layer in layers:
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
    return {"float_layers": [n for n in layers if n in current], "whole_graph_float": False, "layers": steps,
            "margin": margin}


def _faster(timer, base: frozenset, cand: frozenset, margin: float) -> Optional[tuple[float, float]]:
    """(base score, candidate score), averaged over two measurements in both orders, when the
    candidate was faster by more than `margin` in both; else None."""
    t_base, t_cand = timer([base, cand])
    if not t_cand < t_base * (1 - margin):
        return None
    t_cand2, t_base2 = timer([cand, base])
    return ((t_base + t_base2) / 2, (t_cand + t_cand2) / 2) if t_cand2 < t_base2 * (1 - margin) else None


class BackendTimer:
    """Scores candidates (sets of float layers) of one Q/DQ graph on one backend: each is
    rewritten, compiled the way the target compiles it, and timed at every batch in
    `batches`; score = sum over batches of time / the all-int8 graph's first time there, so
    batch 1 and batch 64 weigh alike. Compiled candidates are kept while they are compared."""

    def __init__(self, model: onnx.ModelProto, backend: str, work: Path, x: np.ndarray,
                 threads: Optional[int] = None, batches: Sequence[int] = (1, 64)):
        from targets import base
        self.model, self.backend, self.work, self.threads = model, backend, Path(work), threads
        self.target = base.get(backend)
        self.x = {b: np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])), np.float32) for b in batches}
        # ~equal work per timing at each batch, and at least 4 runs: with 2 runs of batch 64 a loaded
        # 2-core machine hid a 19% gain at batch 64 (the demo's stem kept float, ORT)
        self.runs = {b: max(4, 128 // b) for b in batches}
        self._runners: dict[frozenset, object] = {}
        self._ref: dict[int, float] = {}
        self._made = 0

    def _runner(self, floats: frozenset):
        from targets.base import CompileOptions
        if floats not in self._runners:
            self.work.mkdir(parents=True, exist_ok=True)
            self._made += 1
            path = self.work / f"cand{self._made}.onnx"
            onnx.save(candidate(self.model, floats), str(path))
            # the ONNX itself: OpenVINO reads a Q/DQ graph as to_ir keeps it (Core.read_model)
            self._runners[floats] = self.target.compile(path, CompileOptions(
                threads=self.threads, precision="int8", work_dir=self.work))
        return self._runners[floats]

    def __call__(self, candidates: list[frozenset]) -> list[float]:
        runners = [self._runner(c) for c in candidates]
        times = {(i, b): [] for i in range(len(runners)) for b in self.x}
        for _ in range(ROUNDS):
            for b, x in self.x.items():
                for i, r in enumerate(runners):
                    r(x)
                    times[i, b].append(mean_ms(r, x, self.runs[b]))
        med = {k: float(np.median(v)) for k, v in times.items()}
        for b in self.x:
            self._ref.setdefault(b, med[0, b])
        for c in list(self._runners):  # keep the compiled candidates still in play
            if c not in candidates:
                del self._runners[c]
        return [sum(med[i, b] / self._ref[b] for b in self.x) for i in range(len(runners))]


def choose(onnx_path: Path, backend: str, work: Path, x: np.ndarray, threads: Optional[int] = None,
           batches: Sequence[int] = (1, 64), timer: Optional[Callable] = None) -> dict:
    """The speed-chosen precision of every quantized layer of `onnx_path` on `backend`."""
    model = onnx.load(str(onnx_path))
    layers = quantized_layers(model)[:MAX_LAYERS]
    t0 = time.time()
    timer = timer or BackendTimer(model, backend, work, x, threads, batches)
    out = search(layers, timer, backend)
    out.update(backend=backend, threads=threads, batches=list(batches), seconds=round(time.time() - t0, 1),
               source_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest())
    return out


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
                   timer: Optional[Callable] = None) -> tuple[Path, dict]:
    """The artifact `backend` deploys under `precision: speed` and the choice it holds. The
    choice is saved beside it (speed-<backend>.json) and reused while the ONNX it was made
    from and the threads and batches are the same."""
    from targets import base
    target = base.get(backend)
    record = out_dir / f"speed-{backend}.json"
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    choice = read_json(record)
    if not choice or (choice.get("source_sha256"), choice.get("threads"), choice.get("batches")) != (
            digest, threads, list(batches)):
        work = out_dir / f".speed-{backend}"
        try:
            choice = choose(onnx_path, backend, work, x, threads, batches, timer)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_json(record, choice)
        log(f"  precision: speed on {backend}: float {choice['float_layers'] or 'none'} "
            f"({choice['seconds']} s of timing)")
    if not choice["float_layers"]:
        return onnx_path, choice
    mixed = mixed_onnx(onnx_path, out_dir, backend)
    model = chosen_graph(onnx.load(str(onnx_path)), choice)
    atomic_write(mixed, lambda tmp: onnx.save(model, str(tmp)))
    return target.prepare(mixed, out_dir), choice


def search_file(onnx_path: Path, backend: str, work: Path, threads: Optional[int] = None,
                shape=(1, 28, 28)) -> tuple[Path, dict]:
    """For benchmarks: speed_artifact on random inputs of `shape`, the ONNX itself returned
    (OpenVINO and ORT both compile it) rather than the backend's prepared artifact."""
    work.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((64, *shape)).astype(np.float32)
    choice = choose(onnx_path, backend, work / "cands", x, threads)
    mixed = work / f"{onnx_path.stem}.{backend}-speed.onnx"
    onnx.save(chosen_graph(onnx.load(str(onnx_path)), choice), str(mixed))
    return mixed, choice
