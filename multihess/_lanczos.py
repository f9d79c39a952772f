"""Krylov machinery on the host: products in the operator's framework, recurrences in float64.

The Lanczos basis lives in host memory as float64 NumPy arrays.  Each step
sends one block of vectors to the operator's device in its dtype, applies
``op._matmat_rows`` and brings the product back; dot products,
orthogonalization and the tridiagonal eigenproblems run in float64 whatever
the precision of the products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._operator import CurvatureOperator

HostProduct = Callable[[np.ndarray], np.ndarray]
"""``rows (k, n) float64 -> (A rows^T)^T (k, m) float64``."""

_BREAKDOWN = 64 * np.finfo(np.float64).eps
"""Relative size of a Lanczos residual below which the Krylov space is taken as invariant."""


def host_product(op: CurvatureOperator) -> HostProduct:
    """Products of ``op`` with the rows of a float64 NumPy matrix, answered in float64."""
    b, like = op.backend, op.cols.w

    def apply(rows: np.ndarray) -> np.ndarray:
        out = op._matmat_rows(b.from_numpy(np.ascontiguousarray(rows), like))
        return np.asarray(b.to_numpy(out), dtype=np.float64)

    return apply


def tridiagonal(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The dense symmetric tridiagonal matrix with diagonal ``alpha`` and off-diagonal ``beta``."""
    T = np.diag(np.asarray(alpha, dtype=np.float64))
    if len(beta):
        off = np.arange(len(beta))
        T[off, off + 1] = beta
        T[off + 1, off] = beta
    return T


class _Basis:
    """Orthonormal rows kept in one growing float64 array (amortized O(1) appends)."""

    def __init__(self, n: int) -> None:
        self._data = np.empty((min(n, 16), n))
        self.size = 0

    @property
    def rows(self) -> np.ndarray:
        return self._data[: self.size]

    def append(self, q: np.ndarray) -> None:
        if self.size == self._data.shape[0]:
            grown = np.empty((2 * self.size, self._data.shape[1]))
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size] = q
        self.size += 1

    def orthogonalize(self, w: np.ndarray) -> np.ndarray:
        """``w`` minus its projection on the basis, by classical Gram-Schmidt done twice."""
        Q = self.rows
        for _ in range(2):  # the second pass removes what rounding left of the first
            w = w - Q.T @ (Q @ w)
        return w


# ----------------------------------------------------------------------
# Lanczos with full reorthogonalization, for extreme eigenpairs
# ----------------------------------------------------------------------
@dataclass
class LanczosResult:
    """Ritz pairs of the final Krylov space.

    Attributes
    ----------
    values : ndarray, shape (m,)
        Ritz values, ascending.
    vectors : ndarray, shape (m, m)
        Eigenvectors of the tridiagonal matrix (columns).
    residuals : ndarray, shape (m,)
        ``β_m |e_mᵀ y_i|``: the norm of ``A x_i - θ_i x_i`` for each Ritz pair.
    basis : ndarray, shape (m, n)
        The Lanczos vectors (rows).
    converged : bool
        Whether the wanted values met the tolerance (or the space was exhausted).
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    basis: np.ndarray
    converged: bool


def wanted_indices(values: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted values: largest first, or largest magnitude first."""
    key = values if which == "largest" else np.abs(values)
    return np.argsort(-key, kind="stable")[:k]


def lanczos_extreme(
    apply: HostProduct, n: int, k: int, which: str, max_steps: int, tol: float, rng: np.random.Generator
) -> LanczosResult:
    """Lanczos on a symmetric ``n × n`` operator until ``k`` wanted Ritz values converge.

    A Ritz pair ``(θ_i, x_i)`` has converged when ``β_m |e_mᵀ y_i| ≤ tol · |θ_1|``,
    with ``θ_1`` the Ritz value of largest magnitude.

    When the recurrence breaks down (``β ≈ 0``: the Krylov space is invariant)
    every Ritz pair found so far is exact.  The basis is then extended with a
    random vector orthogonal to it, the tridiagonal matrix decouples there
    (``β = 0``), and the recurrence goes on in the complement, where further
    copies of repeated eigenvalues live.  From then on it stops only at a
    breakdown whose block leaves the ``k`` wanted values unchanged, when the
    space is exhausted, or after ``max_steps``.
    """
    basis = _Basis(n)
    alpha: list[float] = []
    beta: list[float] = []
    q = _unit(rng.standard_normal(n))
    norm_estimate = 0.0
    block_start = 0  # first index of the current invariant-subspace block
    converged = False
    while True:
        basis.append(q)
        w = apply(q[None, :])[0]
        a = float(q @ w)
        alpha.append(a)
        # Full reorthogonalization against every basis vector subsumes the three-term recurrence.
        w = basis.orthogonalize(w)
        b = float(np.linalg.norm(w))
        norm_estimate = max(norm_estimate, abs(a) + b + (beta[-1] if beta else 0.0))
        m = basis.size
        exhausted = m == n
        broke = b <= _BREAKDOWN * norm_estimate
        last = exhausted or m >= max_steps
        if broke or last or (m >= k and block_start == 0 and _check_now(m)):
            T = tridiagonal(np.array(alpha), np.array(beta))
            values, vectors = np.linalg.eigh(T)
            residuals = (0.0 if broke or exhausted else b) * np.abs(vectors[-1, :])
            idx = wanted_indices(values, k, which)
            scale = float(np.max(np.abs(values)))
            if exhausted:
                converged = True
            elif broke:
                # Every block is exact; stop once the latest one adds nothing to the wanted values.
                before = np.linalg.eigvalsh(T[:block_start, :block_start]) if block_start else np.zeros(0)
                kept = before[wanted_indices(before, k, which)]
                converged = len(kept) == k and bool(np.allclose(kept, values[idx], rtol=0, atol=tol * scale))
            else:
                converged = bool(np.all(residuals[idx] <= tol * scale))
            if converged or last:
                break
        if broke:
            w = _fresh_direction(basis, rng)
            if w is None:  # rounding made the basis span everything already
                values, vectors = np.linalg.eigh(tridiagonal(np.array(alpha), np.array(beta)))
                residuals, converged = np.zeros(m), True
                break
            q, b, block_start = w, 0.0, m
        else:
            q = w / b
        beta.append(b)
    return LanczosResult(values, vectors, residuals, basis.rows.copy(), converged)


