"""predict() scores a brevitas model through a copy in brevitas' quant_inference_mode (weights
quantized once): its logits must be the model's, the model itself must stay as it was, and
the copy must be refused where its outputs differ."""
import copy

import numpy as np
import torch

from compress.quantize import QuantizeConfig
from compress.quantize import inference as inf
from compress.train import predict
from tests.conftest import make_ctx, run_stage


def _plain(model, split, data, batch=64):
    with torch.no_grad():
        return torch.cat([model(data.normalize(x)) for x in split.images.split(batch)]).float().numpy()


def test_twin_logits_are_the_models_and_the_model_is_untouched(trained_tiny, tiny_data, tmp_path):
    ctx = make_ctx(tiny_data, trained_tiny, tmp_path)
    q = run_stage("quantize", copy.deepcopy(trained_tiny), ctx, QuantizeConfig(epochs=0)).model.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x = tiny_data.normalize(tiny_data.test.images[:64])
    twin = inf.inference_twin(q, x)
    assert twin is not q  # the cached path was taken on this model
    np.testing.assert_allclose(predict(q, tiny_data.test, tiny_data), _plain(q, tiny_data.test, tiny_data),
                               rtol=0, atol=1e-5)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the model's own proxies never entered the mode: no cached weights, no export mode
    assert not any(getattr(m, "export_mode", False) or getattr(m, "_cached_weight", None) is not None
                   for m in q.modules())


def test_twin_refused_when_it_disagrees(trained_tiny, tiny_data, tmp_path, monkeypatch):
    ctx = make_ctx(tiny_data, trained_tiny, tmp_path)
    q = run_stage("quantize", copy.deepcopy(trained_tiny), ctx, QuantizeConfig(epochs=0)).model.eval()
    monkeypatch.setattr(inf, "ATOL", -1.0)  # no output can be within a negative tolerance
    assert inf.inference_twin(q, tiny_data.normalize(tiny_data.test.images[:8])) is q


def test_float_models_run_as_they_are(trained_tiny, tiny_data):
    assert inf.inference_twin(trained_tiny, tiny_data.normalize(tiny_data.test.images[:8])) is trained_tiny
    # the CPU cuts each loader batch into calls of CPU_CALL_BATCH: the same logits as one call per batch
    np.testing.assert_allclose(predict(trained_tiny, tiny_data.test, tiny_data, batch_size=500),
                               _plain(trained_tiny, tiny_data.test, tiny_data, batch=500), rtol=0, atol=1e-5)
