"""Mixed precision by measured sensitivity: the table is reproducible, the budget is met, the
assignment follows cost per bit saved, and a mixed-bit model rebuilds from its settings."""
import copy

import pytest
import torch

from compress.checkpoint import load_into, read_state_dict, save_weights
from compress.models import build_model
from compress.quantize import QuantizeConfig, rebuild_quantized
from compress.quantize.sensitivity import assign
from tests.conftest import make_ctx, run_stage

MIXED = dict(epochs=0, augment=False, mixed_precision={"avg_bits": 6.0, "low_bits": 4, "batches": 1},
             calib_batches=2)


@pytest.fixture(scope="module")
def mixed_twice(trained_tiny, tiny_data, tmp_path_factory):
    out = []
    for i in range(2):
        ctx = make_ctx(tiny_data, trained_tiny, tmp_path_factory.mktemp(f"mp{i}"))
        res = run_stage("quantize", copy.deepcopy(trained_tiny), ctx, QuantizeConfig(**MIXED))
        out.append((res.model, res))
    return out


def test_sensitivity_table_is_deterministic_and_meets_the_budget(mixed_twice):
    (_, a), (_, b) = mixed_twice
    assert a.metrics["sensitivity"] == b.metrics["sensitivity"]  # same numbers, same order
    assert a.metrics["weight_bits"] == b.metrics["weight_bits"]
    table = a.metrics["sensitivity"]
    deltas = [r["objective_delta"] for r in table]
    assert len(table) == 7 and deltas == sorted(deltas, reverse=True)
    assert any(d > 0 for d in deltas)  # lowering a layer to 4 bits costs something measurable
    mp = a.metrics["mixed_precision"]
    assert mp["met"] and mp["avg_bits"] <= 6.0 and a.metrics["avg_weight_bits"] == pytest.approx(mp["avg_bits"])
    assert {r["bits"] for r in table} == {4, 8} and a.metrics["format"] == "W4/8A8 mixed"
    assert a.structure.quantize.layer_bits == a.metrics["weight_bits"]


def test_mixed_bit_model_rebuilds_with_identical_outputs(mixed_twice, tmp_path):
    q, res = mixed_twice[0]
    save_weights(q, tmp_path / "q.safetensors")
    rebuilt = rebuild_quantized(build_model("resnet_tiny", 10, 1), res.structure.quantize.model_dump(), (1, 28, 28))
    load_into(rebuilt, read_state_dict(tmp_path / "q.safetensors"), "q")
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(q.eval()(x), rebuilt.eval()(x))
    bits = {n: int(m.weight_quant.bit_width()) for n, m in rebuilt.named_modules() if hasattr(m, "weight_quant")}
    assert bits == res.metrics["weight_bits"]


def test_assign_lowers_cheapest_per_bit_saved_until_the_budget():
    weights = {"a": 100, "b": 100, "c": 800}
    delta = {"a": 0.01, "b": 0.5, "c": 0.05}  # per weight: c is cheapest, then a, then b
    bits = {n: 8 for n in weights}
    lowered = assign(weights, bits, dict(delta), 4, 5.0)
    assert lowered == ["c"] and bits == {"a": 8, "b": 8, "c": 4}  # 8 - 4 * 0.8 = 4.8 <= 5
    bits = {n: 8 for n in weights}
    assert assign(weights, bits, dict(delta), 4, 4.5) == ["c", "a"]
