"""compress/exportable.py: preflight's rule for adaptive pooling agrees with torch's ONNX
exporter itself (the oracle), on sizes that export and sizes that do not."""
import io

import pytest
import torch
from torch import nn

from compress.exportable import recorded_pools


@pytest.mark.parametrize("pool,size", [
    (nn.AdaptiveAvgPool2d(7), (16, 16)), (nn.AdaptiveAvgPool2d(7), (14, 14)), (nn.AdaptiveAvgPool2d(7), (1, 1)),
    (nn.AdaptiveAvgPool2d(1), (5, 5)), (nn.AdaptiveAvgPool2d((7, 2)), (14, 6)), (nn.AdaptiveMaxPool2d(3), (8, 8)),
    (nn.AdaptiveMaxPool2d(3), (9, 9)), (nn.AdaptiveAvgPool1d(4), (10,)),
])
def test_the_rule_agrees_with_the_exporter(pool, size):
    x = torch.zeros(1, 2, *size)
    with recorded_pools(nn.Sequential(pool)) as found:
        pool(x)
    try:
        torch.onnx.export(nn.Sequential(pool), (x,), io.BytesIO(), dynamo=False)
        exports = True
    except Exception:  # torch's SymbolicValueError: "output size that are not factor of input size"
        exports = False
    assert (not found) == exports, (found, exports)
