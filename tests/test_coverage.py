"""The architecture layer's completeness: every method × family cell of the matrix runs against a committed
baseline or skips with a reason (ptqsuite/COVERAGE.md, generated), and every architecture entry's ``prepare``
leaves the model computing what transformers' own module does."""
from pathlib import Path

import pytest
import torch

from ptqsuite import arch, coverage, matrix, models

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "ptqsuite" / "COVERAGE.md"
RANDOM = [s.name for s in models.registry().values() if s.kind == "random"]


def test_every_cell_runs_or_says_why_not():
    gaps = coverage.gaps(matrix.load(), ROOT / "baselines")
    assert not gaps, (f"method x family cells with neither a baselined case nor a reason: {gaps}; add cases to "
                      f"ptqsuite/matrix.toml and record their baselines, or make the method say why it does not apply")


def test_committed_table_is_current():
    current = coverage.markdown(matrix.load(), ROOT / "baselines")
    assert TABLE.read_text() == current, \
        "ptqsuite/COVERAGE.md is stale: python -m ptqsuite coverage --out ptqsuite/COVERAGE.md"


def test_every_family_has_a_tiny_model():
    """CPU CI covers an architecture only through a random-init model of its layout."""
    families = {s.family for s in models.registry().values() if s.kind in ("random", "shipped", "pip-gguf")}
    assert set(coverage.rows()) <= families, set(coverage.rows()) - families


@pytest.mark.parametrize("name", RANDOM)
def test_prepare_preserves_the_function(name):
    """The loaded model (after ``Arch.prepare``) against transformers' own modules with the same weights, bit for
    bit (fused experts run by transformers' eager loop: its default grouped GEMM differs by rounding)."""
    spec = models.get(name)
    raw = models.build_random(spec).eval()
    if hasattr(raw.config, "_experts_implementation"):
        raw.config._experts_implementation = "eager"
    loaded = models.load(spec, "cpu", torch.float32).model
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(raw(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert arch.arch_of(loaded) is arch.get(spec.arch)
