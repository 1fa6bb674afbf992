"""Error mitigation: how quantized values are chosen for one linear layer.

Each method exposes ``solve(W, stats, spec) -> QTensor``; the format is injected through ``spec`` and the algorithm
never looks inside it. ``needs_calibration`` tells the pipeline whether to collect ``stats``.
"""
from . import rtn

METHODS = {"rtn": rtn}
