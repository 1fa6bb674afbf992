"""ptqsuite_kernels: Triton kernels of ptqsuite, each module a ``kernel`` beside its torch ``reference``.

The torch code in ``ptqsuite`` (formats.py, granularity.py) is the specification; a kernel here must reproduce
it bit for bit. Import path: the repository's top-level ``kernels/`` is a plain folder, never a package, because
transformers imports any top-level module named ``kernels`` while loading a model; this package is installed as
``ptqsuite_kernels`` from inside it. Importing it stays cheap and needs no Triton (optional on CPU machines): only
the kernel modules import triton.
"""
