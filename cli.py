"""The `compress` command."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distill, prune, quantize, export and measure models for edge runtimes.")

SetOpt = typer.Option(None, "--set", help="override a config value: KEY.PATH=VALUE (repeatable)")


def _load(config: Path, overrides: Optional[List[str]]):
    from compress.config import ConfigError, load_config
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)


def _user_errors():
    from compress.errors import UserError
    return (UserError, FileNotFoundError)


@app.command()
def validate(config: Path = typer.Argument(..., help="run config YAML"),
             set_: Optional[List[str]] = SetOpt,
             explain: bool = typer.Option(False, "--explain", help="print every field with its description")):
    """Check a config; print the resolved config (or every error, with its key path)."""
    cfg = _load(config, set_)
    if explain:
        from compress.explain import explain_config
        typer.echo(explain_config(cfg))
        return
    import yaml
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def run(config: Path = typer.Argument(..., help="run config YAML"),
        set_: Optional[List[str]] = SetOpt):
    """Run the whole chain: teacher, stages, export, deploy on each backend, report."""
    cfg = _load(config, set_)
    from compress.pipeline import Pipeline
    try:
        report = Pipeline(cfg).run()
    except _user_errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if any(d["status"] == "failed" for d in report["deployments"]):
        typer.echo("error: at least one deployment failed (see the status/reason columns)", err=True)
        raise typer.Exit(1)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
