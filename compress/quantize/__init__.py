"""brevitas quantization: prepare -> calibrate -> QAT with KD -> (export converts).

config.py      QuantizeConfig, settings recorded for rebuilds
graph.py       trace + BN merge + per-layer formats; prepare / rebuild_quantized
calibrate.py   activation ranges, bias correction, activation equalization, layer SQNR
kth.py         the exact extreme percentiles calibration reads, without a full selection
inference.py   scoring a fake-quant model through brevitas' cached-quantizer mode
sensitivity.py mixed precision by measured per-layer sensitivity
stage.py       QuantizeStage (the Stage contract) and its preflight `check`
"""
from compress.quantize.calibrate import calib_inputs, layer_sqnr, pass_calibration_data
from compress.quantize.config import MixedPrecisionConfig, QuantizeConfig, settings
from compress.quantize.graph import compute_layers, prepare, rebuild_quantized
from compress.quantize.stage import QuantizeStage, check

__all__ = ["QuantizeConfig", "MixedPrecisionConfig", "settings", "prepare", "rebuild_quantized",
           "QuantizeStage", "check", "calib_inputs", "layer_sqnr", "pass_calibration_data", "compute_layers"]
