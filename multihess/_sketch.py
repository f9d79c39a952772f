"""Randomized range sketches shared by Hutch++, XTrace and XDiag, on the parameters' device.

Conventions: matrices of vectors hold them as *columns* (``Om`` is
``n × s``, one test vector per column), as in the papers.

The tall matrices (test vectors, their products, the range basis: ``n``
rows each) stay on the parameters' device in the accumulation dtype of
:mod:`multihess._lanczos` (float64 where the device has it); the test
vectors are drawn on the host from one NumPy seed and sent once.  The small
matrices (``s × s`` and ``r × s``: the triangular factor, ``QᵀAQ``, the
leave-one-out directions) come back in one transfer and are handled in
NumPy float64.  The QR factorization runs on the device where the namespace
has ``linalg.qr`` (PyTorch, JAX, NumPy); elsewhere (TensorFlow's namespace)
the tall matrix makes one round trip to the host for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._arrays import Array, machine_epsilon, shape
from ._lanczos import Device, DeviceOperator
from ._operator import CurvatureOperator
from ._probes import chunks, rows_per_chunk, sent_probes

_ESSENTIAL = 1e-6
"""A test vector whose null-space component is below this is one the others cannot replace."""


def range_basis(Y: Array, eps: float, device: Device | None = None) -> Array:
    """An orthonormal basis (``n × r``) of the numerical range of ``Y`` (``n × s``).

    A Householder QR, then an SVD of the small triangular factor (on the
    host) to find the numerical rank: singular values below ``10 · s · eps``
    times the largest count as zero.  ``eps`` is the unit roundoff of the
    products that made ``Y``.  ``Y`` and the basis are arrays of ``device``
    (default: NumPy float64 arrays).
    """
    device = device or Device.numpy()
    xp = device.xp
    s = shape(Y)[1]
    qr = getattr(getattr(xp, "linalg", None), "qr", None)
    if qr is not None:
        Q0, R0_device = qr(Y)  # Y → Q₀ R₀, on the device
        (R0,) = device.read(R0_device)
    else:  # no QR in the namespace: one round trip of Y
        Q0_host, R0 = np.linalg.qr(device.read(Y)[0])
        Q0 = device.send(Q0_host)
    U, sv, _ = np.linalg.svd(R0)
    if sv.size == 0 or sv[0] == 0.0:
        return Q0[:, :0]
    rank = int(np.sum(sv > sv[0] * 10.0 * max(s, 1) * eps))
    return xp.matmul(Q0, device.send(U[:, :rank]))  # → Q₀ U_r: the leading left singular vectors of Y


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
    Om, Y, Q, Z : Array
        Test vectors ``n × s``, ``A Om``, the basis ``n × r`` and ``A Q``,
        arrays of :attr:`device`.
    H, W, R, T : ndarray
        ``QᵀAQ`` (``r × r``), ``QᵀOm``, ``QᵀY`` and ``ZᵀOm`` (``r × s``), on the host.
    S : ndarray
        The removed directions ``s_i`` as columns (``r × s``; zero when rank deficient).
    quadratic : ndarray
        ``ω_iᵀ Y_i`` for each test vector (``s``).
    device : Device
        Where the tall matrices live.
    """

    Om: Array
    Y: Array
    Q: Array
    Z: Array
    H: np.ndarray
    W: np.ndarray
    R: np.ndarray
    T: np.ndarray
    S: np.ndarray
    quadratic: np.ndarray
    device: Device = field(repr=False)

    @classmethod
    def build(cls, Om: Array, Y: Array, Q: Array, Z: Array, device: Device | None = None) -> ExchangeableSketch:
        """The sketch of ``Om``, ``Y``, ``Q``, ``Z`` (arrays of ``device``; default NumPy float64)."""
        device = device or Device.numpy()
        xp = device.xp
        s, r = shape(Om)[1], shape(Q)[1]
        Qt = xp.matrix_transpose(Q)
        # The small products, computed where the tall matrices are and read in one transfer.
        small = xp.concat(
            [xp.matmul(Qt, Y), xp.matmul(Qt, Z), xp.matmul(Qt, Om), xp.matmul(xp.matrix_transpose(Z), Om)], axis=1
        )
        small, quadratic = device.read(small, xp.sum(Om * Y, axis=0))
        R, H, W, T = small[:, :s], small[:, s : s + r], small[:, s + r : 2 * s + r], small[:, 2 * s + r :]
        S = np.zeros_like(R)
        if r:
            U, sv, Vt = np.linalg.svd(R)
            # Columns of R⁺ᵀ = U Σ⁻¹ V_rᵀ; row i of V's null-space part is ‖(I − V_r V_rᵀ) e_i‖.
            pinv_t = U @ (Vt[:r] / sv[:, None])
            null_part = np.sqrt(np.clip(1.0 - np.sum(Vt[:r] ** 2, axis=0), 0.0, None))
            needed = null_part < _ESSENTIAL
            S[:, needed] = pinv_t[:, needed] / np.linalg.norm(pinv_t[:, needed], axis=0, keepdims=True)
        return cls(Om, Y, Q, Z, H, W, R, T, S, quadratic, device)

    def trace_samples(self) -> np.ndarray:
        """The ``s`` exchangeable trace estimates ``tr(Q_(i)ᵀAQ_(i)) + uᵢᵀ A uᵢ``, ``uᵢ = (I − Q_(i)Q_(i)ᵀ) ωᵢ``.

        With ``P_i = Q_(i)Q_(i)ᵀ = Q (I − s_i s_iᵀ) Qᵀ`` and ``c_i = W_i − s_i (s_iᵀ W_i)``
        (so that ``u_i = ω_i − Q c_i``):
        ``tr(H) − s_iᵀHs_i + ω_iᵀY_i − T_iᵀc_i − c_iᵀR_i + c_iᵀHc_i``.
        Only small matrices are involved: no transfer.
        """
        S, H, W = self.S, self.H, self.W
        C = W - S * np.sum(S * W, axis=0)
        return (
            np.trace(H)
            - np.sum(S * (H @ S), axis=0)
            + self.quadratic
            - np.sum(self.T * C, axis=0)
            - np.sum(C * self.R, axis=0)
            + np.sum(C * (H @ C), axis=0)
        )

    def diagonal_columns(self) -> Array:
        """The ``s`` exchangeable diagonal estimates as the columns of an ``n × s`` array of :attr:`device`.

        Column ``i`` is ``diag(P_i A) + ω_i ⊙ ((I − P_i) A ω_i)``:
        ``rowsum(Q ⊙ Z) − (Q s_i) ⊙ (Z s_i) + ω_i ⊙ (Y_i − Q (R_i − s_i (s_iᵀ R_i)))``.
        """
        xp, device = self.device.xp, self.device
        S = device.send(self.S)
        low_rank = xp.sum(self.Q * self.Z, axis=1, keepdims=True) - xp.matmul(self.Q, S) * xp.matmul(self.Z, S)
        projected = xp.matmul(self.Q, device.send(self.R - self.S * np.sum(self.S * self.R, axis=0)))
        return low_rank + self.Om * (self.Y - projected)

    def diagonal_samples(self) -> np.ndarray:
        """:meth:`diagonal_columns` on the host, as a float64 NumPy array (one transfer)."""
        return self.device.read(self.diagonal_columns())[0]

    def diagonal_estimate(self) -> tuple[Array, Array]:
        """The mean of the exchangeable diagonal estimates and its standard error, on :attr:`device`.

        The standard error is the spread of the ``s`` estimates over ``√s``
        (NaN for one estimate), as XTrace's error estimate.
        """
        xp = self.device.xp
        X = self.diagonal_columns()
        s = shape(X)[1]
        mean = xp.sum(X, axis=1) / s
        spread = xp.sum((X - xp.reshape(mean, (-1, 1))) ** 2, axis=1)
        if s < 2:  # one estimate has no spread: NaN, as the other estimators report it
            return mean, spread * float("nan")
        return mean, xp.sqrt(spread / ((s - 1) * s))


