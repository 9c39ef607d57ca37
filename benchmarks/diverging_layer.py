"""The first-diverging-layer diagnosis on real exports (issue 6): scale one conv's weight x3
in a copy of each demo stage's ONNX, convert it to IR, and print what the diagnosis names on
ONNX Runtime and OpenVINO, plus the intact file's largest per-layer error.

    python benchmarks/diverging_layer.py --runs-dir /work/main/runs/fashion-mnist --conv 4
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from compress.parity import diverging_layers
from compress.structure import Structure, rebuild
from targets.openvino import to_ir as to_openvino
from tests.compress.test_parity import scale_weight_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/fashion-mnist"))
    ap.add_argument("--stages", nargs="+", default=["02-prune", "03-quantize"])
    ap.add_argument("--conv", type=int, default=4, help="which Conv (graph order) to corrupt")
    ap.add_argument("--tolerance", type=float, default=0.02)
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="diverging-"))
    x = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
    for stage in a.stages:
        d = a.runs_dir / stage
        model = rebuild(Structure.read(d / "structure.json"), d / "model.safetensors")
        bad = out / f"{stage}-bad.onnx"
        node = scale_weight_of(d / "model.onnx", bad, a.conv)
        to_openvino(bad, bad.with_suffix(".xml"))
        for backend, runtime in (("onnxruntime", bad), ("openvino", bad.with_suffix(".xml"))):
            r = diverging_layers(model, bad, runtime, backend, x, a.tolerance)
            f = r["first_diverging"] or {}
            print(f"{stage} @ {backend}: scaled {node}; first diverging: {f.get('module')} ({f.get('node')}) "
                  f"rel err {f.get('rel_error', float('nan')):.3g}; per layer: "
                  + ", ".join(f"{layer['rel_error']:.2g}" for layer in r["layers"]))
        for backend, runtime in (("onnxruntime", d / "model.onnx"), ("openvino", d / "model.xml")):
            good = diverging_layers(model, d / "model.onnx", runtime, backend, x, a.tolerance)
            print(f"{stage} intact @ {backend}: first diverging {good['first_diverging']}, "
                  f"max rel err {max(layer['rel_error'] for layer in good['layers']):.2g}")


if __name__ == "__main__":
    main()
