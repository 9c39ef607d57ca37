"""The one table of stage kinds: kind -> Stage (compress/stage.py). The pipeline looks every
stage up here, and the config's `stages` list validates against the configs registered
here, so a new kind is one module with its config and stage plus one `register` call."""
from __future__ import annotations

from typing import Annotated, Any, Union, get_args

from pydantic import Field, TypeAdapter

from compress.distill.stage import DistillStage
from compress.errors import UserError
from compress.prune.stage import PruneStage
from compress.quantize.stage import QuantizeStage
from compress.stage import Stage

STAGES: dict[str, Stage] = {}
_adapter: list = []  # the validator of the current table (rebuilt when the table changes)


def register(stage: Stage) -> Stage:
    """Add a stage under its config's `kind`; a kind registered twice raises."""
    kind = get_args(stage.config.model_fields["kind"].annotation)
    if len(kind) != 1 or not isinstance(kind[0], str):
        raise TypeError(f"{stage.config.__name__}.kind must be a Literal of one string")
    if kind[0] in STAGES:
        raise ValueError(f"stage kind {kind[0]!r} is already registered ({type(STAGES[kind[0]]).__name__})")
    STAGES[kind[0]] = stage
    _adapter.clear()
    return stage


def unregister(kind: str) -> None:
    """For tests that register a kind of their own."""
    STAGES.pop(kind)
    _adapter.clear()


def get(kind: str) -> Stage:
    if kind not in STAGES:
        raise UserError(f"no stage kind {kind!r} (registered: {', '.join(STAGES)})")
    return STAGES[kind]


def config_union() -> Any:
    """The discriminated union on `kind` of every registered stage config."""
    configs = tuple(s.config for s in STAGES.values())
    return Annotated[Union[configs], Field(discriminator="kind")]  # noqa: UP007 (a runtime tuple)


def validate(raw: Any) -> Any:
    """One `stages` item -> its stage config (errors carry the kind in their path, as
    pydantic's discriminated unions report them)."""
    if not _adapter:
        _adapter.append(TypeAdapter(config_union()))
    return _adapter[0].validate_python(raw)


for _stage in (DistillStage(), PruneStage(), QuantizeStage()):
    register(_stage)
