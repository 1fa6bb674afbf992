"""Laws of the Hadamard reference (ptqsuite.hadamard), which the Triton kernel is tested against.

Exactness: matrices hold ±1 and the checks use integer-valued float64 arithmetic far below 2^53, so every
equality here is exact, not approximate, except where a normalization by sqrt(n) enters.
"""
import math

import pytest
import torch

from ptqsuite.hadamard import (BASES, GOETHALS_SEIDEL_ROWS, base, factors, fwht, hadamard, random_hadamard,
                               supported, sylvester)

ORDERS = [*BASES, 40]  # every base, and 40 (= 20·2)
NAMED = [172, 576, 1536, 11008, 14336, 18944]  # LLM widths: 11008 = 172·64, 14336 = 28·512, 576 = 36·16, 18944 = 148·128
POWERS = [1, 2, 4, 16, 128, 1024, 2048]
SYMMETRIC = {1, 36, 52, 148}  # Sylvester and Paley II bases; Paley I (I + skew) and Goethals–Seidel ones are not
FULL_GRAM = 2048  # above this order, H Hᵀ = n·I is checked by Freivalds' test (O(n²) instead of O(n³))
UNSUPPORTED = [3, 6, 7, 14, 44, 100, 0, -4]  # odd parts 3, 7 below their base, 11 and 25 no base, n < 1


def assert_hadamard(h: torch.Tensor) -> None:
    """Entries ±1 and H Hᵀ = n·I, exactly: the whole Gram matrix up to FULL_GRAM, else H (Hᵀ V) = n·V for 16
    random ±1 vectors V (Freivalds: a wrong H Hᵀ passes each vector with probability at most 1/2)."""
    n = h.shape[0]
    h = h.double()
    assert ((h == 1) | (h == -1)).all()
    if n <= FULL_GRAM:
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    else:
        gen = torch.Generator().manual_seed(n)
        v = torch.randint(0, 2, (n, 16), generator=gen).double() * 2 - 1
        assert torch.equal(h @ (h.T @ v), n * v)  # |entries| <= n² < 2^53


def integers(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Integer-valued float64 samples: every transform of them is exact."""
    return torch.randint(-9, 10, shape, generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("n", ORDERS + NAMED + POWERS + [112])  # 112 = 7·16 = 28·4
def test_hadamard(n):
    h = hadamard(n)
    assert h.dtype == torch.float32 and h.shape == (n, n)
    assert_hadamard(h)


@pytest.mark.parametrize("n, k, two_m", [(576, 36, 16), (1536, 12, 128), (172, 172, 1), (11008, 172, 64),
                                         (14336, 28, 512), (40, 20, 2), (4096, 1, 4096), (112, 28, 4)])
def test_factors(n, k, two_m):
    assert factors(n) == (k, two_m) and supported(n)


@pytest.mark.parametrize("n", [24, 40, 576])
def test_kronecker_index_convention(n):
    """H[a·2^m + b, c·2^m + d] = H_k[a, c] · H_{2^m}[b, d], and Sylvester's H_{2^m}[b, d] = (-1)^popcount(b & d)."""
    k, two_m = factors(n)
    i = torch.arange(two_m)
    popcount = sum((i[:, None] & i[None, :]) >> bit & 1 for bit in range(max(1, two_m.bit_length())))
    assert torch.equal(sylvester(two_m), (-1.0) ** popcount.double())
    blocks = base(k)[:, None, :, None] * sylvester(two_m)[None, :, None, :]
    assert torch.equal(hadamard(n).double().reshape(k, two_m, k, two_m), blocks)


@pytest.mark.parametrize("k", BASES)
def test_which_bases_are_symmetric(k):
    assert torch.equal(base(k), base(k).T) == (k in SYMMETRIC)


@pytest.mark.parametrize("t", sorted(GOETHALS_SEIDEL_ROWS))
def test_stored_quadruples_have_zero_total_autocorrelation(t):
    rows = torch.tensor([[1 if s == "+" else -1 for s in row] for row in GOETHALS_SEIDEL_ROWS[t]])
    assert rows.shape == (4, t)
    per_shift = torch.stack([(rows * rows.roll(-shift, dims=1)).sum() for shift in range(1, t)])
    assert not per_shift.any()


@pytest.mark.parametrize("n", [1, 2, 12, 40, 112, 172, 576])
def test_fwht_is_x_times_h_transposed(n):
    h = hadamard(n).double()
    x = integers((2, 3, n))
    assert torch.equal(fwht(x, normalize=False), x @ h.T)
    assert torch.equal(fwht(x, normalize=False, transpose=True), x @ h)
    assert torch.allclose(fwht(x), x @ h.T / math.sqrt(n), rtol=1e-14, atol=0)


@pytest.mark.parametrize("n", [12, 20, 156, 1536])
def test_inverse_is_the_transpose(n):
    """Hᵀ H = n·I: fwht with transpose undoes fwht (exactly, unnormalized); fwht twice does not, H_k not being
    symmetric for these n."""
    x = integers((4, n), seed=1)
    y = fwht(x, normalize=False)
    assert torch.equal(fwht(y, normalize=False, transpose=True), n * x)
    assert torch.equal(fwht(fwht(x, normalize=False, transpose=True), normalize=False), n * x)
    assert not torch.equal(fwht(y, normalize=False), n * x)
    assert torch.allclose(fwht(fwht(x), transpose=True), x, rtol=0, atol=1e-13)


@pytest.mark.parametrize("n", [36, 64, 576])
def test_symmetric_h_is_its_own_inverse(n):
    x = integers((4, n), seed=2)
    assert torch.equal(fwht(fwht(x, normalize=False), normalize=False), n * x)


@pytest.mark.parametrize("n", [1, 28, 108, 11008, 14336])
def test_normalized_fwht_preserves_the_norm(n):
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(fwht(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fwht_rounds_the_float64_result_to_x_dtype(dtype):
    x = torch.randn(3, 172, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = fwht(x)
    assert y.dtype == dtype and torch.equal(y, fwht(x.double()).to(dtype))


@pytest.mark.parametrize("n", [12, 172, 1024])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    q = random_hadamard(n, seed=7)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-13)
    signs = q * math.sqrt(n) / hadamard(n).double()  # columns of diag(s): one sign each
    assert torch.allclose(signs.abs(), torch.ones_like(signs)) and torch.equal(signs, signs[:1].expand_as(signs))
    assert torch.equal(q, random_hadamard(n, seed=7))
    assert not torch.equal(q, random_hadamard(n, seed=8))


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_orders_raise(n):
    assert not supported(n)
    valid_forms = r"k·2\^m.*\(1, 12, 20, 28, 36, 52, 60, 108, 140, 148, 156, 172\).*40"
    with pytest.raises(ValueError, match=rf"order {n}\b.*{valid_forms}"):
        hadamard(n)
    if n > 0:
        with pytest.raises(ValueError, match=rf"order {n}\b.*{valid_forms}"):
            fwht(torch.zeros(2, n))


@pytest.mark.parametrize("n", [2.0, True, "4"])
def test_non_integer_orders_raise(n):
    assert not supported(n)
    with pytest.raises(ValueError, match="order"):
        hadamard(n)


def test_hadamard_returns_a_fresh_tensor():
    h = hadamard(12)
    h.zero_()
    assert_hadamard(hadamard(12))
