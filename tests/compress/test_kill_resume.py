"""Resume inside a stage: a real `compress run` killed (SIGKILL) or interrupted (SIGINT) in the
middle of a training stage continues from its last checkpoint, loses at most one epoch, finishes
with the same stage list, and ends with the same weights, to the bit, as a run never stopped."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compress.config_load import load_config
from compress.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 6
QAT_EPOCHS = 2


def config(out: Path) -> dict:
    return {"name": "kr", "seed": 3,
            "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64, "calib_samples": 32,
                     "synthetic": {"train_size": 512, "test_size": 64, "image_size": 16}},
            "teacher": {"model": "resnet_tiny_teacher", "train": {"epochs": 1, "lr": 0.01}},
            "student": {"model": "resnet_tiny"},
            # taid: the objective carries state (t, momentum) from step to step; augment: the generator
            "stages": [{"kind": "distill", "epochs": EPOCHS, "lr": 0.01, "augment": True,
                        "loss": [{"kind": "ce", "weight": 0.5}, {"kind": "taid", "weight": 0.5}]}],
            "export": {"stages": []}, "targets": [],
            "output": {"dir": str(out)}}


def qat_config(out: Path) -> dict:
    """A short distill, then quantization-aware training of QAT_EPOCHS epochs (activations with
    zero points, augmentation on): the stage that is killed."""
    c = config(out)
    c["data"]["synthetic"]["train_size"] = 1024
    c["stages"] = [{"kind": "distill", "epochs": 1, "lr": 0.01},
                   {"kind": "quantize", "calib_batches": 2, "epochs": QAT_EPOCHS, "lr": 0.0005, "augment": True,
                    "activations": "asymmetric", "loss": [{"kind": "kl", "weight": 0.9, "temperature": 2},
                                                           {"kind": "ce", "weight": 0.1}]}]
    return c


def write(out: Path, make=config) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "c.yaml").write_text(yaml.safe_dump(make(out)))
    return out / "c.yaml"


def start(cfg: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", str(cfg)], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared"
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    torch.set_num_threads(1)
    Pipeline(load_config(write(out)), log=lambda s: None).run_stages()
    return out / "kr"


def finished(run_dir: Path, stage: str = "01-distill") -> dict:
    return json.loads((run_dir / stage / "metrics.json").read_text())


def same_weights(a: Path, b: Path, stage: str = "01-distill") -> bool:
    x, y = (load_file(str(d / stage / "model.safetensors")) for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_sigkill_mid_stage_resumes_from_the_last_epoch_and_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    cfg = write(tmp_path)
    ck = tmp_path / "kr" / "01-distill" / ".resume" / "fit-0.pt"
    proc = start(cfg, tmp_path / "first.log")
    wait_for(ck, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(ck, weights_only=True)
    assert 0 < saved["step"] < saved["total"]  # killed inside the stage
    proc = start(cfg, tmp_path / "second.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    log = (tmp_path / "second.log").read_text()
    assert "[teacher] up to date, skipped" in log
    assert f"[distill] resuming at step {saved['step']}/{saved['total']}" in log
    # at most one epoch lost: the resumed run trains only the epochs after the checkpoint
    trained = [line for line in log.splitlines() if " distill epoch " in line]
    assert len(trained) == EPOCHS - saved["epoch"] and EPOCHS - len(trained) >= 1
    assert [r["epoch"] for r in finished(tmp_path / "kr")["history"]] == list(range(1, EPOCHS + 1))
    assert not ck.parent.exists()  # checkpoints go when the stage is complete
    assert same_weights(tmp_path / "kr", uninterrupted)  # bit-identical to the run never killed


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_or_sigterm_stops_after_the_step_writes_a_checkpoint_and_exits_130_143(uninterrupted, tmp_path,
                                                                                     sig, code):
    cfg = write(tmp_path)
    ck = tmp_path / "kr" / "01-distill" / ".resume" / "fit-0.pt"
    proc = start(cfg, tmp_path / "first.log")
    wait_for(ck, proc)
    time.sleep(0.3)  # inside the next epoch: the checkpoint holds the rest of its example order
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code
    log = (tmp_path / "first.log").read_text()
    assert f"stopped by {sig.name} after step" in log and "Run the same `compress run` command again" in log
    assert "Traceback" not in log
    saved = torch.load(ck, weights_only=True)
    assert saved["order"] is not None and 0 < saved["step"] < saved["total"]  # stopped inside an epoch
    proc = start(cfg, tmp_path / "second.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    assert "[distill] resuming at step" in (tmp_path / "second.log").read_text()
    assert same_weights(tmp_path / "kr", uninterrupted)
    rows, whole = finished(tmp_path / "kr")["history"], finished(uninterrupted)["history"]
    assert [round(r["loss"], 6) for r in rows] == [round(r["loss"], 6) for r in whole]


@pytest.mark.slow
def test_sigkill_inside_quantization_aware_training_resumes_it_bit_for_bit(tmp_path_factory):
    whole, cut = tmp_path_factory.mktemp("qat-whole"), tmp_path_factory.mktemp("qat-cut")
    torch.set_num_threads(1)
    Pipeline(load_config(write(whole, qat_config)), log=lambda s: None).run_stages()
    cfg = write(cut, qat_config)
    ck = cut / "kr" / "02-quantize" / ".resume" / "fit-0.pt"
    proc = start(cfg, cut / "first.log")
    wait_for(ck, proc)  # the end of QAT's first epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(ck, weights_only=True)
    assert 0 < saved["step"] < saved["total"]  # killed inside the stage
    proc = start(cfg, cut / "second.log")
    assert proc.wait(timeout=300) == 0, (cut / "second.log").read_text()
    log = (cut / "second.log").read_text()
    assert "[distill] up to date, skipped" in log and "[quantize] running" in log  # calibrated again
    assert f"[quantize] resuming at step {saved['step']}/{saved['total']}" in log
    trained = [line for line in log.splitlines() if " qat epoch " in line]
    assert len(trained) == QAT_EPOCHS - saved["epoch"] == 1  # at most one epoch lost
    assert [r["epoch"] for r in finished(cut / "kr", "02-quantize")["history"]] == list(range(1, QAT_EPOCHS + 1))
    assert same_weights(cut / "kr", whole / "kr", "02-quantize")  # scales and weights, to the bit


def test_checkpoints_every_n_steps_as_well_as_at_each_epoch_end(tmp_path, monkeypatch):
    from compress import train_state
    saved = []
    monkeypatch.setattr(train_state.TrainCheckpoint, "save",
                        lambda self, loop, ended=False: saved.append((loop.step, ended)))
    cfg = write(tmp_path)
    raw = yaml.safe_load(cfg.read_text())
    raw["stages"][0]["epochs"] = 2
    raw["output"]["checkpoint_every_steps"] = 5
    cfg.write_text(yaml.safe_dump(raw))
    Pipeline(load_config(cfg), log=lambda s: None).run_stages()
    distill = saved[-8:]  # 16 steps an epoch: the teacher's one epoch, then the distill stage's two
    assert distill == [(5, False), (10, False), (15, False), (16, True), (20, False), (25, False), (30, False),
                       (32, True)]


def test_the_sampler_hands_out_the_saved_rest_of_an_epoch_then_draws_again():
    from compress.loader import SeededPermutation
    from compress.train_state import ResumableSampler
    a = ResumableSampler(SeededPermutation(10, torch.Generator().manual_seed(0)))
    it = iter(a)
    head = [next(it) for _ in range(4)]
    rest, state = a.rest(), a.inner.generator.get_state()
    b = ResumableSampler(SeededPermutation(10, torch.Generator()))
    b.inner.generator.set_state(state)
    b.pending = rest
    assert head + list(b) == a.order  # the interrupted epoch, completed
    assert list(b) == list(a)  # the next epoch: drawn from the same generator state