def product_eps(op: CurvatureOperator) -> float:
    """Unit roundoff of the operator's products."""
    return machine_epsilon(op.cols.w)


def device_products(apply: DeviceOperator, rows: Array, budget: int, product_dtype: bool = False) -> Array:
    """``(A rowsᵀ)ᵀ`` for device ``rows`` of shape ``(k, n)``, in batched chunks within ``budget`` bytes.

    ``rows`` are in the accumulation dtype (rounded to the products' dtype on
    the way in), or already in the products' dtype when ``product_dtype``;
    the answer is in the accumulation dtype.
    """
    xp, op = apply.xp, apply.op
    k = shape(rows)[0]
    parts = []
    for start, stop in chunks(k, rows_per_chunk(op, budget)):
        block = rows[start:stop]
        if product_dtype:
            parts.append(xp.astype(op._matmat_rows(block), apply.device.dtype))  # v → Av, in the accumulation dtype
        else:
            parts.append(apply(block))  # v → Av
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def _test_vectors(apply: DeviceOperator, rng: np.random.Generator, num: int, distribution: str) -> tuple[Array, Array]:
    """``num`` probes drawn on the host by parameter name, sent once: in the products' dtype and the accumulation's.

    The accumulation copy is the product-dtype one widened, so that the
    algebra sees exactly the vectors the products saw.
    """
    sent = sent_probes(apply.op, rng, num, distribution)
    return sent, apply.xp.astype(sent, apply.device.dtype)


