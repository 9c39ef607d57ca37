"""Baselines and history of `compress bench`, and the verdict of one bench against them.

baseline file (JSON): {"format": 1, "devices": {device key: one bench's device entry}};
`--update-baseline` replaces only the devices just measured. history file (JSON lines): one
line per bench and device, appended; the gate pools the last `window` lines of the device."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from compress.bench_gate import GATES, METRICS, Verdict, gate_case, pooled
from compress.checkpoint import atomic_write
from compress.errors import UserError

FORMAT = 1
# exit codes of `compress bench` (its --help names them)
OK, REGRESSION, UNMEASURED = 0, 1, 2


def _fsynced(text: str):
    def write(tmp: Path):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose an empty file after a crash
    return write


def read_baseline(path: Optional[Path]) -> dict:
    if path is None or not path.is_file():
        return {"format": FORMAT, "devices": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--baseline {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
        raise UserError(f"--baseline {path}: expected {{\"format\": {FORMAT}, \"devices\": {{...}}}}")
    return data


def update_baseline(path: Path, result: dict) -> list[str]:
    """Rewrite only the devices of this result; every other device's entry is kept as it was."""
    data = read_baseline(path)
    for dev, entry in result["devices"].items():
        data["devices"][dev] = {**entry, "created": result["created"], "run": result["run"]}
    atomic_write(path, _fsynced(json.dumps(data, indent=2) + "\n"))
    return list(result["devices"])


def read_history(path: Optional[Path], device: str, window: int) -> list[dict]:
    """The last `window` entries of this device, oldest first."""
    if path is None or not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in lines if e.get("device") == device][-window:]


def append_history(path: Path, result: dict) -> None:
    lines = [json.dumps({"device": dev, "created": result["created"], "run": result["run"], **entry})
             for dev, entry in result["devices"].items()]
    old = path.read_text() if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write(path, _fsynced(old + "".join(line + "\n" for line in lines)))


@dataclass
class Finding:
    device: str
    case: str
    stage: str
    backend: str
    verdicts: list[Verdict] = field(default_factory=list)
    status: str = "ok"  # ok | regressed | unmeasured | no-baseline | skipped
    measured: list[str] = field(default_factory=list)  # the metrics this case has
    reason: str = ""

    def messages(self) -> list[str]:
        where = f"{self.device}: {self.stage} on {self.backend}"
        if self.status == "unmeasured":
            return [f"{where}: could not measure: {self.reason}"]
        out = []
        for v in self.verdicts:
            if v.regressed and v.check == "parity":
                out.append(f"{where}: failed deploy's gate: {v.reason}")
            elif v.regressed:
                unit = METRICS[v.metric].unit
                base = "—" if v.baseline is None else f"{v.baseline:.4g}"
                out.append(f"{where}: {v.metric} regressed: baseline {base} -> {v.current:.4g} {unit} "
                           f"({v.interval}){'; ' + v.reason if v.reason else ''}")
        return out


def baseline_cases(device: str, baseline: dict, history: list[dict]) -> tuple[dict, str]:
    """case key -> {metric: {value, rounds}} to compare with, and where it came from."""
    if history:
        keys = {k for e in history for k in e.get("cases", {})}
        return ({k: pooled([e["cases"][k]["metrics"] for e in history if k in e.get("cases", {})]) for k in keys},
                f"history ({len(history)} entries)")
    entry = baseline.get("devices", {}).get(device)
    if entry:
        return {k: c.get("metrics", {}) for k, c in entry.get("cases", {}).items()}, "baseline"
    return {}, "none"


def judge(result: dict, baseline: dict, history: dict[str, list[dict]], floor: float,
          tolerances: Optional[dict] = None, gate: str = "relative") -> list[Finding]:
    """One Finding per (device, artifact, backend); history: device -> its window; gate: which
    timings are compared (bench_gate.GATES: relative to the teacher, absolute, both)."""
    out = []
    for dev, entry in result["devices"].items():
        base, _ = baseline_cases(dev, baseline, history.get(dev, []))
        for key, c in entry["cases"].items():
            f = Finding(dev, key, c["stage"], c["backend"], measured=list(c.get("metrics") or {}))
            if c["status"] == "skipped":
                # a backend this device lacks is expected; one it measured before is not
                f.status, f.reason = ("unmeasured", c["reason"]) if key in base else ("skipped", c["reason"])
            elif c["status"] != "ok" and not str(c.get("reason")).startswith(("parity", "int8")):
                f.status, f.reason = "unmeasured", c["reason"]
            else:
                f.verdicts = gate_case(c["metrics"], base.get(key), result.get("teacher_accuracy"), floor,
                                       tolerances or {}, GATES[gate])
                failed_gate = c["status"] != "ok"  # parity / int8 gates of deploy: the artifact is wrong
                if failed_gate:
                    f.verdicts.append(Verdict("agreement", (c["metrics"].get("agreement") or {}).get("value"),
                                              None, True, "deploy's parity gate", c["reason"], "parity"))
                f.status = "regressed" if any(v.regressed for v in f.verdicts) else (
                    "ok" if key in base else "no-baseline")
            out.append(f)
    return out


def exit_code(findings: list[Finding]) -> int:
    if any(f.status == "regressed" for f in findings):
        return REGRESSION
    if any(f.status == "unmeasured" for f in findings) or not any(f.status in ("ok", "no-baseline")
                                                                   for f in findings):
        return UNMEASURED
    return OK
