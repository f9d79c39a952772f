"""Randomized range sketches shared by Hutch++, XTrace and XDiag (host float64 linear algebra).

Conventions: matrices of vectors hold them as *columns* (``Om`` is
``n × s``, one test vector per column), as in the papers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._arrays import machine_epsilon
from ._operator import CurvatureOperator
from ._probes import draw_probes, probe_dtype, probe_order, products

_ESSENTIAL = 1e-6
"""A test vector whose null-space component is below this is one the others cannot replace."""


def range_basis(Y: np.ndarray, eps: float) -> np.ndarray:
    """An orthonormal basis (``n × r``) of the numerical range of ``Y`` (``n × s``).

    A Householder QR, then an SVD of the small triangular factor to find the
    numerical rank: singular values below ``10 · s · eps`` times the largest
    count as zero.  ``eps`` is the unit roundoff of the products that made ``Y``.
    """
    s = Y.shape[1]
    Q0, R0 = np.linalg.qr(Y)
    U, sv, _ = np.linalg.svd(R0)
    if sv.size == 0 or sv[0] == 0.0:
        return np.zeros((Y.shape[0], 0))
    rank = int(np.sum(sv > sv[0] * 10.0 * max(s, 1) * eps))
    return Q0 @ U[:, :rank]


@dataclass
class ExchangeableSketch:
    """What XTrace and XDiag need from ``Y = A Om`` and ``Z = A Q`` (``A`` symmetric).

    For each test vector ``ω_i`` the leave-one-out basis ``Q_(i)`` spans
    ``A`` times all the other test vectors; with ``Y = Q R`` it is ``Q`` with
    at most one direction ``Q s_i`` removed.  When column ``i`` of ``R`` is
    needed for the full rank (the other columns span less), ``s_i`` is the
    unit vector orthogonal to every other column: ``s_i ∝ R⁺ᵀ e_i``, which is
    ``R⁻ᵀ e_i`` when ``Y`` has full column rank.  When the other columns
    span the same space, as they do when ``A`` has rank below the number of
    test vectors or there are more test vectors than dimensions, nothing is
    removed: ``s_i = 0``.  Column ``i`` is needed exactly when row ``i`` of a
    basis of the null space of ``R`` vanishes.

    Attributes
    ----------
    Om, Y, Q, Z : ndarray
        Test vectors ``n × s``, ``A Om``, the basis ``n × r`` and ``A Q``.
    H, W, R, T : ndarray
        ``QᵀAQ`` (``r × r``), ``QᵀOm``, ``QᵀY`` and ``ZᵀOm`` (``r × s``).
    S : ndarray
        The removed directions ``s_i`` as columns (``r × s``; zero when rank deficient).
    """

    Om: np.ndarray
    Y: np.ndarray
    Q: np.ndarray
    Z: np.ndarray
    H: np.ndarray
    W: np.ndarray
    R: np.ndarray
    T: np.ndarray
    S: np.ndarray

    @classmethod
    def build(cls, Om: np.ndarray, Y: np.ndarray, Q: np.ndarray, Z: np.ndarray) -> ExchangeableSketch:
        R = Q.T @ Y
        r, s = R.shape
        S = np.zeros_like(R)
        if r:
            U, sv, Vt = np.linalg.svd(R)
            # Columns of R⁺ᵀ = U Σ⁻¹ V_rᵀ; row i of V's null-space part is ‖(I − V_r V_rᵀ) e_i‖.
            pinv_t = U @ (Vt[:r] / sv[:, None])
            null_part = np.sqrt(np.clip(1.0 - np.sum(Vt[:r] ** 2, axis=0), 0.0, None))
            needed = null_part < _ESSENTIAL
            S[:, needed] = pinv_t[:, needed] / np.linalg.norm(pinv_t[:, needed], axis=0, keepdims=True)
        return cls(Om, Y, Q, Z, Q.T @ Z, Q.T @ Om, R, Z.T @ Om, S)

    def trace_samples(self) -> np.ndarray:
        """The ``s`` exchangeable trace estimates ``tr(Q_(i)ᵀAQ_(i)) + uᵢᵀ A uᵢ``, ``uᵢ = (I − Q_(i)Q_(i)ᵀ) ωᵢ``.

        With ``P_i = Q_(i)Q_(i)ᵀ = Q (I − s_i s_iᵀ) Qᵀ`` and ``c_i = W_i − s_i (s_iᵀ W_i)``
        (so that ``u_i = ω_i − Q c_i``):
        ``tr(H) − s_iᵀHs_i + ω_iᵀY_i − T_iᵀc_i − c_iᵀR_i + c_iᵀHc_i``.
        """
        S, H, W = self.S, self.H, self.W
        C = W - S * np.sum(S * W, axis=0)
        return (
            np.trace(H)
            - np.sum(S * (H @ S), axis=0)
            + np.sum(self.Om * self.Y, axis=0)
            - np.sum(self.T * C, axis=0)
            - np.sum(C * self.R, axis=0)
            + np.sum(C * (H @ C), axis=0)
        )

    def diagonal_samples(self) -> np.ndarray:
        """The ``s`` exchangeable diagonal estimates as columns (``n × s``).

        Column ``i`` is ``diag(P_i A) + ω_i ⊙ ((I − P_i) A ω_i)``:
        ``rowsum(Q ⊙ Z) − (Q s_i) ⊙ (Z s_i) + ω_i ⊙ (Y_i − Q (R_i − s_i (s_iᵀ R_i)))``.
        """
        S, Q, Z = self.S, self.Q, self.Z
        low_rank = np.sum(Q * Z, axis=1, keepdims=True) - (Q @ S) * (Z @ S)
        projected = Q @ (self.R - S * np.sum(S * self.R, axis=0))
        return low_rank + self.Om * (self.Y - projected)


def product_eps(op: CurvatureOperator) -> float:
    """Unit roundoff of the operator's products."""
    return machine_epsilon(op.cols.w)


def exchangeable_sketch(
    op: CurvatureOperator, rng: np.random.Generator, num_vectors: int, distribution: str, budget: int
) -> ExchangeableSketch:
    """Test vectors ``Om``, ``Y = A Om``, the basis ``Q`` of its range and ``Z = A Q`` (XTrace, XDiag).

    ``2 · num_vectors`` products at most: ``Z`` needs one per basis vector,
    fewer when ``Y`` is rank deficient.
    """
    # Drawn in the products' dtype, so that the host algebra sees the vectors the products saw.
    Om = draw_probes(rng, num_vectors, op.shape[1], distribution, probe_order(op), probe_dtype(op)).astype(np.float64)
    Y = products(op, Om, budget)
    Q = range_basis(Y.T, product_eps(op))
    Z = products(op, Q.T, budget) if Q.shape[1] else np.zeros((0, op.shape[0]))
    return ExchangeableSketch.build(Om.T, Y.T, Q, Z.T)
