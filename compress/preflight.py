"""Preflight: everything that can fail before training, run by `compress validate` and by
`compress run` before its first stage (one function, so validate passes only what run
accepts). It builds every model for the data's real classes and input shape, loads the
checkpoints (weights_only), runs one batch of 2 zero images through each model, checks the
logits, resolves every module name the stages use (their `check`), and runs the feature
pairs once through their adapters. Each problem is one line naming its field (and both
sides of a mismatch); all lines are reported together.

Cost: a few models built and one batch-2 forward each, and a trial prune of a copy of the
student where a stage prunes channels (well under a second for the demo);
data is loaded (and checked: calib/checks.py) only for an image folder or a factory dataset
(Fashion-MNIST's sizes come from its IDX headers, synthetic's from the config).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from compress.errors import UserError

if TYPE_CHECKING:
    from compress.config import RunConfig
    from compress.stage import RunContext

BATCH = 2  # the smallest batch that still exercises BatchNorm's batch statistics paths


@dataclass(frozen=True)
class DataInfo:
    """What preflight needs to know about the data: no images."""
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...] = ()
    sizes: tuple[int, int] = (0, 0)  # train, test


@dataclass
class Built:
    """One configured model, as preflight built it."""
    role: str  # the config path of its section: teacher, teacher.1, student
    spec: str
    model: Optional[nn.Module] = None
    ok: bool = False  # built, its checkpoint loaded, and its dry forward gave the right logits
    export_problem: Optional[str] = None  # what the ONNX exporter will reject (compress/exportable.py)


def data_info(cfg: "RunConfig", log: Callable[[str], None] = lambda s: None):
    """The data's classes, input shape and sizes: read from the config for synthetic and from the
    IDX headers for fashion_mnist (after checking its files are there); an image folder or a
    factory dataset is loaded (from the decode cache where there is one) and checked as the run
    checks it (calib/load.py)."""
    from calib import datasets as ds
    from calib.checks import check_limits
    from calib.load import limits, load_checked
    d = cfg.data
    if d.dataset in ("fashion_mnist", "synthetic"):
        if d.dataset == "fashion_mnist":
            root = ds.check_fashion_mnist_root(cfg.resolve_path(d.root))
            labels = [root / ds.FASHION_MNIST_FILES[f"{p}_labels"] for p in ("train", "test")]
            for f in labels:  # labels only (70 kB): a label >= 10 would fail mid-training
                ds.check_labels(ds.read_idx(f), 10, f)
            sizes = tuple(ds.idx_length(f) for f in labels)
            info = DataInfo("fashion_mnist", 10, (1, 28, 28), tuple(ds.FASHION_MNIST_CLASSES), sizes)
        else:
            s = d.synthetic
            info = DataInfo("synthetic", s.num_classes, (s.channels, s.image_size, s.image_size),
                            tuple(f"class{i}" for i in range(s.num_classes)), (s.train_size, s.test_size))
        errors = check_limits({"train": info.sizes[0], "test": info.sizes[1]}, limits(d))
        if errors:
            raise UserError("\n".join(errors))
        return info
    return load_checked(d, cfg.seed, cfg.resolve_path, Path(cfg.config_dir), Path(cfg.output.dir) / ".cache", log,
                        cfg.task.kind)


def stage_names(cfg: "RunConfig") -> list[str]:
    """The names a run gives its teachers and stages (as compress/pipeline.py does)."""
    teachers = ["teacher" if i == 0 else f"teacher-{i + 1}" for i in range(len(cfg.teachers))]
    kinds = [s.kind for s in cfg.stages]
    return teachers + [k if kinds.count(k) == 1 else f"{k}-{i}" for i, k in enumerate(kinds, start=1)]


def check_device(spec: str) -> list[str]:
    """device: cuda asked for where torch sees no GPU (found at validate, not after the teacher)."""
    if not spec.startswith("cuda"):
        return []
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(spec[5:]) if spec.startswith("cuda:") else 0
    if index < n:
        return []
    have = f"{n} GPU{'s' if n != 1 else ''}" if n else "no GPU (or a CPU-only torch build)"
    return [f"device: {spec}: torch sees {have} here; use device: auto or cpu"]


MIN_FREE = 64 << 20  # bytes: below this a run fails writing its first stage's weights and exports


def check_output_dir(cfg: "RunConfig") -> list[str]:
    """output.dir must be a folder this process can write, with room: found before training, not
    after it. Creates nothing: probes the nearest folder that exists with a temp file."""
    import os
    import shutil
    import tempfile
    target = Path(cfg.output.dir).expanduser() / cfg.name
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    where = f"output.dir={cfg.output.dir}"
    if not probe.is_dir():
        return [f"{where}: {probe} is not a folder; expected a folder (or a path that can be created)"]
    try:
        with tempfile.TemporaryFile(dir=probe) as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return [f"{where}: cannot write in {probe} ({e.strerror}); expected a writable folder"]
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE:
        return [f"{where}: {free >> 20} MB free on {probe}'s disk; a run needs at least {MIN_FREE >> 20} MB"]
    return []


def check_plan(cfg: "RunConfig") -> list[str]:
    """Stage order and export names: config-only rules that run would reject later."""
    errors, quantized = [], None
    for i, s in enumerate(cfg.stages):
        if quantized is not None and s.kind in ("prune", "quantize"):
            what = "a second quantize stage" if s.kind == "quantize" else "prune"
            errors.append(f"stages.{i}: {what} after the quantize stage stages.{quantized}: the model is "
                          f"quantized from there on; prune before quantizing, and quantize once")
        if s.kind == "quantize" and quantized is None:
            quantized = i
    names = stage_names(cfg)
    unknown = [s for s in cfg.export.stages or [] if s not in names]
    if unknown:
        errors.append(f"export.stages: {unknown} are not stages of this run (its stages: {', '.join(names)})")
    return errors


def _dry_forward(b: Built, x: torch.Tensor, data, task=None) -> Optional[str]:
    """None, or the one line saying why this model cannot take the data's batches (its output
    shape is the task's: [B, C], [B, K] or [B, C, H, W])."""
    from compress.tasks import get_task
    task = get_task(task)
    want = task.output_shape(BATCH, data)
    where = f"{b.role}.model={b.spec}"
    from compress.exportable import recorded_pools
    try:
        with torch.no_grad(), recorded_pools(b.model) as pools:
            out = b.model.eval()(x)
    except Exception as e:  # a user's model can raise anything: one line, not a traceback
        from compress.classifier import first_conv
        first = first_conv(b.model)
        if first and first[1].in_channels != x.shape[1]:
            return (f"{where}: its first conv {first[0]} takes {first[1].in_channels} input channels, "
                    f"the data has {x.shape[1]} (the factory must build its stem from in_channels)")
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return f"{where}: a batch of shape {tuple(x.shape)} fails in forward ({type(e).__name__}: {msg})"
    if not isinstance(out, torch.Tensor):
        return f"{where}: returns {type(out).__name__}, expected a logits tensor of shape {want}"
    if tuple(out.shape) != want:
        what = "logits" if task.name == "classification" else f"{task.name} outputs"
        return (f"{where}: {what} of shape {tuple(out.shape)} for a batch of {BATCH}, expected "
                f"{want} {task.output_text(data)}")
    b.export_problem = f"{where}: {pools[0]}" if pools else None
    return None


