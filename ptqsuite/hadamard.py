"""Hadamard matrices of order n = k·2^m and the Walsh–Hadamard transform: the torch reference (the specification).

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n·I, so H / sqrt(n) is orthogonal. Rotation methods
(QuaRot, SpinQuant) multiply activations and weights by one; LLM widths are not all powers of two, so the orders
here are n = k·2^m with k in ``BASES``, and

    hadamard(n) = H_k ⊗ H_{2^m},   index i = a·2^m + b  <->  (a, b),  a < k, b < 2^m,

i.e. ``H[a·2^m + b, c·2^m + d] = H_k[a, c] · H_{2^m}[b, d]``. By the mixed-product rule
(A⊗B)(A⊗B)ᵀ = AAᵀ ⊗ BBᵀ = k·I ⊗ 2^m·I = n·I, it is Hadamard whenever both factors are. The decomposition
is unique: n's odd part selects k (each base has its own odd part), except 40 = 20·2, which is taken as
20·2^(m+1): H_20 ⊗ H_2 is exactly Sylvester's doubling of H_20, so 40·2^m needs no base of its own.

The factors, each built here (nothing but the two sequence quadruples below is stored), each checked for
H Hᵀ = k·I when built:

* Sylvester, order 2^m, natural order: H_{2^m}[b, d] = (-1)^popcount(b & d), the m-fold power H_2 ⊗ … ⊗ H_2.
  Symmetric, so H_{2^m}ᵀ = H_{2^m}.
* Paley I, order q + 1 for a prime power q ≡ 3 (mod 4) (k = 12, 20, 28, 60, 108, 140 from q = 11, 19, 27, 59,
  107, 139): with χ the quadratic character of GF(q) and the Jacobsthal matrix Q[x, y] = χ(x - y)
  (Q Qᵀ = q·I - J, Q J = 0, Qᵀ = -Q since χ(-1) = -1), S = [[0, 1ᵀ], [-1, Q]] is skew with S Sᵀ = q·I,
  and H = I + S has H Hᵀ = I + S + Sᵀ + S Sᵀ = (q + 1)·I.
* Paley II, order 2(q + 1) for a prime power q ≡ 1 (mod 4) (k = 36, 52, 148 from q = 17, 25, 73; 148 is for
  Qwen2.5-7B's MLP width 18944 = 148·128): now Q is symmetric,
  C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix (C Cᵀ = q·I, zero diagonal), and
  H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]] has H Hᵀ = 2(q + 1)·I.
* Goethals–Seidel (1970), order 4t (k = 156, 172 from t = 39, 43, which no Paley construction reaches): four
  circulant ±1 matrices A, B, C, D of order t with A Aᵀ + B Bᵀ + C Cᵀ + D Dᵀ = 4t·I (equivalently: their first
  rows' periodic autocorrelations add up to 0 at every nonzero shift) and R the reversal permutation give

      [[ A,   BR,    CR,    DR  ],
       [-BR,  A,     DᵀR,  -CᵀR ],
       [-CR, -DᵀR,   A,     BᵀR ],
       [-DR,  CᵀR,  -BᵀR,   A   ]],   a Hadamard matrix of order 4t.

GF(q) for q = p^e (e ≤ 3: q = 25 and 27 need it) is GF(p)[x] modulo the first monic polynomial of degree e
without a root in GF(p) (irreducible, as e ≤ 3), an element stored as the integer whose base-p digits are its
coefficients.
"""
from __future__ import annotations

import functools
import math

import torch

# Bases k: n = k·2^m is supported for these (40·2^m too, as 20·2^(m+1)).
BASES = (1, 12, 20, 28, 36, 52, 60, 108, 140, 148, 156, 172)
VALID_FORMS = f"n = k·2^m with m >= 0 and k in {BASES} (40·2^m included, as 20·2^(m+1))"

# First rows of Goethals–Seidel quadruples: ±1 sequences of length t whose periodic autocorrelations add up to 0
# at every nonzero shift. Found for this module by simulated annealing over the four sequences (energy: the sum
# of squares of the total autocorrelation at shifts 1..(t-1)/2); any such quadruple serves, and _base checks the
# matrix it gives. Historically, order 172 was first built by Williamson (1944), 156 by Baumert and Hall (1965).
GOETHALS_SEIDEL_ROWS = {
    39: ("-----+++-+--+++-+-+--+--++----+-+--++-+",
         "++---++++--+-+-+++++-+-+----+---+--++-+",
         "++-+---+++--++--+-+--+----------+++--+-",
         "++++--++-------++-+-+----+--++-+---+--+"),
    43: ("+-++--+-++++--++++-++-++-++-+-+-+-----++-++",
         "++-----++-++++---+-++---++--+-+-+-++--++--+",
         "+-++++--+-+++++--++-+-+--+++--+-+---------+",
         "--+----+-+--+++-++-+---+------++++-----+-+-"),
}


