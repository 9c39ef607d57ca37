"""A PTQ-only quantize stage hands its PTQ accuracy pass's logits to the pipeline, which
scores the stage from them instead of a second full test-split pass (issue 16: half of a
PTQ-only stage's time on the teacher). The logits must be those of the returned model."""
import copy

import numpy as np

from compress.quantize import QuantizeConfig
from compress.train import accuracy, predict
from tests.conftest import make_ctx, run_stage


def test_ptq_only_logits_are_the_returned_models(trained_tiny, tiny_data, tmp_path):
    ctx = make_ctx(tiny_data, trained_tiny, tmp_path)
    res = run_stage("quantize", copy.deepcopy(trained_tiny), ctx, QuantizeConfig(epochs=0))
    again = predict(res.model, tiny_data.test, tiny_data)
    assert res.test_logits is not None and res.test_logits.shape == again.shape
    # the same model on the same data: the same logits (layer_sqnr left the quantizers as they were)
    np.testing.assert_allclose(res.test_logits, again, rtol=0, atol=1e-5)
    assert accuracy(again, tiny_data.test.labels) == res.metrics["ptq_accuracy"]
    assert res.metrics["ptq_accuracy_on"].startswith(f"test split ({len(tiny_data.test.labels)} examples)")
    assert "_ptq_logits" not in res.metrics


def test_qat_stage_hands_no_logits(trained_tiny, tiny_data, tmp_path):
    """After QAT the returned model is no longer the one PTQ scored: the pipeline must score it."""
    ctx = make_ctx(tiny_data, trained_tiny, tmp_path)
    res = run_stage("quantize", copy.deepcopy(trained_tiny), ctx, QuantizeConfig(epochs=0.25, augment=False))
    assert res.test_logits is None and "ptq_accuracy" in res.metrics and "_ptq_logits" not in res.metrics
