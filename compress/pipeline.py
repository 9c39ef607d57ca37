"""Runs the stages in order, owns the run directory, artifacts and resume.

Layout of runs/<name>/:  00-teacher/ 01-<stage>/ ...  each with model.safetensors,
structure.json, metrics.json (its config_hash marks it complete), and the exports;
report.json / report.md at the top. A stage is skipped on re-run when its metrics.json
holds the same chained config hash; a changed stage reruns with every stage after it.
Every stage is looked up in compress/stages.py and called the same way (compress/stage.py).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from calib.checks import data_digest
from calib.datasets import Dataset
from calib.sampling import calibration_split, stratified_indices
from compress import distributed, stages, train_state
from compress.checkpoint import read_sealed, read_state_dict, save_weights, write_json, write_sealed
from compress.config import RunConfig, config_hash, hashable
from compress.errors import UserError
from compress.measure import LatencyService, model_stats
from compress.models import build
from compress.stage import RunContext, StageResult
from compress.structure import Structure, StructureError, rebuild
from compress.tasks import TABLE as TASK_TABLE
from compress.tasks import from_config
from compress.train import TrainEnv, fit, predict

__all__ = ["Pipeline", "RunContext", "StageResult", "load_data", "rebuild", "model_stats"]


def load_data(cfg: RunConfig, log: Callable[[str], None] = lambda s: None) -> Dataset:
    """The configured data, checked (calib/checks.py: pixels, labels, classes, limits; every
    problem in one error), then subset by limit_train / limit_test."""
    from calib.load import load_checked
    d = cfg.data
    data = load_checked(d, cfg.seed, cfg.resolve_path, Path(cfg.config_dir), Path(cfg.output.dir) / ".cache", log,
                        cfg.task.kind)
    if d.limit_train:
        data.train = data.train.subset(stratified_indices(data.train.labels, d.limit_train, cfg.seed))
    if d.limit_test:
        data.test = data.test.subset(stratified_indices(data.test.labels, d.limit_test, cfg.seed))
    TASK_TABLE[cfg.task.kind](cfg.task).check_labels(data, f"data.dataset={d.dataset}")
    return data


def record_data(run_dir: Path, data: Dataset, digest: str) -> None:
    """runs/<name>/data.json: what the run trained and evaluated on, class order included."""
    write_json(run_dir / "data.json", {"name": data.name, "digest": digest, "classes": data.classes,
                                       "num_classes": data.num_classes, "train": len(data.train),
                                       "test": len(data.test), "input_shape": list(data.input_shape),
                                       "preprocessing": data.preprocessing()})


def teacher_classes(sdir: Path, source: Optional[str], classes: list[str], name: str) -> None:
    """A checkpoint teacher this run dir recorded with other class names or order: an error
    showing both lists (a teacher trained here retrains on changed data instead)."""
    from calib.checks import check_class_order
    m = sdir / "metrics.json"
    if source is None or not m.is_file():
        return
    rec = json.loads(m.read_text())
    if rec.get("checkpoint_digest") == source:
        line = check_class_order(rec.get("classes") or [], classes, f"{name} (recorded in {m})")
        if line:
            raise UserError(line)


def preflight(cfg: RunConfig, ctx: RunContext) -> None:
    """Everything that can fail before training (compress/preflight.py), on the run's data:
    the same checks `compress validate` runs. Checkpoints load (weights_only) into the
    models their sections name; each stage checks its config against the student."""
    from compress.preflight import preflight as check_all
    check_all(cfg, ctx=ctx, log=ctx.log)


def build_spec(c, structure: Structure, cfg: Optional[RunConfig] = None, role: str = "student"):
    """A teacher/student section's model fitted to the data (models.Built), with its checkpoint
    loaded when `cfg` is given."""
    state = read_state_dict(cfg.resolve_path(c.checkpoint)) if cfg is not None and c.checkpoint else None
    return build(c.model, structure.num_classes, structure.in_channels, c.kwargs, structure.input_shape,
                 state, f"{role}.checkpoint={c.checkpoint}")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def load_done(sdir: Path, h: str, name: str, log) -> Optional[tuple[nn.Module, Structure, dict]]:
    """A finished stage's (model, structure, metrics), or None when it must run: not
    finished, another config, or artifacts that are not the ones its metrics.json was
    written for (truncated, edited, replaced by a killed re-run): one line why."""
    m = sdir / "metrics.json"
    if not m.is_file():
        return None
    metrics, why = read_sealed(m)
    if metrics is not None and metrics.get("config_hash") != h:
        log(f"[{name}] rerunning: its settings, or an earlier stage's, differ from the saved run "
            f"(config hash {metrics.get('config_hash')} -> {h})")
        return None
    why = why or legacy_weights_problem(sdir, metrics)
    try:
        structure = None if why else Structure.read(sdir / "structure.json")
        model = None if why else rebuild(structure, sdir / "model.safetensors")
    except (StructureError, UserError, OSError, ValueError) as e:
        why = str(e).splitlines()[0]
    if why:
        log(f"[{name}] rerunning: {why}")
        return None
    log(f"[{name}] up to date, skipped")
    # the row as a fresh run returns it: the digests vouch for the files, they are not results
    return model, structure, {k: v for k, v in metrics.items() if k not in ("digest", "digests")}


def legacy_weights_problem(sdir: Path, metrics: dict) -> str:
    """For metrics.json written before digests: the weights must carry the same config hash
    in their safetensors metadata (a killed re-run leaves new weights beside old metrics)."""
    if "digest" in metrics:
        return ""
    from safetensors import safe_open
    try:
        with safe_open(str(sdir / "model.safetensors"), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        return f"model.safetensors is unreadable ({type(e).__name__})"
    if meta.get("config_hash") != metrics.get("config_hash"):
        return "model.safetensors was written by another run than its metrics.json"
    return ""


def calibration_identity(cfg: RunConfig):
    # real calibration keeps its earlier hash, so finished runs stay finished
    d = cfg.data
    return d.calib_samples if d.calibration == "real" else [d.calib_samples, d.synthesis]


class Pipeline:
    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.run_dir = Path(cfg.output.dir) / cfg.name
        # under torchrun: join the process group; rank 0 alone logs and writes
        self.device = distributed.init(pick_device(cfg.device))
        if not distributed.is_main():
            self.log = lambda s: None
        self.task = from_config(cfg)
        self.data_digest: Optional[str] = None  # of the data as loaded (calib.checks.data_digest), hashed for resume
        # stage name -> its torch logits on the test split, where this process scored it:
        # deployment's reference for agreement, instead of a second pass over the same model
        self.scored: dict[str, np.ndarray] = {}

    def _save(self, sdir: Path, name: str, res: StageResult, h: str, t0: float, ctx: RunContext, scfg) -> dict:
        """Rank 0 writes and scores the stage; every rank gets its metrics, after checking that
        all hold the same structure."""
        if distributed.active():
            digest = distributed.assert_same_structure(res.model, res.structure, name)
            self.log(f"[{name}] structure checksum {digest}, the same on all {distributed.world_size()} ranks")
        return distributed.on_main(lambda: self._write(sdir, name, res, h, t0, ctx, scfg))

    def _write(self, sdir: Path, name: str, res: StageResult, h: str, t0: float, ctx: RunContext, scfg) -> dict:
        # the class order travels with the weights: a later run using them as a teacher checks it
        save_weights(res.model, sdir / "model.safetensors", {"stage": name, "config_hash": h,
                                                             "classes": json.dumps(ctx.data.classes)})
        res.structure.write(sdir / "structure.json")
        t_score = time.time()
        logits = res.test_logits if res.test_logits is not None else \
            predict(res.model, ctx.data.test, ctx.data, self.cfg.data.eval_batch_size)
        # the test-split pass in torch, this one or the stage's that handed its logits on
        res.metrics["score_seconds"] = round(time.time() - t_score, 2) if res.test_logits is None \
            else res.metrics.get("ptq_score_seconds", 0.0)
        seconds = time.time() - t0
        self.scored[name] = logits
        scores = ctx.task.metrics(logits, ctx.data.test.labels)
        metrics = {"name": name, "config_hash": h, **scores,
                   **ctx.model_stats(res.model, res.float_model or res.model, ctx.data.input_shape),
                   "size_bytes": (sdir / "model.safetensors").stat().st_size,
                   "seconds": round(seconds, 2), "history": res.history, **res.metrics,
                   "config": scfg.model_dump(mode="json")}
        # written last, with the digests of the weights and structure: marks the stage complete
        write_sealed(sdir / "metrics.json", metrics, ["model.safetensors", "structure.json"])
        train_state.clear(sdir)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        self.log(f"[{name}] torch {shown}, params {metrics['params']:,}, MACs {metrics['macs']:,} "
                 f"({seconds:.0f}s, of which {res.metrics['score_seconds']:.0f}s scoring the test split)")
        return metrics

    def _teacher_id(self, i: int, tc) -> tuple[str, Path, Optional[str]]:
        """(stage name, stage dir, digest of its checkpoint file or None)."""
        name = "teacher" if i == 0 else f"teacher-{i + 1}"
        sdir = self.run_dir / ("00-teacher" if i == 0 else f"00-teacher-{i + 1}")
        return name, sdir, file_digest(self.cfg.resolve_path(tc.checkpoint)) if tc.checkpoint else None

    def _teacher(self, ctx: RunContext, i: int, tc) -> tuple[nn.Module, dict, str, str, Path, Structure]:
        name, sdir, source = self._teacher_id(i, tc)
        # the task only where it is not classification: finished classification runs stay finished
        task = [self.cfg.task] if self.cfg.task.kind != "classification" else []
        teacher = {k: v for k, v in hashable(tc).items() if k != "weight"}
        h = config_hash(teacher, self.cfg.data.identity(self.data_digest),
                        self.cfg.data.batch_size, self.cfg.seed + i, source, *task)
        done = load_done(sdir, h, name, self.log)
        if done:
            return done[0], done[2], h, name, sdir, done[1]
        t0 = time.time()
        built = build_spec(tc, ctx.structure, self.cfg, "teacher")
        structure = ctx.structure.model_copy(update={"model": tc.model, "kwargs": tc.kwargs,
                                                     "adapted": built.adapted})
        model = built.model
        history, extra = [], {"classes": ctx.data.classes}
        if tc.checkpoint:
            extra.update(checkpoint=tc.checkpoint, checkpoint_digest=source)
        else:
            self.log(f"[{name}] training {tc.model} for {tc.train.epochs} epochs")
            env = TrainEnv(ctx.batch_size, desc=name, seed=self.cfg.seed + i, device=self.device, log=self.log,
                           eval_split=ctx.data.test, task=ctx.task)
            with train_state.stage_checkpoints(sdir, h, name, self.log, self.cfg.output.checkpoint_every_steps):
                history = fit(model, ctx.data, tc.train, env)
        res = StageResult(model.cpu().eval(), structure, history, extra)
        return res.model, self._save(sdir, name, res, h, t0, ctx, tc), h, name, sdir, structure

    def _context(self, data: Dataset) -> RunContext:
        cfg = self.cfg
        base = Structure(model=cfg.student.model, kwargs=cfg.student.kwargs, num_classes=data.num_classes,
                         in_channels=data.input_shape[0], input_shape=list(data.input_shape))
        base = base.model_copy(update={"adapted": build_spec(cfg.student, base).adapted})
        return RunContext(data=data, calib=calibration_split(data.train, cfg.data.calib_samples, cfg.seed),
                          teacher=None, device=self.device, run_dir=self.run_dir, log=self.log,
                          seed=cfg.seed, batch_size=cfg.data.batch_size, structure=base,
                          latency=LatencyService(data.input_shape, cfg.export.opset), model_stats=model_stats,
                          task=self.task)

    def _teachers(self, ctx: RunContext, rows: list, models: dict) -> list[nn.Module]:
        members, hashes = [], []
        for i, tc in enumerate(self.cfg.teachers):  # every teacher's recorded classes, before any trains
            name, sdir, source = self._teacher_id(i, tc)
            teacher_classes(sdir, source, ctx.data.classes, name)
        for i, tc in enumerate(self.cfg.teachers):
            teacher, tmetrics, h, name, sdir, structure = self._teacher(ctx, i, tc)
            rows.append(tmetrics)
            models[name] = (teacher, sdir, structure)
            members.append(teacher)
            hashes.append(h)
        if len(members) == 1:
            ctx.teacher = members[0]
        else:
            from compress.distill.ensemble import Ensemble
            ctx.teacher = Ensemble(members, [t.weight for t in self.cfg.teachers])
        ctx.teacher_key = config_hash(hashes, [t.weight for t in self.cfg.teachers])
        ctx.data_key = config_hash(self.cfg.data.identity(self.data_digest))
        return members

    def _student(self, ctx: RunContext) -> tuple[nn.Module, str]:
        sc = self.cfg.student
        # seeded here: a teacher trained in this run consumes the global RNG and one reused
        # from disk does not, so a rerun stage would otherwise start from other weights than
        # the run whose later stages are kept
        torch.manual_seed(self.cfg.seed)
        model = build_spec(sc, ctx.structure, self.cfg).model
        digest = file_digest(self.cfg.resolve_path(sc.checkpoint)) if sc.checkpoint else None
        return model, config_hash(ctx.teacher_key, sc, digest)

    def _calib(self, ctx: RunContext, source: nn.Module, chain_h: str):
        """The calibration split a calibrating stage sees: the real subset, or data-free
        images cached under the run's cache/ by what made them (source identity, settings)."""
        d = self.cfg.data
        if d.calibration == "real":
            return ctx.calib
        from calib.synthetic import load_or_synthesize
        key = ctx.teacher_key if d.synthesis.source == "teacher" else chain_h
        self.log(f"  data.calibration: synthetic: fitting {d.calib_samples} images to the "
                 f"{d.synthesis.source}'s BatchNorm statistics")
        with distributed.main_first():  # rank 0 synthesizes and caches them; the others read the cache
            return load_or_synthesize(self.run_dir / "cache", [d.synthesis.source, key], copy.deepcopy(source),
                                      d.calib_samples, ctx.data.input_shape, ctx.data.normalize,
                                      d.synthesis, self.cfg.seed, self.log)

    def _stage(self, i: int, scfg, model: nn.Module, structure: Structure, ctx: RunContext,
               teacher0: nn.Module, prev_h: str, float_model: nn.Module):
        """One configured stage, run or resumed -> (model, structure, metrics, sdir, hash).
        `float_model`: the last float model, whose MACs stand for a quantized one."""
        name = scfg.kind if [s.kind for s in self.cfg.stages].count(scfg.kind) == 1 else f"{scfg.kind}-{i}"
        sdir = self.run_dir / f"{i:02d}-{scfg.kind}"
        stage = stages.get(scfg.kind)
        h = config_hash(prev_h, scfg, self.cfg.data.batch_size,
                        calibration_identity(self.cfg) if stage.calibrates else None)
        done = load_done(sdir, h, name, self.log)
        if done:
            return (*done, name, sdir, h)
        self.log(f"[{name}] running ({sdir.name})")
        calib = ctx.calib
        if stage.calibrates:  # an ensemble's BN statistics live in its members: the first one's
            source = teacher0 if self.cfg.data.synthesis.source == "teacher" else model
            calib = self._calib(ctx, source, prev_h)
        sctx = dataclasses.replace(ctx, structure=structure, calib=calib, where=f"stages.{i - 1}")
        t0 = time.time()
        # a copy: stages change modules in place, and every stage's model is kept for export
        with train_state.stage_checkpoints(sdir, h, name, self.log, self.cfg.output.checkpoint_every_steps):
            res = stage.run(copy.deepcopy(model), sctx, scfg)
        res.model = res.model.cpu().eval()
        if res.float_model is None and res.structure.quantize is not None:
            res.float_model = float_model  # a stage after quantize: the op counter cannot see brevitas layers
        return res.model, res.structure, self._save(sdir, name, res, h, t0, sctx, scfg), name, sdir, h

    def run_stages(self) -> tuple[list[dict], dict[str, tuple[nn.Module, Path, Structure]], RunContext]:
        """Train/prune/quantize as configured. Returns the stage rows and, per stage name,
        (model, stage dir, structure) for export."""
        torch.manual_seed(self.cfg.seed)
        with distributed.main_first():  # rank 0 fills the decode cache (output.dir/.cache) first
            data = load_data(self.cfg, self.log)
        self.data_digest = data_digest(data)
        ctx = self._context(data)
        preflight(self.cfg, ctx)
        if distributed.is_main():
            record_data(self.run_dir, data, self.data_digest)
        self.log(f"data: {data.name}, {len(data.train)} train / {len(data.test)} test, "
                 f"input {data.input_shape}, {data.num_classes} classes")
        rows, models = [], {}
        members = self._teachers(ctx, rows, models)
        model, prev_h = self._student(ctx)
        structure, float_model = ctx.structure, model
        for i, scfg in enumerate(self.cfg.stages, start=1):
            model, structure, metrics, name, sdir, prev_h = self._stage(
                i, scfg, model, structure, ctx, members[0], prev_h, float_model)
            if structure.quantize is None:
                float_model = model
            rows.append(metrics)
            models[name] = (model, sdir, structure)
        return rows, models, ctx

    def run(self) -> dict:
        """Every stage, then export, deployment and the report: those on rank 0 alone, while
        the other ranks wait for its report."""
        rows, models, ctx = self.run_stages()
        return distributed.on_main(lambda: self._deliver(rows, models, ctx))

    def _deliver(self, rows: list[dict], models: dict, ctx: RunContext) -> dict:
        from compress.bench_config import save_config  # `compress bench RUN_DIR` re-reads the run's config
        save_config(self.cfg, self.run_dir)
        from compress.deploy import deploy_all
        from compress.plan import deployment_plan
        from compress.report import write_report
        plan = deployment_plan(self.cfg, rows, models, ctx.data, self.run_dir, self.log, ctx.task, self.scored)
        from calib.datasets import IMPORTED  # the code its config named (issue 14 item 6), kept with the report
        report = {**write_report(plan.run, rows, deploy_all(plan), self.log, ctx.task),
                  "imported_modules": sorted(IMPORTED)}
        write_json(self.run_dir / "report.json", report)
        return report
