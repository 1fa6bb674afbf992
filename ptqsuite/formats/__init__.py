"""Number formats: how quantized values are stored. The pure-torch code here is the specification for kernels.

One module per family, each a frozen dataclass with the same interface: ``quantize(x, gran) -> QTensor``,
``QTensor.dequantize()``, ``fake(x, gran)`` (quantize then dequantize, what accuracy cases evaluate), and
``bits_per_element(shape, gran)`` with every scale and zero point counted.

* integer.py: INT2..INT8, symmetric or asymmetric, fp16 scales (GPTQ/AWQ style).
* minifloat.py: the element and scale encodings (E4M3, E5M2, E2M1, E8M0, fp16/fp32 scales): rounding, bits.
* scaled.py: minifloat elements with a shared scale: FP8 (per tensor/channel/token), MXFP4/MXFP8 (OCP MX v1.0),
  NVFP4, and the variants of arXiv 2507.17417 (block size, scale format, scale rounding).
* packing.py: the storage layout of INT codes in 32-bit words (``PackedInt``, what the INT GEMM kernels read).
"""
from .integer import IntFormat
from .qtensor import QTensor
from .scaled import FP8, FP8_E5M2, MXFP4, MXFP8, NVFP4, FloatFormat

Format = IntFormat | FloatFormat

__all__ = ["FP8", "FP8_E5M2", "MXFP4", "MXFP8", "NVFP4", "FloatFormat", "Format", "IntFormat", "QTensor"]