def _check_now(m: int) -> bool:
    """Whether to solve the tridiagonal eigenproblem at step ``m``: every step while cheap, then every ~5%."""
    return m <= 64 or m % max(1, m // 20) == 0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _fresh_direction(basis: _Basis, rng: np.random.Generator) -> np.ndarray | None:
    """A random unit vector orthogonal to the basis, or ``None`` when none is left."""
    for _ in range(3):
        w = basis.orthogonalize(rng.standard_normal(basis.rows.shape[1]))
        norm = float(np.linalg.norm(w))
        if norm > 1e-8 * np.sqrt(w.size):
            return w / norm
    return None


# ----------------------------------------------------------------------
# Lanczos quadrature: several starting vectors at once, fixed number of steps
# ----------------------------------------------------------------------
def lanczos_quadrature(apply: HostProduct, starts: np.ndarray, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature nodes and weights of ``vᵀ f(A) v`` for each starting row ``v``.

    All starting vectors advance together, one batched product per step; each
    has its own basis and is fully reorthogonalized against it.  When a
    start's Krylov space becomes invariant after ``m < num_steps`` steps its
    ``m``-point rule is already exact: the remaining entries repeat its last
    node with weight 0.

    Returns
    -------
    nodes, weights : ndarray, shape (num_starts, num_steps)
        Eigenvalues of each tridiagonal matrix (ascending) and the squared
        first components of its eigenvectors; each row of ``weights`` sums
        to ``‖v‖²``.
    """
    p, n = starts.shape
    norms = np.linalg.norm(starts, axis=1)
    bases = [_Basis(n) for _ in range(p)]
    alpha = np.zeros((p, num_steps))
    beta = np.zeros((p, num_steps))
    steps = np.zeros(p, dtype=int)
    active = np.ones(p, dtype=bool)
    Q = starts / norms[:, None]
    scale = np.zeros(p)
    for j in range(num_steps):
        live = np.flatnonzero(active)
        if live.size == 0:
            break
        W = apply(Q[live])
        for row, i in enumerate(live):
            q, w = Q[i], W[row]
            bases[i].append(q)
            alpha[i, j] = q @ w
            w = bases[i].orthogonalize(w)
            b = float(np.linalg.norm(w))
            scale[i] = max(scale[i], abs(alpha[i, j]) + b + (beta[i, j - 1] if j else 0.0))
            steps[i] = j + 1
            if j + 1 == num_steps or b <= _BREAKDOWN * scale[i]:
                active[i] = False
            else:
                beta[i, j] = b
                Q[i] = w / b
    nodes = np.zeros((p, num_steps))
    weights = np.zeros((p, num_steps))
    for i in range(p):
        m = steps[i]
        theta, Y = np.linalg.eigh(tridiagonal(alpha[i, :m], beta[i, : m - 1]))
        nodes[i, :m], nodes[i, m:] = theta, theta[-1]
        weights[i, :m] = norms[i] ** 2 * Y[0, :] ** 2
    return nodes, weights


# ----------------------------------------------------------------------
# Power iteration with deflation
# ----------------------------------------------------------------------
def power_iteration(
    apply: HostProduct, n: int, k: int, which: str, max_steps: int, tol: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The ``k`` wanted eigenpairs by power iteration, deflating found vectors by projection.

    Each pair is iterated until ``‖A x - θ x‖ ≤ tol · |θ|`` (at most
    ``max_steps`` products per pair), in the complement of the vectors found
    before.  Plain power iteration finds the largest magnitudes; for the
    largest algebraic values the operator is shifted by ``s = |λ_dom|``
    (the dominant eigenvalue, found first), which makes every eigenvalue of
    ``A + sI`` non-negative and orders them as ``A``'s.

    Returns
    -------
    values : ndarray, shape (k,)
    vectors : ndarray, shape (n, k)
    converged : bool
    """
    found: list[np.ndarray] = []
    values: list[float] = []
    converged = True

    def deflated(v: np.ndarray) -> np.ndarray:
        for u in found:
            v = v - (u @ v) * u
        return v

    def one_pair(shift: float) -> tuple[float, np.ndarray]:
        nonlocal converged
        x = _unit(deflated(rng.standard_normal(n)))
        theta = 0.0
        for _ in range(max_steps):
            y = deflated(apply(x[None, :])[0] + shift * x)
            theta = float(x @ y)
            residual = float(np.linalg.norm(y - theta * x))
            norm = float(np.linalg.norm(y))
            if residual <= tol * abs(theta) or norm == 0.0:
                return theta - shift, x
            x = y / norm
        converged = False
        return theta - shift, x

    shift = 0.0
    if which == "largest":
        dominant, x = one_pair(0.0)
        if dominant >= 0.0:  # the dominant eigenvalue is the largest one
            found.append(x)
            values.append(dominant)
        shift = abs(dominant)
    while len(values) < k:
        value, x = one_pair(shift)
        found.append(x)
        values.append(value)
    return np.array(values), np.stack(found, axis=1), converged
