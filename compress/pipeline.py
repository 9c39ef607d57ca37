"""Runs the stages in order, owns the run directory, artifacts and resume.

Layout of runs/<name>/:  00-teacher/ 01-<stage>/ ...  each with model.safetensors,
structure.json, metrics.json (its config_hash marks it complete), and the exports;
report.json / report.md at the top. A stage is skipped on re-run when its metrics.json
holds the same chained config hash; a changed stage reruns with every stage after it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from calib.datasets import Dataset, Split, fashion_mnist, resolve_factory, synthetic
from calib.sampling import calibration_split, stratified_indices
from compress import prune, quantize
from compress.distill import stage as distill
from compress.checkpoint import (apply_shapes, load_into, read_state_dict, record_shapes,
                                 save_weights, write_json)
from compress.config import RunConfig, config_hash
from compress.errors import UserError
from compress.models import build_model, count_params
from compress.train import TrainEnv, accuracy, fit, predict

STAGES: dict[str, Callable[[nn.Module, "RunContext", object], nn.Module]] = {
    "distill": distill.run,
    "prune": prune.run,
    "quantize": quantize.run,
}


@dataclass
class RunContext:
    """What a stage may use. Stages never touch backends or the run layout."""
    data: Dataset
    calib: Split
    teacher: Optional[nn.Module]
    device: torch.device
    run_dir: Path
    log: Callable[[str], None]
    seed: int
    batch_size: int
    structure: dict  # recorded changes to the factory model (shapes, quantizer settings)
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # extra per-stage metrics a stage reports
    eval_each_epoch: bool = True
    teacher_key: str = "teacher"  # identity hash of the teacher(s): keys the output cache
    data_key: str = "data"

    def calib_batches(self, n: int):
        """(model input, labels) of the first n batches of the calibration subset, in a fixed
        order: what every calibration-time measurement (quantizer ranges, importance scores,
        block distortion, sensitivity) runs on."""
        from compress.loader import eval_loader
        for _, (x, y, _) in zip(range(n), eval_loader(self.calib, self.batch_size)):
            yield self.data.normalize(x), y

    def train_env(self, desc: str, **changes) -> TrainEnv:
        """What every stage passes to the one training loop; `changes` replace fields."""
        from compress.prune.sparse import MaskKeeper
        sparse = self.structure.get("sparsity")
        env = dict(desc=desc, teacher=self.teacher, teacher_key=self.teacher_key, cache_dir=self.run_dir / "cache",
                   data_key=self.data_key, seed=self.seed, device=self.device, log=self.log,
                   eval_split=self.data.test if self.eval_each_epoch else None,
                   # 2:4 layers keep their zeros through every later stage's training
                   callbacks=[MaskKeeper(list(sparse))] if sparse else [])
        return TrainEnv(self.batch_size, **{**env, **changes})


def load_data(cfg: RunConfig) -> Dataset:
    d = cfg.data
    if d.dataset == "fashion_mnist":
        data = fashion_mnist(cfg.resolve_path(d.root))
    elif d.dataset == "synthetic":
        data = synthetic(**d.synthetic.model_dump(), seed=cfg.seed)
    else:
        data = resolve_factory(d.dataset, "data.dataset")()
        if not isinstance(data, Dataset):
            raise UserError(f"data.dataset={d.dataset!r} returned {type(data).__name__}, "
                             f"expected calib.datasets.Dataset")
    if d.limit_train:
        data.train = data.train.subset(stratified_indices(data.train.labels, d.limit_train, cfg.seed))
    if d.limit_test:
        data.test = data.test.subset(stratified_indices(data.test.labels, d.limit_test, cfg.seed))
    return data


def preflight(cfg: RunConfig, data: Dataset) -> None:
    """Checks on user-given files that would otherwise fail mid-run: each checkpoint must
    load (weights_only) into the model its section names."""
    for role, c in [("teacher", t) for t in cfg.teachers] + [("student", cfg.student)]:
        if c.checkpoint:
            model = build_model(c.model, data.num_classes, data.input_shape[0])
            load_into(model, read_state_dict(cfg.resolve_path(c.checkpoint)),
                      f"{role}.checkpoint={c.checkpoint}")
    student = build_model(cfg.student.model, data.num_classes, data.input_shape[0])
    for i, scfg in enumerate(cfg.stages):
        if scfg.kind == "prune":
            prune.check(student, scfg, f"stages.{i}", data.input_shape)
        if scfg.kind == "quantize":
            quantize.check(student, scfg, f"stages.{i}")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def stage_done(stage_dir: Path, h: str) -> bool:
    m = stage_dir / "metrics.json"
    if not (m.is_file() and (stage_dir / "model.safetensors").is_file()):
        return False
    return json.loads(m.read_text()).get("config_hash") == h


def rebuild(structure: dict, weights: Path) -> nn.Module:
    """Factory + recorded shapes (+ quantizer settings) + tensors: no unpickling."""
    model = build_model(structure["model"], structure["num_classes"], structure["in_channels"])
    if structure.get("shapes"):
        apply_shapes(model, structure["shapes"], structure.get("removed_blocks", []))
    if structure.get("quantize"):
        model = quantize.rebuild_quantized(model, structure["quantize"], structure["input_shape"])
    load_into(model, read_state_dict(weights), str(weights))
    return model.eval()


def model_stats(model: nn.Module, float_model: nn.Module, data: Dataset) -> dict:
    import torch_pruning as tp
    example = torch.zeros(1, *data.input_shape)
    macs, _ = tp.utils.count_ops_and_params(float_model.eval(), example)
    return {"params": count_params(model), "macs": int(macs)}


class Pipeline:
    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.run_dir = Path(cfg.output.dir) / cfg.name
        self.device = pick_device(cfg.device)

    def _save_stage(self, sdir: Path, name: str, model: nn.Module, float_model: nn.Module,
                    structure: dict, h: str, seconds: float, ctx: RunContext, stage_cfg) -> dict:
        save_weights(model, sdir / "model.safetensors", {"stage": name, "config_hash": h})
        write_json(sdir / "structure.json", structure)
        logits = predict(model, ctx.data.test, ctx.data, self.cfg.data.eval_batch_size)
        metrics = {"name": name, "config_hash": h, "accuracy": accuracy(logits, ctx.data.test.labels),
                   **model_stats(model, float_model, ctx.data),
                   "size_bytes": (sdir / "model.safetensors").stat().st_size,
                   "seconds": round(seconds, 2), "history": ctx.history, **ctx.metrics,
                   "config": stage_cfg.model_dump(mode="json")}
        write_json(sdir / "metrics.json", metrics)  # written last: marks the stage complete
        self.log(f"[{name}] torch accuracy {metrics['accuracy']:.4f}, params {metrics['params']:,}, "
                 f"MACs {metrics['macs']:,} ({seconds:.0f}s)")
        return metrics

    def _teacher(self, ctx: RunContext, base: dict, i: int, tc) -> tuple[nn.Module, dict, str, str, Path]:
        name = "teacher" if i == 0 else f"teacher-{i + 1}"
        sdir = self.run_dir / ("00-teacher" if i == 0 else f"00-teacher-{i + 1}")
        source = file_digest(self.cfg.resolve_path(tc.checkpoint)) if tc.checkpoint else None
        h = config_hash(tc.model_dump(exclude={"weight"}), self.cfg.data.identity(),
                        self.cfg.data.batch_size, self.cfg.seed + i, source)
        structure = {**base, "model": tc.model}
        if stage_done(sdir, h):
            self.log(f"[{name}] up to date, skipped")
            return rebuild(structure, sdir / "model.safetensors"), json.loads(
                (sdir / "metrics.json").read_text()), h, name, sdir
        t0 = time.time()
        model = build_model(tc.model, base["num_classes"], base["in_channels"])
        ctx.history, ctx.metrics = [], {}
        if tc.checkpoint:
            load_into(model, read_state_dict(self.cfg.resolve_path(tc.checkpoint)),
                      f"teacher.checkpoint={tc.checkpoint}")
            ctx.metrics["checkpoint"] = tc.checkpoint
        else:
            self.log(f"[{name}] training {tc.model} for {tc.train.epochs} epochs")
            env = TrainEnv(ctx.batch_size, desc=name, seed=self.cfg.seed + i, device=self.device, log=self.log,
                           eval_split=ctx.data.test)
            ctx.history = fit(model, ctx.data, tc.train, env)
        model.cpu().eval()
        metrics = self._save_stage(sdir, name, model, model, structure, h,
                                   time.time() - t0, ctx, tc)
        return model, metrics, h, name, sdir

    def _synthetic_calib(self, ctx: RunContext, source: nn.Module, chain_h: str):
        """Data-free calibration images for a quantize stage, cached under the run's cache/
        by what made them (the source model's identity and the synthesis settings)."""
        from calib.synthetic import load_or_synthesize
        d = self.cfg.data
        key = ctx.teacher_key if d.synthesis.source == "teacher" else chain_h
        self.log(f"  data.calibration: synthetic: fitting {d.calib_samples} images to the "
                 f"{d.synthesis.source}'s BatchNorm statistics")
        return load_or_synthesize(self.run_dir / "cache", [d.synthesis.source, key], copy.deepcopy(source),
                                  d.calib_samples, ctx.data.input_shape, ctx.data.normalize,
                                  d.synthesis, self.cfg.seed, self.log)

    def run_stages(self) -> tuple[list[dict], dict[str, tuple[nn.Module, Path, dict]], RunContext]:
        """Train/prune/quantize as configured. Returns the stage rows and, per stage name,
        (model, stage dir, structure) for export."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        data = load_data(cfg)
        preflight(cfg, data)
        base = {"num_classes": data.num_classes, "in_channels": data.input_shape[0],
                "input_shape": list(data.input_shape)}
        ctx = RunContext(data=data, calib=calibration_split(data.train, cfg.data.calib_samples, cfg.seed),
                         teacher=None, device=self.device, run_dir=self.run_dir, log=self.log,
                         seed=cfg.seed, batch_size=cfg.data.batch_size, structure={})
        self.log(f"data: {data.name}, {len(data.train)} train / {len(data.test)} test, "
                 f"input {data.input_shape}, {data.num_classes} classes")
        rows, models, members, hashes = [], {}, [], []
        for i, tc in enumerate(cfg.teachers):
            teacher, tmetrics, h, name, sdir = self._teacher(ctx, base, i, tc)
            rows.append(tmetrics)
            models[name] = (teacher, sdir, {**base, "model": tc.model})
            members.append(teacher)
            hashes.append(h)
        if len(members) == 1:
            ctx.teacher = members[0]
        else:
            from compress.distill.ensemble import Ensemble
            ctx.teacher = Ensemble(members, [t.weight for t in cfg.teachers])
        prev_h = ctx.teacher_key = config_hash(hashes, [t.weight for t in cfg.teachers])
        ctx.data_key = config_hash(cfg.data.identity())
        sc = cfg.student
        model = build_model(sc.model, base["num_classes"], base["in_channels"])
        if sc.checkpoint:
            load_into(model, read_state_dict(cfg.resolve_path(sc.checkpoint)),
                      f"student.checkpoint={sc.checkpoint}")
        structure = {**base, "model": sc.model}
        prev_h = config_hash(prev_h, sc, file_digest(cfg.resolve_path(sc.checkpoint)) if sc.checkpoint else None)
        float_model, real_calib = model, ctx.calib
        for i, scfg in enumerate(cfg.stages, start=1):
            # a kind used twice (two prune stages, say) gets its position in the name
            name = scfg.kind if [s.kind for s in cfg.stages].count(scfg.kind) == 1 else f"{scfg.kind}-{i}"
            sdir = self.run_dir / f"{i:02d}-{scfg.kind}"
            # calibration data only reaches the quantize stage
            # (real calibration keeps its earlier hash, so finished runs stay finished)
            calib = None if scfg.kind != "quantize" else cfg.data.calib_samples if \
                cfg.data.calibration == "real" else [cfg.data.calib_samples, cfg.data.synthesis]
            h = config_hash(prev_h, scfg, cfg.data.batch_size, calib)
            if stage_done(sdir, h):
                self.log(f"[{name}] up to date, skipped")
                structure = json.loads((sdir / "structure.json").read_text())
                model = rebuild(structure, sdir / "model.safetensors")
                metrics = json.loads((sdir / "metrics.json").read_text())
            else:
                self.log(f"[{name}] running ({sdir.name})")
                ctx.structure, ctx.history, ctx.metrics = copy.deepcopy(structure), [], {}
                ctx.calib = real_calib
                if scfg.kind == "quantize" and cfg.data.calibration == "synthetic":
                    # an ensemble's BN statistics live in its members: the first one's are used
                    source = members[0] if cfg.data.synthesis.source == "teacher" else model
                    ctx.calib = self._synthetic_calib(ctx, source, prev_h)
                t0 = time.time()
                # a copy: stages change modules in place, and every stage's model is kept
                # for export (brevitas' BN merge would otherwise rewrite the float model)
                model = STAGES[scfg.kind](copy.deepcopy(model), ctx, scfg).cpu().eval()
                structure = ctx.structure
                if not structure.get("quantize"):
                    structure["shapes"] = record_shapes(model)
                metrics = self._save_stage(sdir, name, model, float_model if structure.get("quantize") else model,
                                           structure, h, time.time() - t0, ctx, scfg)
            if not structure.get("quantize"):
                float_model = model
            rows.append(metrics)
            models[name] = (model, sdir, structure)
            prev_h = h
        return rows, models, ctx

    def run(self) -> dict:
        rows, models, ctx = self.run_stages()
        from compress.deploy import deploy_all
        return deploy_all(self, rows, models, ctx)
