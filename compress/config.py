"""The run configuration: one YAML file, pydantic models per section.

Stage configs live beside their code (compress/distill, prune/, quantize/); `stages` items
validate against the configs in the one table of stage kinds (compress/stages.py), as a
discriminated union on `kind`. Unknown keys are errors that name
the key path and the file: reading the file, `--set a.b=c` overrides and those messages are
compress/config_load.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)

from calib.datasets import FASHION_MNIST_DEFAULT_ROOT
from calib.synthetic import SynthesisConfig
from compress import stages as stage_table
from compress.distill.objectives import NEEDS_TEACHER
from compress.errors import UserError
from compress.models import check_model_spec
from compress.tasks import TaskConfig
from compress.train import TrainConfig
from targets import base as backends


class ConfigError(UserError):
    """A config that cannot be used; str() is the complete message for a person."""


class Strict(BaseModel):
    # a docstring under a field is its description (litgpt's TrainArgs): lines stay short
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class SyntheticConfig(Strict):
    """The seeded synthetic classification set (tests, smoke runs)."""
    num_classes: int = Field(10, ge=2, description="classes of the synthetic set")
    train_size: int = Field(2048, ge=16, description="training examples")
    test_size: int = Field(512, ge=16, description="test examples")
    image_size: int = Field(28, ge=8, description="square image side in pixels")
    channels: int = Field(1, ge=1, description="image channels")
    noise: float = Field(0.15, ge=0, description="pixel noise std (0..1 scale)")


DATASETS = ("fashion_mnist", "synthetic", "image_folder")  # built in; anything else is 'pkg.module:factory'


def _size(v):
    """int (square, or resize's shorter side) or [h, w]; positive."""
    sizes = [v] if isinstance(v, int) else list(v)
    if not 1 <= len(sizes) <= 2 or any(s < 1 for s in sizes):
        raise ValueError(f"{v!r}: expected a positive int or [height, width]")
    return v if isinstance(v, int) else (tuple(sizes) if len(sizes) == 2 else sizes[0])


Size = Annotated[Optional[Union[int, tuple[int, int]]], AfterValidator(lambda v: v if v is None else _size(v))]


class TransformConfig(Strict):
    """How image_folder files become pixels (decoded once with Pillow, cached; stated in every manifest)."""
    resize: Size = None
    """int: the shorter side to this many pixels, aspect kept (as torchvision's Resize(int)); [h, w]:
    exactly that size. Bilinear, antialiased (Pillow). Default: none (every image must have one size)"""
    center_crop: Size = None
    """after resize: the central crop of this size (int: square, or [h, w])"""
    channels: Optional[Literal[1, 3]] = None
    """1: grayscale (Pillow 'L'), 3: RGB (alpha dropped). Default: 1 when every image is grayscale, else 3"""
    mean: Optional[list[float]] = None
    """per-channel mean of the pixels scaled to [0, 1] (one value, or one per channel). Default:
    computed from the training images (after resize/crop), and logged"""
    std: Optional[list[float]] = None
    """per-channel std of the pixels scaled to [0, 1]; given together with mean"""

    @model_validator(mode="after")
    def _stats_together(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std: give both, or neither (then both are computed from the training images)")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std: {self.std}: every value must be > 0")
        return self


class SplitConfig(Strict):
    """How an image_folder of class folders only (no train/ and val/) is split into train and test."""
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class's images held out for testing")
    seed: int = Field(0, description="seed of the stratified split (its own: a new run seed keeps the split)")


class DataConfig(Strict):
    """Where the images come from and how they are batched."""
    dataset: str = Field("fashion_mnist")
    """fashion_mnist | synthetic | image_folder (class folders under root) | 'pkg.module:factory' returning a
    calib.datasets.Dataset (the README's "Your data"; the config's folder is on the import path)"""
    root: str = Field(FASHION_MNIST_DEFAULT_ROOT)
    """fashion_mnist: the folder of the four IDX .gz files; image_folder: train/ and val/ (or test/) of class
    folders, or class folders alone (split by `split`); a factory: passed as root= when set. Relative to the
    config file"""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """keyword arguments of a dataset factory (plain data); a key its signature does not take is an error"""
    transform: TransformConfig = Field(default_factory=TransformConfig, description="image_folder decoding")
    split: SplitConfig = Field(default_factory=SplitConfig, description="image_folder without train/ and val/")
    cache_dir: Optional[str] = Field(None)
    """image_folder decode cache (relative to the config file); default: <output.dir>/.cache"""
    batch_size: int = Field(128, ge=1, description="training batch size")
    eval_batch_size: int = Field(500, ge=1, description="batch size for accuracy passes")
    calib_samples: int = Field(1024, ge=1)
    """calibration subset size (stratified, seeded); set larger than the training split it is an error,
    left at its default it is capped at the training split's size"""
    calibration: Literal["real", "synthetic"] = Field("real")
    """real: a stratified subset of the training split; synthetic: data-free images fitted to BatchNorm statistics
    (ZeroQ; whose: synthesis.source), used to calibrate and distill the quantize stage"""
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    """used when calibration is synthetic"""
    limit_train: Optional[int] = Field(None, ge=1, description="use a stratified subset of this many training examples")
    limit_test: Optional[int] = Field(None, ge=1, description="use a stratified subset of this many test examples")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="used when dataset is synthetic")

    @field_validator("kwargs")
    @classmethod
    def _plain_kwargs(cls, v):
        from compress.model_spec import check_plain
        return check_plain(v, "kwargs")

    @model_validator(mode="after")
    def _fits_dataset(self):
        d, given = self.dataset, self.model_fields_set
        if d not in DATASETS and ":" not in d:
            hint = f" (a folder of images: dataset: image_folder, root: {d})" if "/" in d or "." in d else ""
            raise ValueError(f"dataset: {d!r}: expected {', '.join(DATASETS)} or 'pkg.module:factory'{hint}")
        if d == "image_folder" and "root" not in given:
            raise ValueError("root: required for dataset image_folder (the folder of train/ and val/, or of "
                             "class folders)")
        kind = "factory" if ":" in d else d
        for key, needs in (("transform", "image_folder"), ("split", "image_folder"), ("cache_dir", "image_folder"),
                           ("kwargs", "factory")):
            if key in given and getattr(self, key) not in (None, {}) and kind != needs:
                what = "a 'pkg.module:factory'" if needs == "factory" else needs
                raise ValueError(f"{key}: applies to dataset {what} only (dataset is {d})")
        return self

    @model_serializer(mode="wrap")
    def _no_unused(self, handler):
        # settings left at their defaults are left out of the dump: it is hashed (the run's
        # identity), and runs finished before these keys existed keep their hash
        out = handler(self)
        if isinstance(out, dict):
            for key in ("kwargs", "transform", "split", "cache_dir"):
                if key not in self.model_fields_set or not getattr(self, key):
                    out.pop(key, None)
        return out

    def identity(self, digest: Optional[str] = None) -> dict:
        """The fields that change which examples a run sees (hashed for resume), and the digest
        of the data as loaded (calib.checks.data_digest): changed data reruns the stages. Paths
        and evaluation batch sizes do not count, so moving the data folder keeps finished stages."""
        keep = {"dataset": self.dataset, "limit_train": self.limit_train,
                "limit_test": self.limit_test}
        if self.dataset == "synthetic":
            keep["synthetic"] = hashable(self.synthetic)
        if digest is not None:
            keep["digest"] = digest
        return keep


