"""The config a run was made with, kept in its directory (`config.json`, written by
compress.pipeline and by `compress bench`), so `compress bench RUN_DIR` measures the run as it
was configured. Its own module: the pipeline writes it without importing the bench."""
from __future__ import annotations

import json
from pathlib import Path

from compress.errors import UserError

CONFIG_FILE = "config.json"  # the resolved config, beside report.json in a run directory


def load_source(source: Path, overrides: list[str]):
    """RUN_DIR or CONFIG -> RunConfig."""
    from compress.config import RunConfig
    from compress.config_load import load_config
    if source.is_dir():
        path = source / CONFIG_FILE
        if not path.is_file():
            raise UserError(f"{path}: not found: a run directory made before `compress bench` existed "
                            f"has no copy of its config; pass the config file instead")
        if overrides:
            raise UserError("--set: only with a CONFIG, not a RUN_DIR (its config is the run's)")
        cfg = RunConfig.model_validate(json.loads(path.read_text()))
        # the folder given is the run, wherever it was moved or copied to
        return cfg.model_copy(update={"name": source.resolve().name, "output": cfg.output.model_copy(
            update={"dir": str(source.resolve().parent)})})
    return load_config(source, overrides)


def save_config(cfg, run_dir: Path) -> None:
    from compress.checkpoint import write_json
    write_json(run_dir / CONFIG_FILE, {**cfg.model_dump(mode="json"), "config_dir": cfg.config_dir})
