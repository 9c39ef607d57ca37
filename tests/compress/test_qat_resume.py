"""Resume inside quantization-aware training (compress/quantize/resume.py): brevitas' state
outside state_dict is frozen by calibration and carried anyway, checkpoints load into the
quantizers the resumed stage rebuilt (their sharing kept), and a QAT stopped mid-epoch and
resumed ends with the same weights and scales, to the bit, as one never stopped."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compress import train_state
from compress.config_load import load_config
from compress.pipeline import Pipeline
from compress.quantize import resume as qat

KD = [{"kind": "kl", "weight": 0.9, "temperature": 2}, {"kind": "ce", "weight": 0.1}]


def calibrated(seed: int = 0, **qs):
    """resnet_tiny (it has residual adds: shared scales), quantized and calibrated on random images."""
    from brevitas.graph.calibrate import calibration_mode

    from compress.models import resnet_tiny
    from compress.quantize.config import QuantizeConfig, settings
    from compress.quantize.graph import prepare
    torch.manual_seed(seed)
    model = prepare(resnet_tiny(10, 1), {**settings(QuantizeConfig(**qs)), "layer_bits": {}})
    model.eval()
    with torch.no_grad(), calibration_mode(model):
        for _ in range(2):
            model(torch.randn(8, 1, 16, 16))
    return model


def scale_owners(model) -> list[list[str]]:
    """The quantizers' scaling modules, each with every name it is reached by (shared ones have several)."""
    ids: dict = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m).__name__ == "ParameterFromRuntimeStatsScaling":
            ids.setdefault(id(m), []).append(name)
    return sorted(ids.values())


@pytest.mark.parametrize("activations", ["symmetric", "asymmetric"])
def test_calibration_freezes_every_runtime_statistic_and_training_leaves_it(activations):
    model = calibrated(activations=activations)
    state = qat.runtime_state(model)
    counters = {n: a for n, a in state.items() if "counter" in a}
    assert len(counters) >= 9  # every activation scale (and zero point), not none
    # each statistic moved into its Parameter: counter past collect_stats_steps (brevitas' init_scale)
    assert all(a["counter"] > a["collect_stats_steps"] for a in counters.values()), counters
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 1, 16, 16)).sum().backward()
        opt.step()
    assert qat.runtime_state(model) == state  # QAT trains the scales as Parameters, no counter moves


def test_a_plain_load_state_dict_breaks_the_shared_scales_and_resume_loading_keeps_them():
    src, fresh = calibrated(0), calibrated(1)
    shared = [names for names in scale_owners(fresh) if len(names) > 1]
    assert shared  # a residual add's inputs share one scale
    with qat.loading():
        fresh.load_state_dict(src.state_dict())
    assert scale_owners(fresh) == scale_owners(src)
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(fresh(x), src(x))
    plain = calibrated(1)
    plain.load_state_dict(src.state_dict())  # brevitas re-creates the quantizers (its issue #722)
    assert len(scale_owners(plain)) > len(scale_owners(src))  # if this fails, brevitas fixed it


def test_the_signature_tells_weight_bits_apart():
    assert qat.signature(calibrated(weight_bits=8)) != qat.signature(calibrated(weight_bits=4))
    assert qat.signature(calibrated(0)) == qat.signature(calibrated(1))


def config(out: Path) -> Path:
    c = {"name": "q", "seed": 3, "output": {"dir": str(out), "checkpoint_every_steps": 3},
         "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 64,
                  "synthetic": {"train_size": 256, "test_size": 64, "image_size": 16}},
         "teacher": {"model": "resnet_tiny_teacher", "train": {"epochs": 1, "lr": 0.01}},
         "student": {"model": "resnet_tiny"},
         # zero points, bias correction and augmentation: every piece of state a QAT step reads
         "stages": [{"kind": "distill", "epochs": 1, "lr": 0.01, "loss": KD},
                    {"kind": "quantize", "calib_batches": 2, "epochs": 2, "lr": 0.0005, "loss": KD, "augment": True,
                     "activations": "asymmetric", "bias_correction": True}],
         "export": {"stages": []}, "targets": []}
    out.mkdir(parents=True, exist_ok=True)
    (out / "c.yaml").write_text(yaml.safe_dump(c))
    return out / "c.yaml"


class Stop(Exception):
    pass


def test_qat_stopped_inside_an_epoch_resumes_to_the_same_weights(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    Pipeline(load_config(config(tmp_path / "whole")), log=lambda s: None).run_stages()
    saved_at = []
    real = train_state.TrainCheckpoint.on_step_end

    def stop_at_11(self, loop):  # 8 steps an epoch: step 11 is inside the second; the last save was at 9
        real(self, loop)
        if self.scope.name == "quantize" and loop.step == 11:
            saved_at.append(torch.load(self.path, weights_only=True)["step"])
            raise Stop
    monkeypatch.setattr(train_state.TrainCheckpoint, "on_step_end", stop_at_11)
    with pytest.raises(Stop):
        Pipeline(load_config(config(tmp_path / "cut")), log=lambda s: None).run_stages()
    monkeypatch.setattr(train_state.TrainCheckpoint, "on_step_end", real)
    logs = []
    Pipeline(load_config(config(tmp_path / "cut")), log=logs.append).run_stages()
    assert saved_at == [9]
    assert "[quantize] resuming at step 9/16 (epoch 2) from" in "\n".join(logs)
    a, b = (load_file(str(tmp_path / d / "q" / "02-quantize" / "model.safetensors")) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads((tmp_path / d / "q" / "02-quantize" / "metrics.json").read_text())["history"]
            for d in ("whole", "cut")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


def test_a_checkpoint_of_other_weight_bits_does_not_load(tmp_path):
    """mixed precision's bits are not in state_dict: a checkpoint of a W4 model must not load into W8."""
    from types import SimpleNamespace
    logs = []
    with train_state.stage_checkpoints(tmp_path, "h", "quantize", logs.append):
        w4, w8 = calibrated(weight_bits=4), calibrated(weight_bits=8)
        ck = train_state.TrainCheckpoint(train_state._scope, 0, SimpleNamespace(model=w8), None, None, None, [])
        with pytest.raises(ValueError, match="another quantized structure"):
            ck._load_model(w8, w4.state_dict(), {"runtime": qat.runtime_state(w4), "signature": qat.signature(w4)})
