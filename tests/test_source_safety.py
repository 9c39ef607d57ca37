"""Issue 14 item 6: nothing in the package runs code hidden in data. The sources of compress/,
calib/, targets/ and cli.py are parsed (ast, so comments and strings never count) for pickle
imports, torch.load without weights_only=True, eval/exec, unsafe YAML loaders and shell=True."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("compress", "calib", "targets")
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
SAFE_LOADER_SUFFIX = ("SafeLoader", "BaseLoader")


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")) + [ROOT / "cli.py"]


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _call_problem(call: ast.Call) -> str | None:
    name = _dotted(call.func)
    if name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
        return f"{name}()"
    if name == "torch.load":
        wo = _kw(call, "weights_only")
        if not (isinstance(wo, ast.Constant) and wo.value is True):
            return "torch.load without weights_only=True"
    if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
        return name
    if name in ("yaml.load", "yaml.load_all"):
        loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
        # a loader of our own is a SafeLoader subclass named so (test_own_loaders_are_safe checks it)
        if loader is None or not _dotted(loader).split(".")[-1].endswith(SAFE_LOADER_SUFFIX):
            return f"{name} without SafeLoader (use yaml.safe_load)"
    shell = _kw(call, "shell")
    if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
        return "shell=True"
    return None


def problems(text: str, where: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(text)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            out.append(f"{line}: from {node.module} import")
        elif isinstance(node, ast.Call) and (p := _call_problem(node)):
            out.append(f"{line}: {p}")
    return out


def test_the_package_never_runs_code_hidden_in_data():
    found = [p for f in sources() for p in problems(f.read_text(), str(f.relative_to(ROOT)))]
    assert len(sources()) > 50  # the walk found the package
    assert found == []


@pytest.mark.parametrize("snippet", [
    "import pickle", "from dill import loads", "torch.load(p)", "torch.load(p, weights_only=False)",
    "eval(s)", "exec(s)", "yaml.load(s)", "yaml.load(s, Loader=yaml.Loader)", "yaml.unsafe_load(s)",
    "subprocess.run(c, shell=True)", "subprocess.run(c, shell=flag)",
])
def test_the_check_catches_each_pattern(snippet):
    assert problems(snippet, "x.py"), snippet


@pytest.mark.parametrize("snippet", [
    "torch.load(p, map_location='cpu', weights_only=True)", "model.eval()", "yaml.safe_load(s)",
    "yaml.load(s, Loader=yaml.SafeLoader)", "subprocess.run(c, shell=False)", "x = 'import pickle'",
])
def test_the_check_passes_safe_code(snippet):
    assert problems(snippet, "x.py") == []


def test_own_loaders_are_safe():
    import yaml

    from compress import config_load
    own = [getattr(config_load, n) for n in dir(config_load) if n.endswith("SafeLoader") and n != "SafeLoader"]
    assert own and all(issubclass(c, yaml.SafeLoader) for c in own)
