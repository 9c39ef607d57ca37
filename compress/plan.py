"""What deployment needs from a run, typed: the artifacts per stage, the targets with their
options, the evaluation data, the parity and profile settings, the run's identity. Built
once by `deployment_plan` from the run config; compress.deploy and compress.report read
only this, never the config or the pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import BaseModel
from torch import nn

from compress.errors import UserError

if TYPE_CHECKING:  # the builder reads the config; nothing else here depends on it
    from calib.datasets import Dataset
    from compress.config import RunConfig


def sparse_layers(structure) -> list[str]:
    """The one read of a stage's structure record deployment makes: its 2:4 layers."""
    return list(structure.sparsity)


def quant_activations(structure) -> str | None:
    """The stage's activation format (symmetric | asymmetric | signed), None for a float model:
    the export keeps all-int8 activations only for signed (TensorRT)."""
    return structure.quantize.activations if structure.quantize is not None else None


@dataclass(frozen=True)
class Parity:
    """The gate a deployment must pass, and the diagnosis run when it does not."""
    min_agreement: float = 0.98
    max_acc_drop: float = 0.005
    max_abs_diff: Optional[float] = None
    layer_tolerance: float = 0.02
    diagnose_batch: int = 32
    tolerance: Optional[float] = None  # regression agreement (compress/tasks.py)


@dataclass(frozen=True)
class Profile:
    """The timing harness's settings (targets/profile.py)."""
    warmup: int = 20
    max_warmup: int = 1000
    settle_tolerance: float = 0.05
    runs: int = 200
    throughput_batch: int = 64
    throughput_runs: int = 30
    vendor_seconds: float = 1.0
    throughput_search: bool = True


@dataclass(frozen=True)
class TargetSpec:
    """One targets[] entry: the backend, its generic settings and its own options model."""
    backend: str
    threads: Optional[int] = None
    device: str = "cpu"
    options: Optional[BaseModel] = None  # the backend's Options; None: its defaults
    parity: Parity = field(default_factory=Parity)
    host: Optional[str] = None  # ssh://user@host:port: a remote device, measured by `compress bench`
    # as_exported: the artifact as exported; speed: an int8 artifact keeps float the layers this
    # backend measured faster in float (compress/speed_precision.py), the choices in the row
    precision: str = "as_exported"
    shapes: str = "dynamic"  # auto: static-shape compiles for the timed batches where faster (compress/static_shape.py)
    latency_threads: str = "configured"  # auto: batch 1 on one thread where faster (compress/static_shape.py)


@dataclass
class StageArtifact:
    """A stage's model as deployment sees it: where its files go, what it is."""
    name: str
    model: nn.Module
    dir: Path
    structure: Any  # the stage's compress.structure.Structure; read only through sparse_layers(), quant_activations()
    export_hash: str  # marks the exports in `dir` as made from this model and these settings
    test_logits: Any = None  # the model's torch logits on the test split where the run has them; None: score it


@dataclass
class EvalData:
    """The test split every backend is measured on: raw pixels, labels, and the dataset's
    normalization (recorded in each manifest, from which a deployment preprocesses)."""
    dataset: "Dataset"
    batch_size: int = 500


@dataclass(frozen=True)
class RunIdentity:
    name: str
    run_dir: Path
    config_hash: str
    seed: int = 0


@dataclass
class DeploymentPlan:
    run: RunIdentity
    stages: list[StageArtifact]
    targets: list[TargetSpec]
    data: EvalData
    profile: Profile = field(default_factory=Profile)
    opset: int = 17
    log: Callable[[str], None] = print
    task: Any = None  # compress.tasks.Task: metrics, agreement, the gate; None: classification


def target_spec(entry) -> TargetSpec:
    """A validated targets[] entry (compress.config.TargetConfig) as deployment reads it."""
    return TargetSpec(backend=entry.backend, threads=entry.threads, device=entry.device,
                      options=entry.options, parity=Parity(**entry.parity.model_dump()),
                      host=str(entry.host) if getattr(entry, "host", None) else None,
                      precision=getattr(entry, "precision", "as_exported"),
                      shapes=getattr(entry, "shapes", "dynamic"),
                      latency_threads=getattr(entry, "latency_threads", "configured"))


def deployment_plan(cfg: "RunConfig", rows: list[dict], models: dict, data: "Dataset",
                    run_dir: Path, log: Callable[[str], None] = print, task=None,
                    logits: Optional[dict] = None) -> DeploymentPlan:
    """rows: the stage rows (metrics, each with its chained config_hash); models: stage name
    -> (model, stage dir, structure), in run order; logits: stage name -> the model's torch
    logits on the test split, where this process computed them."""
    from compress.config import config_hash
    from compress.export import EXPORT_FORMAT
    wanted = cfg.export.stages or list(models)
    unknown = [s for s in wanted if s not in models]
    if unknown:
        raise UserError(f"export.stages: {unknown} are not stages of this run ({list(models)})")
    stage_hash = {r["name"]: r["config_hash"] for r in rows}
    # True: the IR flag these hashes held before each target prepared its own artifact (kept
    # so that only a change of EXPORT_FORMAT, not this refactor, makes runs export again)
    stages = [StageArtifact(name, *models[name],
                            export_hash=config_hash(stage_hash[name], cfg.export.opset, True, EXPORT_FORMAT),
                            test_logits=(logits or {}).get(name))
              for name in wanted]
    return DeploymentPlan(
        run=RunIdentity(cfg.name, Path(run_dir), config_hash(cfg), cfg.seed), stages=stages,
        targets=[target_spec(t) for t in cfg.targets], data=EvalData(data, cfg.data.eval_batch_size),
        profile=Profile(**cfg.profile.model_dump()), opset=cfg.export.opset, log=log, task=task)
