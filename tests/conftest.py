import os
from pathlib import Path

import pytest
import torch

# Tests run small models: one thread avoids oversubscribing CI's two cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data():
    from calib.datasets import synthetic
    return synthetic(num_classes=10, train_size=2048, test_size=256, seed=0)


@pytest.fixture(scope="session")
def trained_tiny(tiny_data):
    """resnet_tiny trained to high accuracy on the synthetic set (a few seconds)."""
    from compress.models import build_model
    from compress.train import TrainConfig, TrainEnv, fit
    torch.manual_seed(0)  # the same fixture model whatever test runs first
    model = build_model("resnet_tiny", 10, 1)
    fit(model, tiny_data, TrainConfig(epochs=4, lr=1e-2, augment=False), TrainEnv(64, log=lambda s: None))
    return model.eval()


def make_ctx(data, teacher, run_dir, calib=256, eval_each_epoch=False, model="resnet_tiny"):
    """The RunContext a stage receives, for stage-level tests (the pipeline's services)."""
    from calib.sampling import calibration_split
    from compress.measure import LatencyService, model_stats
    from compress.stage import RunContext
    from compress.structure import Structure
    structure = Structure(model=model, num_classes=data.num_classes, in_channels=data.input_shape[0],
                          input_shape=list(data.input_shape))
    return RunContext(data=data, calib=calibration_split(data.train, calib, 0), teacher=teacher,
                      device=torch.device("cpu"), run_dir=run_dir, log=lambda s: None, seed=0,
                      batch_size=64, structure=structure, latency=LatencyService(data.input_shape),
                      model_stats=model_stats, eval_each_epoch=eval_each_epoch)


def run_stage(kind, model, ctx, cfg):
    """A stage of the table, called as the pipeline calls it -> StageResult."""
    from compress import stages
    return stages.get(kind).run(model, ctx, cfg)
