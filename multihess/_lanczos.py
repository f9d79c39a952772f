"""Krylov machinery on the host: products in the operator's framework, recurrences in float64.

The Lanczos bases live in host memory as float64 NumPy arrays.  Each step
sends one block of vectors to the operator's device in its dtype, applies
``op._matmat_rows`` once and brings the product back; dot products,
orthogonalization and the tridiagonal eigenproblems run in float64 whatever
the precision of the products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ._arrays import machine_epsilon
from ._operator import CurvatureOperator

HostProduct = Callable[..., np.ndarray]
"""``apply(rows, out=None)``: ``rows (k, n) float64 -> (A rows^T)^T (k, m) float64``."""

RandomVector = Callable[[], np.ndarray]
"""A fresh standard normal vector of length ``n`` (float64) at each call."""

_INITIAL_ROWS = 32
"""Rows a basis holds before it first grows (it doubles after that)."""

_REPEAT_BELOW = 1e-3
"""Gram-Schmidt runs a second pass when a vector keeps less than this fraction of its norm."""


def host_product(op: CurvatureOperator) -> HostProduct:
    """Products of ``op`` with the rows of a float64 NumPy matrix, answered in float64.

    Goes through ``op._matmat_rows``, so an operator's cached graphs or
    compiled functions are reused by every call.  ``apply(rows, out)`` writes
    the answer into ``out`` when given (no new host array per step).
    """
    b, like = op.backend, op.cols.w

    def apply(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        product = b.to_numpy(op._matmat_rows(b.asarray(np.ascontiguousarray(rows), like)))
        if out is None:
            return np.asarray(product, dtype=np.float64)
        np.copyto(out, product)
        return out

    return apply


def product_precision(op: CurvatureOperator) -> float:
    """Machine epsilon of the dtype the products of ``op`` are computed in."""
    return machine_epsilon(op.cols.w)


def tridiagonal(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The dense symmetric tridiagonal matrix with diagonal ``alpha`` and off-diagonal ``beta``."""
    T = np.diag(np.asarray(alpha, dtype=np.float64))
    if len(beta):
        off = np.arange(len(beta))
        T[off, off + 1] = beta
        T[off + 1, off] = beta
    return T


