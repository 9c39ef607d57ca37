"""Forward-hook capture of module outputs by qualified name: the one place hooks are
registered and removed (timm's FeatureHooks is the model).

    with OutputCapture(model, ["layers.0", "layers.2"]) as cap:
        model(x)
    cap.outputs["layers.0"]

`fn(name, module, inputs, output)` replaces the default "keep the last output" behaviour
for callers that reduce as they go (statistics, first-seen flags, records in run order)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from torch import nn

from compress.names import resolve


def tensor_value(t: Any) -> Any:
    """A brevitas QuantTensor's float value, or the tensor itself."""
    return t.value if hasattr(t, "value") else t


class OutputCapture:
    """Hooks on the named modules (or on (name, module) pairs); removed by close() or at the
    end of a `with` block, also when the forward raised."""

    def __init__(self, model: Optional[nn.Module], names: Iterable[str] | None = None,
                 fn: Optional[Callable[[str, nn.Module, tuple, Any], None]] = None,
                 modules: Iterable[tuple[str, nn.Module]] | None = None, where: str = "features",
                 detach: bool = False):
        pairs = list(modules) if modules is not None else list(zip(names, resolve(model, list(names), where)))
        self.outputs: dict[str, Any] = {}
        self._detach = detach
        self._handles = [m.register_forward_hook(self._hook(n, fn)) for n, m in pairs]

    def _hook(self, name: str, fn):
        if fn is not None:
            return lambda m, inp, out: fn(name, m, inp, out)

        def keep(_m, _inp, out):
            out = tensor_value(out)
            self.outputs[name] = out.detach() if self._detach and hasattr(out, "detach") else out
        return keep

    def clear(self) -> None:
        self.outputs.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs.clear()

    def __enter__(self) -> "OutputCapture":
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