class TeacherTrainConfig(TrainConfig):
    """Training of the teacher when no checkpoint is given (CE only)."""
    model_config = ConfigDict(use_attribute_docstrings=True)
    optimizer: Literal["adamw", "sgd"] = Field("sgd", description="adamw or sgd (momentum, nesterov)")
    lr: float = Field(0.1, gt=0, description="peak learning rate")

    @model_validator(mode="after")
    def _labels_only(self):
        kinds = [t.kind for t in self.loss if t.kind in NEEDS_TEACHER]
        if kinds or self.features:
            raise ValueError(f"a teacher trains on labels only (loss kind ce); got {kinds or 'feature terms'}")
        return self


MODEL_HELP = "zoo name, 'torchvision:<name>', 'timm:<name>' (the vision extra) or 'pkg.module:factory'"


KWARGS_HELP = ("keyword arguments of the factory (plain data); num_classes / in_channels come from the data and "
               "are passed only where the factory's signature names them")


class ModelSpec(Strict):
    """What builds a model (teacher, student): a name, kwargs and a checkpoint (fields in each)."""

    @model_validator(mode="before")
    @classmethod
    def _weights_alias(cls, v):
        # `weights:` reads as the file's role to torchvision/timm users; one key holds it
        if isinstance(v, dict) and "weights" in v:
            if v.get("checkpoint") is not None:
                raise ValueError("weights: an alias of checkpoint; give one of them")
            v = {**v, "checkpoint": v["weights"]}
            del v["weights"]
        return v

    @field_validator("kwargs", check_fields=False)
    @classmethod
    def _plain_kwargs(cls, v):
        from compress.model_spec import check_kwargs
        return check_kwargs(v)

    @model_serializer(mode="wrap")
    def _no_empty_kwargs(self, handler):
        # empty kwargs are left out of the dump: it is hashed for resume, and runs finished
        # before kwargs existed must stay finished
        out = handler(self)
        if isinstance(out, dict) and not out.get("kwargs"):
            out.pop("kwargs", None)
        return out