def wanted_indices(values: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted values: largest first, or largest magnitude first."""
    key = values if which == "largest" else np.abs(values)
    return np.argsort(-key, kind="stable")[:k]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


class _Basis:
    """Orthonormal rows kept in one float64 array that doubles when full.

    New rows are written in place (:meth:`next_row`, then :meth:`push`) and
    every update works in preallocated buffers: a step allocates no array of
    length ``n``.
    """

    def __init__(self, n: int, capacity: int) -> None:
        self._data = np.empty((max(1, min(capacity, n)), n))
        self._work = np.empty(n)
        self.size = 0

    @property
    def rows(self) -> np.ndarray:
        return self._data[: self.size]

    def next_row(self) -> np.ndarray:
        """The storage of the next row, to be filled before :meth:`push`."""
        if self.size == self._data.shape[0]:
            grown = np.empty((2 * self.size, self._data.shape[1]))
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        return self._data[self.size]

    def push(self) -> None:
        self.size += 1

    def orthogonalize(self, w: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Remove from ``w``, in place, its projection on the basis, by classical Gram-Schmidt.

        Returns the coefficients ``Qᵀw`` (both passes together) and the norm
        of ``w`` before and after.  A pass leaves ``w`` orthogonal to the
        basis up to about ``ε · ‖w_before‖ / ‖w_after‖``; a second pass runs
        when that ratio exceeds ``1 / _REPEAT_BELOW`` (the criterion of
        Daniel, Gragg, Kaufman and Stewart 1976, with a threshold that keeps
        the basis orthonormal to ~1e-13).
        """
        Q = self.rows
        before = norm = float(np.linalg.norm(w))
        total = np.zeros(self.size)
        for _ in range(2):
            coefs = Q @ w
            np.matmul(coefs, Q, out=self._work)
            w -= self._work
            total += coefs
            reduced = float(np.linalg.norm(w))
            if reduced > _REPEAT_BELOW * norm:
                break
            norm = reduced
        return total, before, reduced


def _fresh_direction(basis: _Basis, draw: RandomVector) -> np.ndarray | None:
    """A random unit vector orthogonal to the basis, or ``None`` when none is left."""
    n = basis.rows.shape[1]
    for _ in range(3):
        w = draw()
        _, _, norm = basis.orthogonalize(w)
        if norm > 1e-8 * np.sqrt(n):
            return w / norm
    return None


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


def lanczos_extreme(
    apply: HostProduct,
    n: int,
    k: int,
    which: str,
    max_steps: int,
    tol: float,
    breakdown: float,
    draw: RandomVector,
) -> LanczosResult:
    """Lanczos on a symmetric ``n × n`` operator until ``k`` wanted Ritz values converge.

    A Ritz pair ``(θ_i, x_i)`` has converged when ``β_m |e_mᵀ y_i| ≤ tol · s``,
    with ``s`` the largest of ``|θ|`` and the norms ``‖A q_j‖`` seen so far.

    When the residual ``β`` falls below ``breakdown · s`` the Krylov space is
    taken as invariant and every Ritz pair found so far as exact.  The basis
    is then extended with a random vector orthogonal to it, the tridiagonal
    matrix decouples there (``β = 0``), and the recurrence goes on in the
    complement, where further copies of repeated eigenvalues live.  From
    then on the run ends when the current block cannot change the ``k``
    wanted values (see :func:`_later_block_done`).
    """
    basis = _Basis(n, min(max_steps, _INITIAL_ROWS))
    q = basis.next_row()
    q[:] = _unit(draw())
    basis.push()
    w = np.empty(n)
    alpha: list[float] = []
    beta: list[float] = []
    scale = 0.0
    block_start = 0  # first index of the current invariant-subspace block
    while True:
        apply(q[None, :], out=w[None, :])  # v → Av
        # Minus its projection on every Lanczos vector: the last two coefficients are the
        # recurrence's α_j (and β_{j-1}); the others are rounding that full reorthogonalization removes.
        coefs, norm_aq, b = basis.orthogonalize(w)
        scale = max(scale, norm_aq)
        alpha.append(float(coefs[-1]))
        m = basis.size
        exhausted = m == n
        broke = b <= breakdown * scale
        last = exhausted or m >= max_steps
        if broke or last or (m >= k and _check_now(m)):
            values, vectors = np.linalg.eigh(tridiagonal(np.array(alpha), np.array(beta)))
            residuals = (0.0 if broke or exhausted else b) * np.abs(vectors[-1, :])
            idx = wanted_indices(values, k, which)
            scale = max(scale, float(np.max(np.abs(values))))
            if exhausted:
                converged = True
            elif block_start == 0:
                # Standard Lanczos: the wanted Ritz pairs are accurate.  A first breakdown
                # goes on instead, to look for further copies of the eigenvalues found.
                converged = not broke and len(idx) == k and bool(np.all(residuals[idx] <= tol * scale))
            else:
                converged = _later_block_done(alpha, beta, block_start, b, broke, values[idx], k, which, tol * scale)
            if converged or last:
                break
        if broke:
            fresh = _fresh_direction(basis, draw)
            if fresh is None:  # rounding made the basis span everything already
                values, vectors = np.linalg.eigh(tridiagonal(np.array(alpha), np.array(beta)))
                residuals, converged = np.zeros(m), True
                break
            block_start = m
            beta.append(0.0)
            q = basis.next_row()
            q[:] = fresh
        else:
            beta.append(b)
            q = basis.next_row()
            np.divide(w, b, out=q)
        basis.push()
    return LanczosResult(values, vectors, residuals, basis.rows, converged)


def _later_block_done(
    alpha: list[float],
    beta: list[float],
    block_start: int,
    b: float,
    broke: bool,
    wanted: np.ndarray,
    k: int,
    which: str,
    atol: float,
) -> bool:
    """Whether a block started after a breakdown can end the run.

    The earlier blocks span an invariant subspace, so their Ritz values are
    exact.  The run ends when the current block cannot change the ``k``
    wanted values: they are those of the earlier blocks, and the current
    block's extreme Ritz values (which bound every value it could still
    find) have converged (or the block is itself exact, after a breakdown).
    """
    T = tridiagonal(np.array(alpha), np.array(beta))
    before = np.linalg.eigvalsh(T[:block_start, :block_start])
    kept = before[wanted_indices(before, k, which)]
    if len(kept) < k or not np.allclose(kept, wanted, rtol=0, atol=atol):
        return False
    if broke:
        return True
    values, vectors = np.linalg.eigh(T[block_start:, block_start:])
    extremes = [int(np.argmax(values))] if which == "largest" else [int(np.argmax(values)), int(np.argmin(values))]
    return bool(np.all(b * np.abs(vectors[-1, extremes]) <= atol))


def _check_now(m: int) -> bool:
    """Whether to solve the tridiagonal eigenproblem at step ``m``: every step while cheap, then every ~5%."""
    return m <= 64 or m % max(1, m // 20) == 0


# ----------------------------------------------------------------------
# Lanczos quadrature: several starting vectors at once, fixed number of steps
# ----------------------------------------------------------------------
def lanczos_quadrature(
    apply: HostProduct, starts: np.ndarray, num_steps: int, breakdown: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature nodes and weights of ``vᵀ f(A) v`` for each starting row ``v``.

    All starting vectors advance together, one batched product per step; each
    has its own basis and is fully reorthogonalized against it.  When a
    start's Krylov space becomes invariant after ``m < num_steps`` steps its
    ``m``-point rule is already exact: it stops there (its row still rides
    along in the batched product, so the product keeps one shape), and the
    remaining entries repeat its last node with weight 0.

    Returns
    -------
    nodes, weights : ndarray, shape (num_starts, num_steps)
        Eigenvalues of each tridiagonal matrix (ascending) and the squared
        first components of its eigenvectors, times ``‖v‖²``; each row of
        ``weights`` sums to ``‖v‖²``.
    """
    p, n = starts.shape
    norms = np.linalg.norm(starts, axis=1)
    # The Krylov bases, step-major: the vectors of step j (one per start) are one contiguous block.
    bases = np.empty((num_steps, p, n))
    alpha = np.zeros((p, num_steps))
    beta = np.zeros((p, num_steps))
    steps = np.zeros(p, dtype=int)
    active = np.ones(p, dtype=bool)
    scale = np.zeros(p)
    W, work = np.empty((p, n)), np.empty((p, n))
    bases[0] = starts / norms[:, None]
    for j in range(num_steps):
        Q = bases[j]
        apply(Q, out=W)  # v → Av for every start at once
        # Minus each start's projection on its own Lanczos vectors (the last coefficient is α_j).
        a, norm_aq, b = _orthogonalize_each(bases[: j + 1].swapaxes(0, 1), W, work, active)
        scale = np.maximum(scale, norm_aq)
        alpha[active, j] = a[active]
        steps[active] = j + 1
        active &= b > breakdown * scale
        if j + 1 == num_steps or not active.any():
            break
        beta[active, j] = b[active]
        following = bases[j + 1]
        np.divide(W, np.where(active, b, 1.0)[:, None], out=following)
        # A start that stopped keeps its last vector, only to hold the product's shape.
        following[~active] = Q[~active]
    nodes = np.zeros((p, num_steps))
    weights = np.zeros((p, num_steps))
    for i in range(p):
        m = steps[i]
        theta, Y = np.linalg.eigh(tridiagonal(alpha[i, :m], beta[i, : m - 1]))
        nodes[i, :m], nodes[i, m:] = theta, theta[-1]
        weights[i, :m] = norms[i] ** 2 * Y[0, :] ** 2
    return nodes, weights


def _orthogonalize_each(
    bases: np.ndarray, W: np.ndarray, work: np.ndarray, active: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row ``i`` of ``W`` minus, in place, its projection on ``bases[i]``, by classical Gram-Schmidt.

    As :meth:`_Basis.orthogonalize`, for every start at once; returns each
    row's coefficient on its last basis vector and its norms before and
    after.  Rows of starts that stopped do not ask for a second pass.
    """
    before = norm = _row_norms(W)
    last = np.zeros(W.shape[0])
    for _ in range(2):
        coefs = np.matmul(bases, W[:, :, None])  # (p, m, 1)
        np.matmul(np.swapaxes(coefs, 1, 2), bases, out=work[:, None, :])
        W -= work
        last += coefs[:, -1, 0]
        reduced = _row_norms(W)
        if np.all(reduced[active] > _REPEAT_BELOW * norm[active]):
            break
        norm = reduced
    return last, before, reduced


def _row_norms(W: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row, without a temporary the size of ``W``."""
    return np.sqrt(np.einsum("ij,ij->i", W, W))


# ----------------------------------------------------------------------
# Power iteration with deflation
# ----------------------------------------------------------------------
def power_iteration(
    apply: HostProduct, n: int, k: int, which: str, max_steps: int, tol: float, draw: RandomVector
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The ``k`` wanted eigenpairs by power iteration, deflating found vectors by projection.

    Each pair is iterated until ``‖A x - θ x‖ ≤ tol · s``, with ``s`` the
    magnitude of the dominant eigenvalue (found first), at most ``max_steps``
    products per pair, in the complement of the vectors found before.  Plain
    power iteration finds the largest magnitudes; for the largest algebraic
    values the operator is shifted by ``s``, which makes every eigenvalue of
    ``A + sI`` non-negative and orders them as ``A``'s.

    Returns
    -------
    values : ndarray, shape (k,)
    vectors : ndarray, shape (n, k)
    converged : bool
    """
    found = np.zeros((0, n))
    values: list[float] = []
    converged = True

    def deflated(v: np.ndarray) -> np.ndarray:
        return v - (found @ v) @ found if len(found) else v

    def one_pair(shift: float, scale: float) -> tuple[float, np.ndarray]:
        nonlocal converged
        x = _unit(deflated(draw()))
        theta = 0.0
        for _ in range(max_steps):
            y = deflated(apply(x[None, :])[0] + shift * x)
            theta = float(x @ y)
            residual = float(np.linalg.norm(y - theta * x))
            if residual <= tol * (scale or abs(theta)):
                return theta - shift, x
            norm = float(np.linalg.norm(y))
            if norm == 0.0:  # x lies in the null space of the deflated operator: θ = 0 exactly
                return theta - shift, x
            x = y / norm
        converged = False
        return theta - shift, x

    def keep(x: np.ndarray) -> np.ndarray:
        # Orthonormal against the found vectors even when a pair stopped short of convergence.
        return _unit(deflated(deflated(x)))

    dominant, x = one_pair(0.0, 0.0)
    scale = abs(dominant)
    shift = 0.0
    if which == "magnitude" or dominant >= 0.0:
        # The dominant eigenvalue is also the largest one unless it is negative.
        found = keep(x)[None, :]
        values.append(dominant)
    if which == "largest":
        shift = scale
    while len(values) < k:
        value, x = one_pair(shift, scale)
        found = np.concatenate([found, keep(x)[None, :]])
        values.append(value)
    return np.array(values), found.T, converged
