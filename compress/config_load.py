"""Reading a run configuration: the YAML file (a loader that refuses duplicate keys and tags),
`--set a.b=c` overrides, and pydantic's errors rewritten as key paths the user wrote, so one
message names every bad key and the file. The models themselves are in compress/config.py.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from calib.datasets import add_import_path
from compress.config import ConfigError, RunConfig


def _yaml_value(path: str, value: str):
    try:
        return yaml.safe_load(value)  # safe_load: tags that import or call code are refused
    except yaml.YAMLError as e:
        why = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"--set {path}={value}: the value is not valid YAML ({why}); "
                          f"quote it to pass a string: --set '{path}=\"...\"'") from None


def non_finite(raw: Any, loc: str = "") -> Optional[str]:
    """The key path of the first .inf/.nan in the raw config (no field takes one: epochs: .inf
    would train forever), or None."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return loc or "(top level)"
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    for k, v in items:
        found = non_finite(v, f"{loc}.{k}" if loc else str(k))
        if found:
            return found
    return None


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.0.c=value` override (value parsed as YAML) to the raw config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node: Any = raw
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[:i + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"--set {path}: {where}: list index out of range "
                                  f"(the list has {len(node)} items)")
            k = int(k)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {'.'.join(keys[:i])} is not a section")
        if last:
            node[k] = _yaml_value(path, value)
        else:
            if isinstance(node, dict) and node.get(k) is None:
                node[k] = {}
            node = node[k]


def user_path(loc: tuple, raw: Any) -> list:
    """pydantic's error location as the user wrote the config, so it pastes back into --set:
    union tags (`stages.0.distill.epochs`), the list a single teacher became (`teacher.0`) and
    the `options` a target's flat keys were gathered into are dropped where raw has no such key."""
    parts, node = [], raw
    for i, p in enumerate(loc):
        if isinstance(node, list) and isinstance(p, int) and p < len(node):
            parts.append(p)
            node = node[p]
        elif isinstance(node, dict) and p in node:
            parts.append(p)
            node = node[p]
        elif isinstance(node, dict) and (i < len(loc) - 1 or p == node.get("kind")):
            continue  # a level pydantic added: not a key of the user's
        else:
            parts.append(p)
            node = None
    return parts


# keys a user may carry over from one stage kind to another, with where they live
STAGE_KEY_HINTS = {"teacher": " (a stage's own teacher is a quantize-stage key, `teacher: self` for self-distilled "
                              "QAT; prune has `recovery_teacher: unpruned`; the run's teacher is top-level `teacher:`)"}


def format_errors(err: ValidationError, source: str, raw: Any = None) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} error"
             f"{'s' if err.error_count() != 1 else ''})"]
    for e in err.errors():
        parts = user_path(e["loc"], raw) if raw is not None else list(e["loc"])
        loc = ".".join(str(p) for p in parts) or "(top level)"
        if not parts and e["type"] == "value_error":  # a whole-config rule: its message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        if e["type"] == "extra_forbidden":
            in_stage = len(parts) > 2 and parts[0] == "stages"
            msg = "unknown key" + (STAGE_KEY_HINTS.get(str(parts[-1]), "") if in_stage else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            key = re.match(r"([A-Za-z_]\w*): ", msg)
            if key and parts and e["type"] == "value_error":  # a section's rule naming its key: one path
                loc, msg = f"{loc}.{key.group(1)}", msg[key.end():]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        # a SafeLoader: no tags that import or call code
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeySafeLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): expected a YAML file") from None
    except yaml.YAMLError as e:
        why = " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML ({why})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, found "
                          f"{'an empty file' if raw is None else type(raw).__name__}")
    for o in overrides:  # from_dict refuses a config_dir the file or an override sets
        apply_override(raw, o)
    add_import_path(path.parent)  # a 'pkg.module:factory' module beside the config imports
    return from_dict(raw, str(path), path.parent.resolve())


def from_dict(raw: Any, source: str = "<config>", config_dir: str | Path = ".") -> RunConfig:
    """A RunConfig from the loaded YAML, or a ConfigError naming source and every bad key path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, found "
                          f"{'an empty file' if raw is None else type(raw).__name__}")
    if "config_dir" in raw:
        raise ConfigError(f"{source}: config_dir: unknown key")
    bad = non_finite(raw)
    if bad:
        raise ConfigError(f"{source}: {bad}: expected a finite number, not .inf/.nan")
    raw = {**raw, "config_dir": str(config_dir)}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, raw)) from None