def build_all(cfg: "RunConfig", data, errors: list[str], task=None) -> list[Built]:
    """Teachers then student: built, checkpoint loaded, one batch through each; a teacher
    checkpoint written by a run carries its class list, checked against the data's."""
    from calib.checks import check_class_order, checkpoint_classes
    from compress.checkpoint import read_state_dict
    from compress.models import build
    sections = [("teacher" if len(cfg.teachers) == 1 else f"teacher.{i}", t) for i, t in enumerate(cfg.teachers)]
    x = torch.zeros(BATCH, *data.input_shape)
    out = []
    for role, c in sections + [("student", cfg.student)]:
        b = Built(role, c.model)
        out.append(b)
        state = None
        if c.checkpoint and role.startswith("teacher"):
            line = check_class_order(checkpoint_classes(cfg.resolve_path(c.checkpoint)), list(data.classes),
                                     f"{role}.checkpoint={c.checkpoint}")
            if line:
                errors.append(line)
        if c.checkpoint:
            try:  # read_state_dict names the file
                state = read_state_dict(cfg.resolve_path(c.checkpoint))
            except UserError as e:
                errors.append(f"{role}.checkpoint: {e}")
                continue
        try:  # as the run builds it: kwargs, stem/head adapted to the data, checkpoint loaded
            b.model = build(c.model, data.num_classes, data.input_shape[0], c.kwargs, list(data.input_shape),
                            state, f"{role}.checkpoint={c.checkpoint}").model
        except Exception as e:  # e.g. a factory that takes other arguments: name the field
            msg = str(e)
            errors.append((msg if msg.startswith(role) else f"{role}.model: {msg}") if isinstance(e, UserError) else
                          f"{role}.model={c.model}: cannot build it ({type(e).__name__}: {e})")
            continue
        line = _dry_forward(b, x, data, task)
        b.ok = line is None
        if line:
            errors.append(line)
        elif b.export_problem and exported(cfg, role):
            errors.append(b.export_problem)
    return out


