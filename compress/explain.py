"""`compress validate --explain`: every config field with its type, value and one-line
description, straight from the pydantic schema (the schema is the help)."""
from __future__ import annotations

from typing import get_args

from pydantic import BaseModel


def _one_line(text) -> str:
    """A field docstring wrapped over lines, as one line of help."""
    return " ".join((text or "").split())


def _rows(model: BaseModel, prefix: str, out: list[str]) -> None:
    for name, field in type(model).model_fields.items():
        if field.exclude:
            continue
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.append(f"{key}:  {type(value).__doc__.splitlines()[0] if type(value).__doc__ else ''}".rstrip())
            _rows(value, key + ".", out)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            out.append(f"{key}:  {_one_line(field.description)}")
            for i, item in enumerate(value):
                _rows(item, f"{key}.{i}.", out)
        else:
            out.append(f"{key} = {value!r}  # {_one_line(field.description)}".rstrip(" #"))


def _kinds(title: str, union, out: list[str]) -> None:
    out.append(f"\n{title}:")
    for cls in get_args(get_args(union)[0]):
        doc = " ".join((cls.__doc__ or "").split())
        out.append(f"  {cls.model_fields['kind'].default}: {doc}")
        for name, f in cls.model_fields.items():
            if name != "kind":
                default = f.default_factory() if f.default_factory else f.default
                out.append(f"    {name} = {default!r}  # {_one_line(f.description)}")


def _backends(out: list[str]) -> None:
    """Each registered backend's own options (keys of a targets[] entry)."""
    from targets import base
    out.append("\nbackends (targets.N.backend) and their options:")
    for name in base.names():
        options = base.get(name).Options
        out.append(f"  {name}: {' '.join((options.__doc__ or '').split())}")
        for key, f in options.model_fields.items():
            default = f.default_factory() if f.default_factory else f.default
            out.append(f"    {key} = {default!r}  # {f.description or ''}")


def explain_config(cfg: BaseModel) -> str:
    out: list[str] = []
    _rows(cfg, "", out)
    from compress.config import StageConfig
    from compress.distill.objectives import LogitTerm
    _kinds("stage kinds (stages.N.kind) and their fields", StageConfig, out)
    _kinds("loss term kinds (stages.N.loss.M.kind)", LogitTerm, out)
    _backends(out)
    return "\n".join(out)
