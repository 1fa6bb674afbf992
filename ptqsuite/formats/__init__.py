"""Number formats: how quantized values are stored. The pure-torch code here is the specification for kernels.

One module per family, each a frozen dataclass with the same interface: ``quantize(x, gran) -> QTensor``,
``QTensor.dequantize()``, ``fake(x, gran)`` (quantize then dequantize, what accuracy cases evaluate), and
``bits_per_element(shape, gran)`` with every scale and zero point counted.

* integer.py: INT2..INT8, symmetric or asymmetric, fp16 scales (GPTQ/AWQ style).
"""
from .integer import IntFormat
from .qtensor import QTensor

__all__ = ["IntFormat", "QTensor"]
