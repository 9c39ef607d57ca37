"""The `compress` command."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distill, prune, quantize, export and measure models for edge runtimes.")

SetOpt = typer.Option(None, "--set", help="override a config value: KEY.PATH=VALUE (repeatable)")


def _load(config: Path, overrides: Optional[List[str]]):
    from compress.config import ConfigError
    from compress.config_load import load_config
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)


def _interrupted(what: str):
    """Ctrl-C in a command that writes nothing: one line and 130 (128 + SIGINT), as shells expect."""
    typer.echo(f"interrupted: {what} stopped (nothing was written)", err=True)
    raise typer.Exit(130)


def _user_errors():
    from compress.errors import UserError
    return (UserError, FileNotFoundError)


@app.command()
def validate(config: Path = typer.Argument(..., help="run config YAML"),
             set_: Optional[List[str]] = SetOpt,
             explain: bool = typer.Option(False, "--explain", help="print every field with its description")):
    """Check a config and everything run checks before training (models built, one batch through
    them, module names, feature pairs); print the resolved config, or every error with its key path."""
    cfg = _load(config, set_)
    if explain:
        from compress.explain import explain_config
        typer.echo(explain_config(cfg))
        return
    import yaml

    from compress.preflight import preflight
    lines = []
    try:  # the checks `run` makes before training: validate passes only what run accepts
        preflight(cfg, log=lines.append)
    except _user_errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        _interrupted("validate")
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    typer.echo("".join(f"# {line}\n" for line in lines), nl=False)  # a YAML comment: the output stays loadable


@app.command()
def run(config: Path = typer.Argument(..., help="run config YAML"),
        set_: Optional[List[str]] = SetOpt,
        nproc: int = typer.Option(1, "--nproc", min=1, help=(
            "training processes on this machine: starts `torchrun --standalone --nproc_per_node N` "
            "(DDP; gloo on CPU, nccl on GPU); for several machines call torchrun yourself (README)"))):
    """Run the whole chain: teacher, stages, export, deploy on each backend, report."""
    from compress import distributed
    if nproc > 1 and not distributed.launched():
        raise typer.Exit(_torchrun(nproc, config, set_))
    cfg = _load(config, set_)
    from compress.pipeline import Pipeline
    try:
        report = Pipeline(cfg).run()
    except _user_errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    finally:
        distributed.shutdown()
    if any(d["status"] == "failed" for d in report["deployments"]):
        typer.echo("error: at least one deployment failed (see the status/reason columns)", err=True)
        raise typer.Exit(1)


def _torchrun(nproc: int, config: Path, set_: Optional[List[str]]) -> int:
    """`compress run` again under torch.distributed.run, one process per rank; its exit code."""
    import sys
    sets = [a for v in set_ or [] for a in ("--set", v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "compress", "run", str(config), *sets]
    from compress.distributed import launch
    return launch(cmd)  # passes SIGINT/SIGTERM on: the ranks stop after a step with a checkpoint


def _backends() -> list[str]:
    from targets import base
    return base.names()


def _options(pairs: Optional[List[str]], shorthand: dict) -> dict:
    """--option KEY=VALUE (VALUE read as YAML) and the shorthand flags that were given."""
    import yaml

    from compress.errors import UserError
    out = {k: v for k, v in shorthand.items() if v is not None}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {pair!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command("profile")
def profile_cmd(model: Path = typer.Argument(..., help="an .onnx file or one in the backend's own format (any file)"),
                backend: str = typer.Option(_backends()[0], help=f"a registered backend: {' | '.join(_backends())}"),
                batch: int = typer.Option(1, help="batch size of the latency runs"),
                threads: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)"),
                shape: Optional[str] = typer.Option(
                    None, help="input shape without batch, e.g. 1x28x28, when the file's is dynamic"),
                runs: int = typer.Option(200, help="timed runs (>= 100)"),
                warmup: int = typer.Option(20, help="least warm-up runs; goes on until timings settle"),
                throughput_batch: int = typer.Option(64, help="batch of the throughput runs"),
                throughput_runs: int = typer.Option(30, help="timed runs at the throughput batch"),
                option: Optional[List[str]] = typer.Option(
                    None, "--option", help="a backend option, KEY=VALUE (repeatable); the keys of targets[] entries"),
                hint: Optional[str] = typer.Option(None, help="shorthand for --option performance_hint=VALUE"),
                inter_op: Optional[int] = typer.Option(None, help="shorthand for --option inter_op_threads=VALUE"),
                graph_opt: Optional[str] = typer.Option(None, help="shorthand for --option graph_optimization=VALUE"),
                as_json: bool = typer.Option(False, "--json", help="print the result as JSON")):
    """Time a model file on one backend: p50/p90/p99, mean ± CI, throughput, memory, precision that ran."""
    from compress.profile_cli import profile_file
    try:
        options = _options(option, {"performance_hint": hint, "inter_op_threads": inter_op,
                                    "graph_optimization": graph_opt})
        res = profile_file(model, backend, batch=batch, threads=threads, shape=shape, runs=runs,
                           warmup=warmup, throughput_batch=throughput_batch, throughput_runs=throughput_runs,
                           options=options)
    except _user_errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        _interrupted("profile")
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    lat, thr = res["latency_ms"], res["throughput"]
    typer.echo(f"{model} on {backend} ({res['runtime'].get('provider')}, {res['runtime'].get('threads')} threads), "
               f"input {res['input_shape']}")
    wu = lat["warmup"]
    typer.echo(f"  latency b{lat['batch']} (Python call): p50 {lat['p50']:.3f} ms, p90 {lat['p90']:.3f} ms, "
               f"p99 {lat['p99']:.3f} ms, "
               f"mean {lat['mean']:.3f} ± {lat['ci95']:.3f} ms (95% CI, {lat['runs']} runs; warm-up "
               f"{wu['runs']} runs, {'settled' if wu['settled'] else 'NOT settled'})")
    typer.echo(f"  throughput b{thr['batch']}: {thr['items_per_s']:,.0f} items/s ({thr.get('mode')})")
    from compress.profile_cli import timer_lines
    typer.echo("\n".join(timer_lines(res)))
    sysinfo = res["system"]
    typer.echo(f"  process: CPUs {sysinfo['cpus_allowed']}, pinning {sysinfo['pinning']}, "
               f"peak RSS {sysinfo['peak_rss_mb']:.0f} MB")
    typer.echo(f"  executed: {res['executed_precision']['summary']}")


def _tolerances(pairs: Optional[List[str]]) -> dict:
    from compress.bench_gate import METRICS
    from compress.errors import UserError
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        if key not in METRICS:
            raise UserError(f"--tolerance {pair!r}: unknown metric {key!r} (metrics: {', '.join(METRICS)})")
        try:
            out[key] = float(value)
        except ValueError:
            raise UserError(f"--tolerance {pair!r}: expected METRIC=NUMBER") from None
    return out


@app.command("bench", epilog="Exit codes: 0 no regression; 1 regression (a metric worse beyond its tolerance "
                             "and outside the noise, accuracy under the floor, or a failed parity gate); "
                             "2 could not measure (or a bad argument).")
def bench_cmd(source: Path = typer.Argument(..., help="a finished run directory (RUN_DIR) or a run config (CONFIG)"),
              device: Optional[str] = typer.Option(
                  None, help="key results by this name instead of the device fingerprint"),
              baseline: Optional[Path] = typer.Option(None, help="baseline JSON to gate against (per device)"),
              history: Optional[Path] = typer.Option(
                  None, help="history JSON lines: gate against the last --window entries, then append"),
              window: int = typer.Option(5, min=1, help="history entries per device in the rolling baseline"),
              rounds: int = typer.Option(5, help="interleaved latency rounds (>= 4)"),
              update_baseline: bool = typer.Option(
                  False, "--update-baseline", help=(
                      "rewrite this device's entry of --baseline (others kept); reports the gate, exits 0 or 2")),
              floor: float = typer.Option(
                  0.99, help="least accuracy as a fraction of the teacher's (MLPerf: 0.99)"),
              gate: str = typer.Option(
                  "relative", help="timings gated: relative (each round / the teacher's on the same backend: "
                                   "cancels other tenants' load; shared runners), absolute (dedicated devices), both"),
              tolerance: Optional[List[str]] = typer.Option(
                  None, help="METRIC=VALUE: override a metric's tolerance (repeatable)"),
              json_out: Optional[Path] = typer.Option(
                  None, "--json", help="github-action-benchmark JSON (FILE: smaller-is-better, FILE.bigger: "
                                       "bigger-is-better)"),
              junit: Optional[Path] = typer.Option(None, help="JUnit XML: a case per artifact x backend x metric"),
              summary: Optional[Path] = typer.Option(None, help="markdown summary (for $GITHUB_STEP_SUMMARY)"),
              set_: Optional[List[str]] = SetOpt):
    """Measure every exported artifact of a run on every configured target (remote ones over SSH),
    in interleaved rounds, and gate against a per-device baseline or history."""
    from compress.bench import bench
    try:
        code = bench(source, device=device, baseline=baseline, history=history, window=window, rounds=rounds,
                     update_baseline=update_baseline, floor=floor, tolerances=_tolerances(tolerance),
                     json_out=json_out, junit=junit, summary=summary, overrides=set_, which=gate, log=typer.echo)
    except _user_errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(code)


@app.command("compare")
def compare_cmd(runs: List[Path] = typer.Argument(..., help="two or more run directories: the first is the reference"),
                json_out: Optional[Path] = typer.Option(None, "--json", help="also write the rows as JSON")):
    """One table of stages x backends: each later run against the first (primary metric, agreement,
    b1 p50, throughput, size, params) and whether each latency delta is outside the noise."""
    from compress.compare import compare
    try:
        rows, md = compare(runs)
    except _user_errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(md)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2) + "\n")


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="a finished run directory (holds report.json)")):
    """Regenerate report.md, the charts (pareto.png, sizes.png, training.png) and report.html from
    report.json and the stages' metrics.json; nothing is measured again."""
    from compress.report import regenerate
    try:
        written = regenerate(run_dir, log=typer.echo)
    except _user_errors() as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo("wrote " + ", ".join(map(str, written)))


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
