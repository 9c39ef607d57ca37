"""Does OpenVINO compute an int8 Q/DQ graph the way the graph says? (issue 16; benchmarks/RESULTS.md,
"OpenVINO's fused residual adds").

OpenVINO's CPU plugin fuses a residual Add into the convolution that feeds it and skips that
convolution's output QuantizeLinear. This script reads which adds it fused from the execution
graph (targets/openvino.fused_sums). It then writes the same graph with those convolutions
feeding their add directly. ONNX Runtime runs both graphs, and the script prints OpenVINO's
top-1 agreement and share of differing logits against each:

    python benchmarks/ov_fused_sums.py runs/x/03-quantize/model.onnx [--inputs images.npy]

--inputs: preprocessed NCHW float32 images (default: 512 standard-normal inputs of the model's shape).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def without_fused_requant(model: onnx.ModelProto, fused: list[list[str]]) -> int:
    """In place: each fused Add takes its convolution's float output instead of Q -> DQ of it."""
    from compress.onnx_graph import producers
    prod, changed = producers(model.graph), 0
    for group in map(set, fused):  # per runtime layer: its Add and its convolution's own QuantizeLinear
        for add in (n for n in model.graph.node if n.op_type == "Add" and n.name in group):
            for i, t in enumerate(add.input):
                dq = prod.get(t)
                q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
                if q is not None and q.op_type == "QuantizeLinear" and q.name in group:
                    add.input[i], changed = q.input[0], changed + 1
    return changed


def main() -> None:
    import onnxruntime as ort
    import openvino as ov

    from targets.openvino import fused_sums, runtime_layers
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--inputs", type=Path)
    args = ap.parse_args()
    model = onnx.load(str(args.onnx))
    compiled = ov.Core().compile_model(str(args.onnx), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    x = np.load(args.inputs) if args.inputs else np.random.default_rng(0).standard_normal((512, *shape))
    x = x.astype(np.float32)
    fused = fused_sums(runtime_layers(compiled))
    changed = without_fused_requant(model, fused)

    def ort_logits(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])
    got = np.concatenate([compiled(x[i:i + 256])[compiled.outputs[0]] for i in range(0, len(x), 256)])
    print(f"{args.onnx}: OpenVINO fused {len(fused)} add(s); {changed} convolution output(s) feed their add "
          f"without Q/DQ in the second graph; {len(x)} inputs")
    for name, ref in (("the graph as exported", ort_logits(onnx.load(str(args.onnx)))),
                      ("the graph with the fused adds' requantization removed", ort_logits(model))):
        agree, diff = float((got.argmax(1) == ref.argmax(1)).mean()), np.abs(got - ref)
        print(f"  OpenVINO vs ONNX Runtime on {name}: top-1 agreement {agree:.4f}, "
              f"logits differing {float((diff > 1e-6).mean()):.4f}, max |diff| {diff.max():.3g}")


if __name__ == "__main__":
    main()
