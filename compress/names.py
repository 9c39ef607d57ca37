"""Qualified module names given by users (feature pairs, pruning exclusions, per-layer bits):
one check against the real modules, one error shape naming the closest real names."""
from __future__ import annotations

import difflib
from typing import Iterable, Optional

from torch import nn

from compress.errors import UserError


def unknown_name(where: str, name: str, known: Iterable[str], what: str = "no module named",
                 fallback: Optional[str] = None) -> UserError:
    """`where: no module named 'x' (closest: a, b, c)`; `fallback` replaces the hint when
    nothing is close (for example the whole list when it is short)."""
    known = sorted(k for k in known if k)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" (closest: {', '.join(close)})" if close else (f" ({fallback})" if fallback else "")
    return UserError(f"{where}: {what} {name!r}{hint}")


def resolve(model: nn.Module, names: list[str], where: str) -> list[nn.Module]:
    """Qualified names -> modules, failing on the first unknown name."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not n]
    if missing:
        raise unknown_name(where, missing[0], modules)
    return [modules[n] for n in names]
