"""Pre-quantization transforms: function-preserving rewrites (smoothing, AWQ scaling, rotations).

Each is ``fit(model, arch, calib, recipe) -> State`` (plain, serializable data) then ``apply(model, arch, State)``.
The registry maps a transform's recipe name to its module; it grows as transforms are added.
"""
TRANSFORMS: dict[str, object] = {}