def exchangeable_sketch(
    op: CurvatureOperator, rng: np.random.Generator, num_vectors: int, distribution: str, budget: int
) -> ExchangeableSketch:
    """Test vectors ``Om``, ``Y = A Om``, the basis ``Q`` of its range and ``Z = A Q`` (XTrace, XDiag).

    ``2 · num_vectors`` products at most: ``Z`` needs one per basis vector,
    fewer when ``Y`` is rank deficient.  Everything tall stays on the device.
    """
    apply = DeviceOperator(op)
    xp, device = apply.xp, apply.device
    sent, Om = _test_vectors(apply, rng, num_vectors, distribution)
    Y = device_products(apply, sent, budget, product_dtype=True)  # Om → A Om (rows)
    Q = range_basis(xp.matrix_transpose(Y), apply.eps, device)  # → basis Q of its range (columns)
    Qt = xp.matrix_transpose(Q)
    Z = device_products(apply, Qt, budget) if shape(Q)[1] else Qt  # → A Q (rows)
    return ExchangeableSketch.build(xp.matrix_transpose(Om), xp.matrix_transpose(Y), Q, xp.matrix_transpose(Z), device)


def hutch_plus_plus(
    op: CurvatureOperator, rng: np.random.Generator, num: int, distribution: str, budget: int
) -> tuple[float, np.ndarray]:
    """Hutch++ on the device: the trace of ``A`` on a sketched range, and Hutchinson samples off it.

    ``num // 3`` probes sketch the range (``S → AS → Q``), whose part of the
    trace, ``tr(QᵀAQ)``, is taken exactly; the remaining ``num − 2 (num // 3)``
    probes, drawn after the sketch probes from the same stream and projected
    off the range, give the Hutchinson samples ``gᵀ(I − QQᵀ)A(I − QQᵀ)g``.
    Returns ``tr(QᵀAQ)`` and the samples (host float64); the estimate is
    their sum with the samples' mean.
    """
    apply = DeviceOperator(op)
    xp, device = apply.xp, apply.device
    sketch_size = num // 3
    sent, _ = _test_vectors(apply, rng, sketch_size, distribution)
    _, G = _test_vectors(apply, rng, num - 2 * sketch_size, distribution)
    Q = range_basis(xp.matrix_transpose(device_products(apply, sent, budget, True)), apply.eps, device)  # S → AS → Q
    Qt = xp.matrix_transpose(Q)
    if shape(Q)[1]:
        low_rank = xp.sum(Qt * device_products(apply, Qt, budget))  # tr(QᵀAQ)
        G = G - xp.matmul(xp.matmul(G, Q), Qt)  # probes projected off the sketched range: (I − QQᵀ) g
    else:
        low_rank = xp.sum(G[:0])
    samples = xp.sum(G * device_products(apply, G, budget), axis=1)  # gᵀA g of each projected probe
    low_rank, samples = device.read(xp.reshape(low_rank, (1,)), samples)
    return float(low_rank[0]), samples