def supported(n: int) -> bool:
    """Whether ``hadamard(n)`` exists here: n = k·2^m with k in BASES (or 40·2^m)."""
    return _decompose(n) is not None


def factors(n: int) -> tuple[int, int]:
    """``(k, 2^m)`` with n = k·2^m and hadamard(n) = H_k ⊗ H_{2^m}; ValueError for unsupported n."""
    km = _decompose(n)
    if km is None:
        raise ValueError(f"no Hadamard matrix of order {n!r} here: {VALID_FORMS}")
    return km


def _decompose(n: int) -> tuple[int, int] | None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    for k in BASES:  # ascending, though at most one k fits: each base has its own odd part
        if n % k == 0 and (n // k) & (n // k - 1) == 0:
            return k, n // k
    return None


def hadamard(n: int) -> torch.Tensor:
    """The n×n ±1 float32 matrix H_k ⊗ H_{2^m} (module docstring), with H Hᵀ = n·I.

    A fresh tensor on each call (H_k's construction is cached; the rest costs the O(n²) a copy would), so
    callers may modify it. Memory is 4n² bytes: 4 GiB for n = 32768, where ``fwht`` needs no matrix."""
    k, two_m = factors(n)
    return torch.kron(base(k).float(), sylvester(two_m, torch.float32))


def base(k: int) -> torch.Tensor:
    """H_k for k in BASES, as a float64 tensor (read-only: cached; clone before modifying)."""
    if k not in BASES:
        raise ValueError(f"no base Hadamard matrix of order {k!r}: the bases are {BASES}")
    return _base(k)


@functools.lru_cache(maxsize=None)
def _base(k: int) -> torch.Tensor:
    if k == 1:
        h = torch.ones(1, 1, dtype=torch.float64)
    elif _prime_power(k - 1) and (k - 1) % 4 == 3:
        h = _paley_1(k - 1)
    elif k % 2 == 0 and _prime_power(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        h = _paley_2(k // 2 - 1)
    else:
        h = _goethals_seidel(GOETHALS_SEIDEL_ROWS[k // 4])
    if not torch.equal(h @ h.T, k * torch.eye(k, dtype=h.dtype)):  # exact: integers far below 2^53
        raise AssertionError(f"the construction of H_{k} is not a Hadamard matrix")
    return h


def sylvester(two_m: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester's H_{2^m} in natural order, [b, d] -> (-1)^popcount(b & d) (a fresh tensor: not cached, it is
    as large as the matrices built from it)."""
    if not isinstance(two_m, int) or two_m < 1 or two_m & (two_m - 1):
        raise ValueError(f"Sylvester matrices have power-of-two orders, not {two_m!r}")
    h = torch.ones(1, 1, dtype=dtype)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype)
    for _ in range(two_m.bit_length() - 1):
        h = torch.kron(h, h2)  # appends b's and d's lowest bit: natural order
    return h


def _paley_1(q: int) -> torch.Tensor:
    """Order q + 1, q ≡ 3 (mod 4): I + [[0, 1ᵀ], [-1, Q]]."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley_2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q ≡ 1 (mod 4): C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    on = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    off = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, on) + torch.kron(torch.eye(q + 1, dtype=torch.float64), off)


def _goethals_seidel(rows: tuple[str, str, str, str]) -> torch.Tensor:
    a, b, c, d = (_circulant(row) for row in rows)
    br, cr, dr = (m.flip(1) for m in (b, c, d))  # M R: R reverses the column order
    btr, ctr, dtr = (m.T.flip(1) for m in (b, c, d))
    return torch.cat([
        torch.cat([a, br, cr, dr], 1),
        torch.cat([-br, a, dtr, -ctr], 1),
        torch.cat([-cr, -dtr, a, btr], 1),
        torch.cat([-dr, ctr, -btr, a], 1),
    ])


def _circulant(row: str) -> torch.Tensor:
    """[i, j] -> row[(j - i) mod t], from a string of '+' and '-'."""
    first = torch.tensor([1.0 if s == "+" else -1.0 for s in row], dtype=torch.float64)
    t = len(row)
    shift = (torch.arange(t)[None, :] - torch.arange(t)[:, None]) % t
    return first[shift]


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[x, y] = χ(x - y) over GF(q), χ the quadratic character (0 at 0, 1 on nonzero squares, -1 elsewhere)."""
    field = _Field(q)
    squares = {field.mul(x, x) for x in range(1, q)}
    chi = [0.0] + [1.0 if z in squares else -1.0 for z in range(1, q)]
    return torch.tensor([[chi[field.sub(x, y)] for y in range(q)] for x in range(q)], dtype=torch.float64)


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime, e >= 1; None otherwise."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # q's smallest prime factor
    e = 0
    while q % p == 0:
        q, e = q // p, e + 1
    return (p, e) if q == 1 else None


class _Field:
    """GF(p^e), e ≤ 3, elements the integers 0..q-1 read as base-p coefficient vectors (lowest degree first)."""

    def __init__(self, q: int):
        self.p, self.e = _prime_power(q)
        if self.e > 3:
            raise ValueError(f"GF({q}) needs a degree-{self.e} modulus; the root test finds moduli up to degree 3")
        monics = ([*self._digits(c), 1] for c in range(self.p**self.e))  # x^e + lower terms
        self.modulus = next(f for f in monics if self.e == 1 or all(self._eval(f, x) for x in range(self.p)))

    def _digits(self, z: int) -> list[int]:
        return [z // self.p**i % self.p for i in range(self.e)]

    def _number(self, digits: list[int]) -> int:
        return sum(c * self.p**i for i, c in enumerate(digits))

    def _eval(self, f: list[int], x: int) -> int:
        return sum(c * x**i for i, c in enumerate(f)) % self.p

    def sub(self, y: int, z: int) -> int:
        return self._number([(a - b) % self.p for a, b in zip(self._digits(y), self._digits(z))])

    def mul(self, y: int, z: int) -> int:
        product = [0] * (2 * self.e - 1)
        for i, a in enumerate(self._digits(y)):
            for j, b in enumerate(self._digits(z)):
                product[i + j] += a * b
        for top in range(len(product) - 1, self.e - 1, -1):  # x^top = x^(top-e) · (x^e - modulus)
            lead, product[top] = product[top], 0
            for i, c in enumerate(self.modulus[:-1]):
                product[top - self.e + i] -= lead * c
        return self._number([c % self.p for c in product])


def fwht(x: torch.Tensor, normalize: bool = True, transpose: bool = False) -> torch.Tensor:
    """``x @ H.T`` along the last dim (``x @ H`` if ``transpose``), H = hadamard(x.shape[-1]), over ``sqrt(n)``
    if ``normalize``; any leading dims. Computed in float64 and returned in x's dtype.

    Without forming H: x's last dim is viewed as [k, 2^m] (the Kronecker index convention), Sylvester's factor
    is applied by m butterfly stages and H_k by a dense product. Inverse: since H Hᵀ = Hᵀ H = n·I, normalized
    ``fwht(fwht(x), transpose=True) == x`` (and the other way round); transpose only matters through H_k, as
    H_{2^m} is symmetric (Paley I and Goethals–Seidel factors are not)."""
    n = x.shape[-1]
    k, two_m = factors(n)
    y = x.to(torch.float64).reshape(-1, k, two_m)
    half = 1
    while half < two_m:  # stage: H_2 on bit log2(half) of b
        pairs = y.reshape(-1, k, two_m // (2 * half), 2, half)
        lo, hi = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack([lo + hi, lo - hi], dim=-2).reshape(-1, k, two_m)
        half *= 2
    h_k = _base(k).to(y.device)
    y = torch.matmul(h_k.T if transpose else h_k, y)  # [k, k] @ [rows, k, 2^m]
    if normalize:
        y = y / math.sqrt(n)
    return y.reshape(x.shape).to(x.dtype)


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """QuaRot's randomized Hadamard rotation Q = H · diag(s) / sqrt(n), float64, with signs s ∈ {±1}ⁿ drawn by a
    ``torch.Generator`` seeded with ``seed``: orthogonal (Q Qᵀ = H diag(s)² Hᵀ / n = I), and the same for the same
    (n, seed)."""
    h = hadamard(n).double()
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    return h * signs / math.sqrt(n)
