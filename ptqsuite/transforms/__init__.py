"""Pre-quantization transforms: function-preserving rewrites (smoothing, AWQ scaling, rotations).

Each module has ``ROLE = "transform"``, ``needs_calibration``, an ``Options`` frozen dataclass, ``options(step)``
(ValueError naming what the step takes), optionally ``DEFAULT_ARG``, and the two verbs

* ``fit(model, arch, calibration, recipe, options, device) -> State``: plain data (scales, rotation matrices),
  read from the model and the calibration data, the model left as it was;
* ``apply(model, arch, state)``: rewrite the model in place; in exact arithmetic it computes what it did.

Transforms run in the recipe's order, before error mitigation, on the model as the previous ones left it.
"""
from . import awq, rotate, smooth, spin

TRANSFORMS = {"quarot": rotate, "spinquant": spin, "smooth": smooth, "awq": awq}