class TeacherConfig(ModelSpec):
    """The trained model to compress: a checkpoint, or trained here first."""
    model: str = Field("resnet_teacher", description=MODEL_HELP)
    checkpoint: Optional[str] = Field(None)
    """state_dict (.safetensors, or .pt read with weights_only=True; alias: weights); relative to the config file. A
    file for the model as its factory builds it (e.g. 3 channels) is loaded before the stem is adapted to the data"""
    kwargs: dict[str, Any] = Field(default_factory=dict, description=KWARGS_HELP)
    train: Optional[TeacherTrainConfig] = Field(None)
    """train the teacher as the first stage when no checkpoint is given"""
    weight: float = Field(1.0, gt=0, description="weight of this teacher in an ensemble (teacher: [..])")

    _check_model = field_validator("model")(lambda cls, v: check_model_spec(v))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.checkpoint is None) == (self.train is None):
            raise ValueError("give exactly one of teacher.checkpoint (a trained teacher) "
                             "or teacher.train (train it here)")
        return self


class StudentConfig(ModelSpec):
    """The smaller architecture the teacher is distilled into."""
    model: str = Field("resnet8", description=MODEL_HELP)
    checkpoint: Optional[str] = Field(None, description="optional initial weights for the student (alias: weights)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description=KWARGS_HELP)

    _check_model = field_validator("model")(lambda cls, v: check_model_spec(v))


# the built-in kinds, for documentation (compress validate --explain); validation below reads
# the table as it is when a config is validated, so a kind registered later validates too
StageConfig = stage_table.config_union()
StageItem = Annotated[Any, WrapValidator(lambda v, _handler: stage_table.validate(v))]


OPSET_MIN, OPSET_MAX = 13, 20


class ExportConfig(Strict):
    """ONNX export of each stage's model (each target prepares its own format from it)."""
    # 20: the newest opset torch's TorchScript exporter writes (brevitas' QCDQ export needs
    # that exporter); ONNX Runtime 1.32 and OpenVINO 2026.4 read it and fuse the same int8
    # kernels as at 13 (measured on vit_torch_tiny: int8 14/14 on ORT at 13, 17-20). 13: the
    # first with per-channel DequantizeLinear, which int8 weights need.
    opset: int = Field(OPSET_MAX, description=f"ONNX opset of every export, float and int8 ({OPSET_MIN}-{OPSET_MAX})")
    stages: Optional[list[str]] = Field(
        None, description="stage names to export and deploy (default: teacher and every stage)")

    @field_validator("opset")
    @classmethod
    def _opset(cls, v: int) -> int:
        if not OPSET_MIN <= v <= OPSET_MAX:
            raise ValueError(f"opset {v} is not supported: expected {OPSET_MIN}-{OPSET_MAX} ({OPSET_MIN}: the first "
                             f"with per-channel int8 weights; {OPSET_MAX}: the newest torch's exporter writes and "
                             f"both ONNX Runtime and OpenVINO read)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, v):
        if isinstance(v, dict) and "openvino_ir" in v:
            raise ValueError("openvino_ir: moved: each target converts the ONNX to the format it compiles "
                             "when it is deployed (targets/<backend>.py); remove the key, and the target "
                             "from targets[] if its artifact is not wanted")
        return v


class ParityConfig(Strict):
    """How far a deployed artifact may stray from its torch model before it is `failed`."""
    # 0.98: a QAT model's int8 export agrees with its fake-quant torch model on >= 98% of
    # top-1 in practice (ORT matches brevitas exactly; OpenVINO skips the requantization of a conv feeding a
    # residual add it fused, judged against torch doing the same: compress/runtime_arith.py);
    # float exports agree on ~100%. Below that it is not the model that was validated.
    min_agreement: float = Field(0.98, ge=0, le=1, description=(
        "least top-1 agreement with the torch model (where OpenVINO fused residual adds without their "
        "quantizer, or `precision: speed` ships the whole graph in float, with torch computing the same: "
        "compress/runtime_arith.py)"))
    # half a point of accuracy is past run-to-run noise of a 10k test split
    max_acc_drop: float = Field(
        0.005, ge=0, le=1, description="largest accuracy loss against the torch model on the same data")
    max_abs_diff: Optional[float] = Field(
        None, gt=0, description="largest |delta logit| (off by default: logit scales differ by model)")
    # 0.02: correct int8 exports of the demo stay below 0.002 per layer on ORT and OpenVINO
    # (rounding ties only), float ones below 1e-5; one weight scaled x3 gives ~2.
    layer_tolerance: float = Field(0.02, gt=0, description=(
        "relative error ||runtime - torch|| / ||torch|| above which a layer is named as diverging"))
    diagnose_batch: int = Field(32, ge=1, description=(
        "inputs compared layer by layer when a deployment fails parity (0 work when it passes)"))
    tolerance: Optional[float] = Field(None, gt=0)
    """regression: an example agrees with torch when each output is within tolerance x the std of that output's
    labels (default 0.05). Defaults per task: segmentation max_acc_drop 0.01 (mIoU; agreement per pixel);
    regression max_acc_drop 0.05 (relative RMSE increase), tolerance 0.05"""

    @model_serializer(mode="wrap")
    def _no_unset_tolerance(self, handler):
        # left out of the dump while unset: run configs are hashed, and a new key must not change them
        out = handler(self)
        if isinstance(out, dict) and out.get("tolerance") is None:
            out.pop("tolerance", None)
        return out


class TargetConfig(Strict):
    """One backend the exported models are deployed and measured on."""
    backend: str = Field(description="runtime to deploy on: a backend of targets/base.py's table")
    threads: Optional[int] = Field(None, ge=1, description="intra-op threads (default: all cores)")
    device: str = Field("cpu", description="cpu, or cuda/gpu where the backend supports it")
    options: SerializeAsAny[BaseModel] = Field(None, description=(
        "the backend's own options (its Options model in targets/); their keys may also be written "
        "flat beside `backend`, as older configs do"))
    parity: ParityConfig = Field(default_factory=ParityConfig, description="the gate a deployment must pass")
    precision: Literal["as_exported", "speed"] = Field("as_exported", description=(
        "speed: an int8 export keeps float the layers this backend measures faster in float, timed the way "
        "this target runs batch 1 and the throughput batch; the whole graph in float only if it passes parity; "
        "the backend's exact rewrites applied (ONNX Runtime: SiLU as one QuickGelu)"))
    shapes: Literal["dynamic", "auto"] = Field("dynamic", description=(
        "auto: batch 1 and the throughput batch run a static-shape compile where it measures faster"))
    latency_threads: Literal["configured", "auto"] = Field("configured", description=(
        "auto: batch 1 runs on one thread where that measures faster than `threads` (small models: "
        "the intra-op pool costs more than it shares); accuracy and throughput runs keep `threads`"))
    host: Optional[str] = Field(None, description=(
        "ssh://[user@]host[:port]: measure on that device (compress bench; targets/remote.py)"))
    python: str = Field("python3", description="the device's Python with numpy + the runtime (with host)")
    identity_file: Optional[str] = Field(None, description="ssh private key for host (default: ssh's own)")
    known_hosts: Optional[str] = Field(None, description="known_hosts file pinning host's key (default: ssh's)")

    @field_validator("host")
    @classmethod
    def _host(cls, v):
        from targets.remote import parse_host
        if v is not None:
            parse_host(v)  # ValueError: one line naming what is expected
        return v

    @model_serializer(mode="wrap")
    def _local_only(self, handler):
        # a local target dumps (and hashes) as it did before remote devices existed
        out = handler(self)
        if isinstance(out, dict) and out.get("host") is None:
            for k in ("host", "python", "identity_file", "known_hosts"):
                out.pop(k, None)
        return out

    @model_validator(mode="after")
    def _remote_backend(self):
        from targets.remote import BACKENDS
        if self.host is not None and self.backend not in BACKENDS:
            raise ValueError(f"host: remote devices run backend {' | '.join(BACKENDS)}, not {self.backend}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _backend_options(cls, v):
        """Gather the backend's options (flat keys and `options:`) into its own model, so a
        key is checked by the backend that reads it."""
        if not isinstance(v, dict) or not isinstance(v.get("backend"), str):
            return v
        try:
            target = backends.get(v["backend"])
        except ValueError as e:
            raise ValueError(f"backend: {e}") from None
        v = dict(v)
        given = v.pop("options", None) or {}
        if isinstance(given, BaseModel):
            given = given.model_dump()
        flat = {k: v.pop(k) for k in list(v) if k not in cls.model_fields}
        misplaced(v["backend"], target, flat)
        v["options"] = target.Options.model_validate({**given, **flat})
        return v


def misplaced(backend: str, target, keys) -> None:
    """A flat key that is another backend's option: say whose it is (old configs could put
    any backend's option on any entry; it was ignored there)."""
    mine = set(target.Options.model_fields)
    for key in keys:
        if key in mine:
            continue
        owners = [n for n in backends.names() if key in backends.get(n).Options.model_fields]
        if owners:
            raise ValueError(f"{key}: an option of backend {' / '.join(owners)}, not of {backend} "
                             f"(its options: {', '.join(sorted(mine)) or 'none'})")


class ProfileConfig(Strict):
    """The timing harness shared by every backend."""
    warmup: int = Field(
        20, ge=0, description="least untimed runs before timing; warm-up goes on until the timings settle")
    max_warmup: int = Field(
        1000, ge=0, description="cap on warm-up runs when the timings never settle (recorded as settled: false)")
    # 0.05: half the 10% we hold our numbers to against the vendors' own tools
    settle_tolerance: float = Field(0.05, gt=0, description=(
        "warm-up ends when the coefficient of variation and the median of two consecutive windows "
        "of runs differ by less than this"))
    runs: int = Field(200, ge=100, description="timed batch-1 runs (>= 100 for a stable p99)")
    throughput_batch: int = Field(64, ge=1, description="batch size of the throughput measurement")
    throughput_runs: int = Field(30, ge=1, description="timed runs at the throughput batch")
    vendor_seconds: float = Field(1.0, ge=0, le=600, description=(
        "how long the vendor's own tool (OpenVINO's benchmark_app) times the same file beside ours, "
        "for the report's vendor column (0: not run)"))
    throughput_search: bool = Field(True, description=(
        "choose the throughput setting by measurement (OpenVINO streams/requests/request batch, ORT callers); "
        "false: one caller, back-to-back runs of the compiled model"))


class OutputConfig(Strict):
    """Where runs are written."""
    dir: str = Field("runs", description="runs land in <dir>/<name>/")
    checkpoint_every_steps: int = Field(0, ge=0, description="training checkpoints every N optimizer steps "
                                        "as well as at every epoch's end (0: epochs only); see README")


def _task_name(v):
    return {"kind": v} if isinstance(v, str) else v


class RunConfig(Strict):
    name: str = Field(description="run name: the folder under output.dir")
    # < 2**63: torch.manual_seed takes a 64-bit integer; a larger one fails mid-run
    seed: int = Field(0, ge=0, lt=2 ** 63, description="seed for init, shuffling, augmentation and sampling")
    task: Annotated[TaskConfig, BeforeValidator(_task_name)] = Field(default_factory=TaskConfig)
    """classification | regression | segmentation, or {kind, ignore_index}: decides the supervised loss, the teacher
    terms that apply, metrics, agreement on runtimes and the parity defaults (compress/tasks.py)"""
    metric: Optional[str] = Field(None)
    """'pkg.module:fn' scored beside the task's metrics: fn(outputs, labels) (numpy) -> float or {name: float}"""
    device: str = Field("auto", description="training device: auto | cpu | cuda | cuda:N")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: Annotated[list[TeacherConfig], BeforeValidator(lambda v: v if isinstance(v, list) else [v])] = Field(
        description="one teacher, or a list: an ensemble (stages' `ensemble` says how outputs combine)")
    student: StudentConfig = Field(default_factory=StudentConfig)
    stages: list[StageItem] = Field(default_factory=list)
    """ordered list of stages, each {kind: distill|prune|quantize, ...}"""
    export: ExportConfig = Field(default_factory=ExportConfig)
    targets: list[TargetConfig] = Field(
        default_factory=lambda: [TargetConfig(backend=n) for n in backends.builtin()],
        description="backends to deploy on (default: every built-in one)")
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    config_dir: str = Field(".", exclude=True, description="(set by the loader) folder of the YAML file")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v.startswith(".") or not v.isprintable():
            raise ValueError(f"{v!r}: must be a plain folder name (printable, no '/', not starting with '.')")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        # cuda without a GPU is found by compress/preflight.py (validate), not here: a config stays loadable
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"{v!r}: expected auto | cpu | cuda | cuda:N")
        return v

    @model_validator(mode="after")
    def _epochs_zero(self):
        """What epochs: 0 means per stage: quantize: post-training quantization only (no QAT); prune:
        pruned without recovery training; teacher.train and distill: an error (the loop would still
        take one step, and a stage that trains nothing has no use)."""
        where = [("teacher" if len(self.teacher) == 1 else f"teacher.{i}", t.train)
                 for i, t in enumerate(self.teacher)]
        where += [(f"stages.{i}", s) for i, s in enumerate(self.stages) if s.kind == "distill"]
        for loc, c in where:
            if c is not None and getattr(c, "epochs", None) == 0:
                path = f"{loc}.train.epochs" if loc.startswith("teacher") else f"{loc}.epochs"
                raise ValueError(f"{path}: 0 would still train one step; give epochs > 0 (0.1 is a tenth of an "
                                 f"epoch), or remove the stage (epochs 0 means PTQ only for quantize, no "
                                 f"recovery training for prune)")
        return self

    @property
    def teachers(self) -> list[TeacherConfig]:
        return self.teacher

    @field_validator("metric")
    @classmethod
    def _metric(cls, v):
        if v is not None and (":" not in v or not all(v.split(":", 1))):
            raise ValueError(f"{v!r}: expected 'pkg.module:fn'")
        return v

    @model_serializer(mode="wrap")
    def _no_default_task(self, handler):
        # classification and no user metric are left out of the dump: it is hashed for the report
        out = handler(self)
        if isinstance(out, dict):
            if out.get("task") == TaskConfig().model_dump():
                out.pop("task")
            if out.get("metric") is None:
                out.pop("metric", None)
        return out

    @model_validator(mode="after")
    def _task_rules(self):
        """Per-task defaults (loss, parity), and every loss term checked against the task."""
        from compress.tasks import apply_task
        apply_task(self)
        return self

    @model_validator(mode="after")
    def _teachers_given(self):
        # module names (features, pruning, bits) are checked by compress/preflight.py against
        # the models built for the data's real classes and channels, not here
        if not self.teachers:
            raise ValueError("teacher: the list is empty")
        return self

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.config_dir) / path


HASH_VERSION = 2  # bump when a release changes what a default does: finished stages then rerun


def hashable(v: Any) -> Any:
    """Plain data of a config for hashing: fields left at their default are left out (a `kind`
    always stays: it says which config a dict is), so a release that adds a field whose default
    keeps today's behaviour leaves finished stages finished."""
    if isinstance(v, BaseModel):
        return {name: hashable(getattr(v, name)) for name, f in type(v).model_fields.items()
                if name == "kind" or getattr(v, name) != f.get_default(call_default_factory=True)}
    if isinstance(v, (list, tuple)):
        return [hashable(x) for x in v]
    if isinstance(v, dict):
        return {k: hashable(x) for k, x in v.items()}
    return v


def config_hash(*parts: Any) -> str:
    """Stable hash of config pieces (pydantic models or plain data), see `hashable`; a default
    whose behaviour changes bumps HASH_VERSION."""
    blob = json.dumps([HASH_VERSION, *(hashable(p) for p in parts)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
