"""What a checkpoint of quantization-aware training carries besides state_dict, and how it is
loaded back into the brevitas model the resumed stage rebuilt and calibrated (brevitas 0.13).

1. State outside state_dict. brevitas' runtime-statistics quantizers (activation scales:
   ParameterFromRuntimeStatsScaling; zero points: ParameterFromRuntimeZeroPoint) keep Python
   attributes: `counter` (training batches their statistics have seen), `collect_stats_steps`,
   `momentum`, and `init_done` / `quant_delay_steps` in other quantizers. Calibration
   (calibration_mode) sets collect_stats_steps to sys.maxsize - 1, momentum to None and, on exit,
   moves every statistic into its Parameter (counter past collect_stats_steps): from then on QAT
   trains the scales as Parameters and no counter moves (tests/compress/test_qat_resume.py
   checks it). They are saved and restored all the same, so that a quantizer calibration did
   not finalize comes back as it was rather than as load_state_dict's guess (counter =
   collect_stats_steps + 1).
2. Loading. load_state_dict re-creates every quantizer's tensor_quant from its injector
   (brevitas.config.REINIT_ON_STATE_DICT_LOAD, on by default): the new modules lose the sharing
   graph quantization set up (the inputs of a residual add share one scaling_impl; brevitas
   issue #722), and the optimizer keeps stepping the old scale Parameters, no longer in the
   model. Measured: the first evaluation after such a restore failed ("Scaling factors are
   different"). With it off, the values are copied into the existing modules, as brevitas' own
   in-place loaders do (brevitas/nn/utils.py).
3. The calibrated structure must be the one saved: weight bits chosen by a measured search
   (mixed precision) are not in state_dict, so a checkpoint records each quant layer's type and
   weight bits and fits only a model that has the same.
"""
from __future__ import annotations

import contextlib

from torch import nn

RUNTIME_ATTRS = ("counter", "collect_stats_steps", "momentum", "init_done", "quant_delay_steps")


def _brevitas(m: nn.Module) -> bool:
    return type(m).__module__.startswith("brevitas")


def is_quantized(model: nn.Module) -> bool:
    return any(_brevitas(m) for m in model.modules())


def runtime_state(model: nn.Module) -> dict[str, dict]:
    """{qualified name: {attribute: value}} of the brevitas modules' state outside state_dict."""
    out = {}
    for name, m in model.named_modules():
        if _brevitas(m):
            attrs = {a: getattr(m, a) for a in RUNTIME_ATTRS if hasattr(m, a)}
            attrs = {a: v for a, v in attrs.items() if v is None or isinstance(v, (int, float, bool))}
            if attrs:
                out[name] = attrs
    return out


def set_runtime_state(model: nn.Module, state: dict[str, dict]) -> None:
    mine = runtime_state(model)
    if set(mine) != set(state):
        raise ValueError(f"other quantizers: {sorted(set(mine) ^ set(state))[:3]}")
    mods = dict(model.named_modules())
    for name, attrs in state.items():
        for a, v in attrs.items():
            setattr(mods[name], a, v)


def signature(model: nn.Module) -> list:
    """Each brevitas module's name and type, and each quant layer's weight bits."""
    out = []
    for name, m in model.named_modules():
        if _brevitas(m) and type(m).__module__.startswith("brevitas.nn"):
            wq = getattr(m, "weight_quant", None)
            bits = int(wq.bit_width()) if wq is not None and getattr(wq, "is_quant_enabled", False) else None
            out.append([name, type(m).__name__, bits])
    return out


@contextlib.contextmanager
def loading():
    """load_state_dict copies into the existing quantizers (2. above) while open."""
    from brevitas import config
    old = config.REINIT_ON_STATE_DICT_LOAD
    config.REINIT_ON_STATE_DICT_LOAD = False
    try:
        yield
    finally:
        config.REINIT_ON_STATE_DICT_LOAD = old