def exported(cfg: "RunConfig", role: str) -> bool:
    """Whether the run exports this model: a teacher as its own stage, the student as any other."""
    wanted = cfg.export.stages
    if wanted is None:
        return True
    names = stage_names(cfg)
    if role == "student":
        return any(n in wanted for n in names[len(cfg.teachers):])
    i = 0 if role == "teacher" else int(role.split(".")[1])
    return names[i] in wanted


def check_features(cfg: "RunConfig", teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> list[str]:
    """Every stage's feature pairs: names resolved, shapes matched, one batch through the
    adapters and the loss (what the training loop does on its first step)."""
    from compress.distill.features import FeatureDistiller
    errors = []
    for i, s in enumerate(cfg.stages):
        terms = getattr(s, "features", [])  # a stage kind may train nothing
        if not terms:
            continue
        # a prune stage may distill from the unpruned student itself (CoFi), a quantize stage from its float self
        own = "self" in (s.teacher_weights() if hasattr(s, "teacher_weights") else {})
        t = student if own or getattr(s, "recovery_teacher", "configured") == "unpruned" else teacher
        try:
            fd = FeatureDistiller(terms, student, t, x, where=f"stages.{i}.features")
        except UserError as e:
            errors.append(str(e))
            continue
        try:
            with torch.no_grad():
                t(x)
                student(x)
                fd.losses()
        except Exception as e:
            errors.append(f"stages.{i}.features: the adapters fail on one batch ({type(e).__name__}: {e})")
        finally:
            fd.close()
    return errors


def context(cfg: "RunConfig", data) -> "RunContext":
    """The RunContext a stage's `check` sees at validate (no loaders, no teacher)."""
    from compress.measure import LatencyService, model_stats
    from compress.stage import RunContext
    from compress.structure import Structure
    from compress.tasks import from_config
    structure = Structure(model=cfg.student.model, num_classes=data.num_classes,
                          in_channels=data.input_shape[0], input_shape=list(data.input_shape))
    return RunContext(data=data, calib=None, teacher=None, device=torch.device("cpu"),
                      run_dir=Path(cfg.output.dir) / cfg.name, log=lambda s: None, seed=cfg.seed,
                      batch_size=cfg.data.batch_size, structure=structure,
                      latency=LatencyService(data.input_shape, cfg.export.opset), model_stats=model_stats,
                      task=from_config(cfg))


def preflight(cfg: "RunConfig", data=None, ctx: Optional["RunContext"] = None,
              log: Optional[Callable[[str], None]] = None) -> float:
    """Raise one UserError listing every problem (one line each), or return the seconds it
    took. data: a Dataset or DataInfo (default: data_info(cfg)); ctx: the run's context."""
    from compress import stages
    t0 = time.perf_counter()
    data = data if data is not None else (ctx.data if ctx is not None else data_info(cfg, log or (lambda s: None)))
    ctx = ctx if ctx is not None else context(cfg, data)
    errors = check_plan(cfg) + check_device(cfg.device) + check_output_dir(cfg)
    from compress.tasks import get_task
    task = get_task(ctx.task)
    if task.name != "classification" and hasattr(data, "train"):  # a loaded Dataset: its labels
        try:
            task.check_labels(data, f"data.dataset={cfg.data.dataset}")
        except UserError as e:
            errors.append(str(e))
    built = build_all(cfg, data, errors, task)
    student, teacher = built[-1], built[0]
    if student.ok:
        for i, scfg in enumerate(cfg.stages):
            try:
                stages.get(scfg.kind).check(student.model, dataclasses.replace(ctx, where=f"stages.{i}"), scfg)
            except UserError as e:
                errors.append(str(e))
        if teacher.ok:
            errors += check_features(cfg, teacher.model, student.model, torch.zeros(BATCH, *data.input_shape))
    if errors:
        raise UserError("\n".join(errors))
    seconds = time.perf_counter() - t0
    if log:
        log(f"preflight: {', '.join(f'{b.role} {b.spec}' for b in built)}: a batch of "
            f"{(BATCH, *data.input_shape)} -> {'logits' if task.name == 'classification' else 'outputs'} "
            f"{task.output_shape(BATCH, data)}; "
            f"names and feature pairs checked ({seconds:.2f}s)")
    return seconds
