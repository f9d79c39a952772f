"""Krylov machinery on the parameters' device: Lanczos, Lanczos quadrature and power iteration.

Every vector of length ``n`` stays on the device the parameters live on, in
the framework's arrays, and every operation on such vectors goes through the
backend's array-API namespace ``xp``: the products, the Krylov bases, the
Gram-Schmidt orthogonalization, dot products and norms.  What comes back to
the host per step is a handful of scalars (``α``, ``β`` and the norms the
breakdown, convergence and second-pass tests need), read in one transfer
per Gram-Schmidt pass.  The small problems (tridiagonal eigenproblems, Ritz
values, the quadrature rules) are solved on the host in NumPy float64.
Random vectors are drawn on the host from one NumPy seed (so that a seed
means the same numbers in every framework) and sent once per start.

Two dtypes are involved:

* the *product dtype*, that of the parameters: the operator's products run
  in it, and the vectors going into a product are rounded to it;
* the *accumulation dtype*, which the bases, dot products and norms use:
  float64 where the device computes in it (CPUs and CUDA with PyTorch and
  TensorFlow, JAX with ``jax_enable_x64``), float32 otherwise (JAX without
  x64, Apple's MPS).  :func:`accumulation_dtype` finds it by trying a cast
  to float64 on the device and looking at the dtype that comes out.

Thresholds that compare against rounding use the larger machine epsilon of
the two (:attr:`DeviceOperator.eps`): a residual can be resolved no better
than the products and the arithmetic that measure it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import Array, Namespace, dtype_name, machine_epsilon, shape
from ._operator import CurvatureOperator

RandomVector = Callable[[], np.ndarray]
"""A fresh standard normal vector of length ``n`` (float64, on the host) at each call."""

_INITIAL_ROWS = 32
"""Rows a writable basis buffer holds before it first grows (it doubles after that)."""

_REPEAT_BELOW = 1e-3
"""Gram-Schmidt runs a second pass when a vector keeps less than this fraction of its norm."""


# ----------------------------------------------------------------------
# Arrays on the device: dtype, transfers, products
# ----------------------------------------------------------------------
def accumulation_dtype(xp: Namespace, like: Array) -> Any:
    """The dtype the Krylov code accumulates in on the device of ``like``: float64 if it has it, else float32.

    Found by trying: one entry of ``like`` is cast to float64 and the dtype
    that comes out is looked at.  JAX without ``jax_enable_x64`` silently
    answers float32 (and warns, which is silenced here); Apple's MPS raises.
    """
    probe = xp.reshape(like, (-1,))[:1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wide = xp.astype(probe, xp.float64)
        if dtype_name(wide) == "float64":
            return xp.float64
    except Exception:  # a device without float64 refuses the cast (MPS: TypeError); anything else means the same
        pass
    return xp.float32


class Device:
    """Vectors on one device in the accumulation dtype: the namespace, sends to it and reads from it.

    Parameters
    ----------
    xp : namespace
        The array-API namespace of the arrays.
    like : Array
        An array on the device, in the accumulation dtype (one entry is enough).
    read : callable
        ``read(x) -> ndarray``: an array copied to the host (the backend's ``to_numpy``).
    send : callable
        ``send(a) -> Array``: NumPy data on the device, floats in the dtype of ``like``.
    compile : callable, optional
        The backend's :meth:`~multihess.Backend.compile`, for the steps whose shapes repeat.
    """

    def __init__(
        self,
        xp: Namespace,
        like: Array,
        read: Callable[[Array], Any],
        send: Callable[[np.ndarray], Array],
        compile: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    ):
        self.xp = xp
        self.compile = compile
        self.like = like
        self.dtype = like.dtype
        self.eps = machine_epsilon(like)
        self._read = read
        self._send = send
        self.writable = _is_writable(xp, like)

    @classmethod
    def of(cls, backend: Any, w: Array) -> Device:
        """The device of the parameters ``w``, in the accumulation dtype of that device."""
        xp = backend.xp
        like = xp.astype(xp.reshape(w, (-1,))[:1], accumulation_dtype(xp, w))
        return cls(xp, like, backend.to_numpy, lambda a: backend.asarray(a, like), backend.compile)

    @classmethod
    def numpy(cls) -> Device:
        """Host NumPy arrays in float64 (the sketch algebra on NumPy inputs)."""
        import array_api_compat.numpy as xp

        return cls(xp, np.zeros(1), np.asarray, lambda a: np.asarray(a, dtype=np.float64))

    def read(self, *arrays: Array) -> list[np.ndarray]:
        """Copy small arrays to the host in one transfer, as float64 arrays of their own shapes."""
        xp = self.xp
        shapes = [shape(a) for a in arrays]
        flat = arrays[0] if len(arrays) == 1 else xp.concat([xp.reshape(a, (-1,)) for a in arrays])
        host = np.asarray(self._read(flat), dtype=np.float64).reshape(-1)
        out, start = [], 0
        for dims in shapes:
            size = int(np.prod(dims, dtype=np.int64))
            out.append(host[start : start + size].reshape(dims))
            start += size
        return out

    def send(self, a: np.ndarray) -> Array:
        """Host data on the device, in the accumulation dtype."""
        return self._send(np.ascontiguousarray(a, dtype=np.float64))

    def empty(self, dims: tuple[int, ...]) -> Array:
        """An uninitialized array on the device (``zeros`` where the namespace has no ``empty``).

        For the buffers of writable arrays, whose rows are read only once written:
        a zero fill would write the whole basis once more before any row is used.
        """
        make = getattr(self.xp, "empty", self.xp.zeros)
        device = getattr(self.like, "device", None)
        if device is None:
            return make(dims, dtype=self.dtype)
        return make(dims, dtype=self.dtype, device=device)


def _is_writable(xp: Namespace, like: Array) -> bool:
    """Whether arrays of this namespace take item assignment (PyTorch, NumPy); JAX and TensorFlow refuse it."""
    probe = xp.zeros_like(like)
    try:
        probe[0:1] = like
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return False
    return True


class DeviceOperator:
    """Products of a curvature operator with vectors of the accumulation dtype, on the parameters' device.

    A block of rows is rounded to the product dtype, goes through
    ``op._matmat_rows`` once (so that the operator's cached graphs and
    compiled functions serve every step) and comes back in the accumulation
    dtype, without leaving the device.

    Attributes
    ----------
    device : Device
        The vectors' device and accumulation dtype.
    eps_product : float
        Machine epsilon of the products' dtype.
    eps : float
        The larger of ``eps_product`` and the accumulation dtype's: the
        relative precision anything computed from products can have.
    """

    def __init__(self, op: CurvatureOperator) -> None:
        self.op = op
        self.backend = op.backend
        self.xp = op.backend.xp
        self.device = Device.of(op.backend, op.cols.w)
        self.product_dtype = op.cols.w.dtype
        self.eps_product = machine_epsilon(op.cols.w)
        self.eps = max(self.eps_product, self.device.eps)
        self._same_dtype = dtype_name(op.cols.w) == dtype_name(self.device.like)

    def __call__(self, rows: Array) -> Array:
        """``(A rowsᵀ)ᵀ`` for ``rows`` of shape ``(k, n)`` in the accumulation dtype; answered in it."""
        if self._same_dtype:
            return self.op._matmat_rows(rows)  # v → Av
        xp = self.xp
        down = xp.astype(rows, self.product_dtype)  # v → v in the products' dtype
        return xp.astype(self.op._matmat_rows(down), self.device.dtype)  # → Av → Av in the accumulation dtype

    def to_product_dtype(self, x: Array) -> Array:
        """``x`` in the parameters' dtype (what the user gets back)."""
        return x if self._same_dtype else self.xp.astype(x, self.product_dtype)


# ----------------------------------------------------------------------
# Small host-side helpers
# ----------------------------------------------------------------------
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


# ----------------------------------------------------------------------
# Orthonormal rows on the device
# ----------------------------------------------------------------------
class Rows:
    """Orthonormal rows on the device, in the accumulation dtype, with classical Gram-Schmidt against them.

    The rows are vectors of length ``n``, possibly several independent sets
    at once (a leading batch shape: one basis per starting vector in
    Lanczos quadrature).  They are kept as a few arrays of shape
    ``(*batch, rows, n)``:

    * writable arrays (PyTorch, NumPy) fill one preallocated buffer in
      place, which doubles when full: a step copies nothing;
    * immutable arrays (JAX, TensorFlow) keep the rows as they come and
      join them into frozen blocks only when a pass over the whole basis
      (or :meth:`combine`) needs them, merging a new block into the one
      before it while it is at least half as large: a step copies nothing
      (joining arrays eagerly is slow: 1.4 ms for 8 rows of 2·10⁵ float64
      in JAX on a CPU, ten times a pass over them), a run that never
      needs the whole basis (20 steps of a semi-orthogonal Lanczos) joins
      nothing, each row is copied ``O(log m)`` times, and the frozen
      blocks, which more than halve in size, are at most ``log₂ m + 1``.
      The newest row always stays apart, as it came.

    Vectors handled against the basis are shaped ``(*batch, 1, n)``.
    """

    def __init__(self, device: Device, batch: tuple[int, ...], n: int, capacity: int) -> None:
        self.device = device
        self.batch = batch
        self.n = n
        self.size = 0
        self._buffer: Array | None = None
        self._capacity = max(1, min(capacity, n))
        self._frozen: list[Array] = []
        self._tail: list[Array] = []  # the rows not yet joined, each (*batch, 1, n): never empty once a row came
        # Immutable arrays pay a dispatch per operation, and passes against the last few rows repeat their
        # shapes: those run as one compiled call.  Writable arrays keep the pass that works in place.
        compile = None if device.writable else device.compile
        self._compiled_pass = None if compile is None else _compiled_pass(compile, device.xp)

    # -------------------------------------------------------------- storage
    def parts(self) -> list[Array]:
        """The rows, in order, as a list of ``(*batch, rows, n)`` arrays (no copy where arrays are writable)."""
        if self.device.writable:
            return [self._buffer[..., : self.size, :]] if self.size else []
        self._freeze()
        return self._frozen + self._tail

    def _freeze(self) -> None:
        """Join every row but the newest into frozen blocks, so that a pass over them takes two products per block.

        One product per row cost TensorFlow 8-10 ms per pass against 16
        rows of 6·10⁴ entries (eager dispatch), one block 1 ms.  The new
        block is merged into the one before while it is at least half as
        large, so that sizes more than halve from each block to the next.
        """
        if len(self._tail) < 2:
            return
        xp = self.device.xp
        older, self._tail = self._tail[:-1], self._tail[-1:]
        self._frozen.append(older[0] if len(older) == 1 else xp.concat(older, axis=-2))
        while len(self._frozen) > 1 and 2 * shape(self._frozen[-1])[-2] >= shape(self._frozen[-2])[-2]:
            last = self._frozen.pop()
            self._frozen[-1] = xp.concat([self._frozen[-1], last], axis=-2)

    def _slot(self) -> Array:
        """The storage of the next row of a writable buffer, grown when full."""
        if self._buffer is None:
            self._buffer = self.device.empty((*self.batch, self._capacity, self.n))
        elif self.size == shape(self._buffer)[-2]:
            grown = self.device.empty((*self.batch, 2 * self.size, self.n))
            grown[..., : self.size, :] = self._buffer
            self._buffer = grown
        return self._buffer[..., self.size : self.size + 1, :]

    def append_scaled(self, w: Array, scale: float) -> Array:
        """Add ``scale · w`` as a row and return it (the buffer's own storage where arrays are writable)."""
        if not self.device.writable:
            row = w * scale
            self.append(row)
            return row
        row = self._slot()
        row[...] = w
        row *= scale
        self.size += 1
        return row

    def append(self, row: Array) -> None:
        """Add one row per batch entry: ``row`` has shape ``(*batch, 1, n)``."""
        if self.device.writable:
            self._slot()[...] = row
        else:
            self._tail.append(row)
        self.size += 1

    def combine(self, coefs: np.ndarray) -> Array:
        """``C Q`` for host coefficients ``C`` of shape ``(k, size)`` (no batch): shape ``(k, n)``."""
        xp, total, start = self.device.xp, None, 0
        for part in self.parts():
            stop = start + shape(part)[-2]
            term = xp.matmul(self.device.send(coefs[:, start:stop]), part)
            total = term if total is None else total + term
            start = stop
        return total

    # -------------------------------------------------------------- Gram-Schmidt
    def recent(self, count: int) -> list[Array]:
        """The last ``count`` rows (or all, if fewer), as :meth:`parts` gives them (no copy)."""
        count = min(count, self.size)
        if self.device.writable:
            return [self._buffer[..., self.size - count : self.size, :]]
        rows = self._tail[-count:]
        missing = count - len(rows)
        for block in reversed(self._frozen):  # the rest from the ends of the frozen blocks, newest first
            if missing == 0:
                break
            size = shape(block)[-2]
            rows.insert(0, block[..., max(0, size - missing) :, :])
            missing -= min(size, missing)
        return rows

    def _older(self) -> list[Array]:
        """Every row but the newest, as :meth:`parts` gives them (no copy)."""
        if self.device.writable:
            return [self._buffer[..., : self.size - 1, :]] if self.size > 1 else []
        self._freeze()
        return list(self._frozen)

    def reorthogonalize_newest(self) -> None:
        """Replace the newest row by itself minus its projection on the others (one classical pass).

        Meant for a row already orthogonal to the others up to ``δ ≪ 1``:
        its norm then moves by ``δ²/2``, below the arithmetic's precision
        for ``δ ≤ √ε``, so it is not normalized again (which would cost a read).
        """
        older = self._older()
        if not older:
            return
        newest = self.recent(1)[0]
        row, _, _ = self._pass(newest, older)
        if self.device.writable:
            self._buffer[..., self.size - 1 : self.size, :] = row
            return
        self._tail[-1] = row

    def _pass(self, w: Array, parts: list[Array]) -> tuple[Array, Array, Array]:
        """:func:`_project` against the rows in ``parts`` (:meth:`parts`, or some of them), op by op."""
        return _project(self.device.xp, w, parts)

    def orthogonalize(
        self, w: Array, active: np.ndarray | None = None, recent: int | None = None
    ) -> tuple[Array, np.ndarray, np.ndarray, np.ndarray]:
        """``w`` minus its projection on the rows (or the last ``recent``), by classical Gram-Schmidt, once or twice.

        Returns the new ``w``, the coefficient on the newest row (both passes
        together) and the norms of ``w`` before and after, as host float64
        arrays of the batch shape: one transfer of three scalars per batch
        entry and pass.  The norm before is ``√(‖w_after‖² + ‖Qᵀw‖²)``
        (Pythagoras, as ``Q`` is orthonormal), which saves a pass over ``w``.
        A pass leaves ``w`` orthogonal to the rows up to about
        ``ε · ‖w_before‖ / ‖w_after‖``; a second pass runs when that ratio
        exceeds ``1 / _REPEAT_BELOW`` (the criterion of Daniel, Gragg, Kaufman
        and Stewart 1976, with a threshold that keeps the basis orthonormal to
        a few ε) for any entry of the batch that is ``active`` (all when ``None``).
        """
        parts = self.parts() if recent is None else self.recent(recent)
        w, after2, removed, last = self._pass_and_read(w, parts)
        after, before = np.sqrt(after2), np.sqrt(after2 + removed)
        needs = after <= _REPEAT_BELOW * before
        if np.any(needs if active is None else needs & active):
            w, after2, _, last2 = self._pass_and_read(w, parts)
            after, last = np.sqrt(after2), last + last2
        return w, last, before, after

    def _pass_and_read(self, w: Array, parts: list[Array]) -> tuple[Array, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_pass`, then ``‖w‖²``, ``‖Qᵀw‖²`` and the last coefficient, read in one transfer.

        The three come back as host arrays of the batch shape.  A pass
        against one small block runs compiled where that helps (see ``__init__``).
        """
        if self._compiled_pass is not None and len(parts) <= 2 and sum(shape(p)[-2] for p in parts) <= 2:
            w, scalars = self._compiled_pass(w, parts)
        else:
            xp = self.device.xp
            w, last, removed = self._pass(w, parts)
            scalars = xp.concat([xp.reshape(x, (-1,)) for x in (_squares(xp, w), removed, last)])
        (host,) = self.device.read(scalars)
        after2, removed2, last2 = (part.reshape(self.batch) for part in np.split(host, 3))
        return w, after2, removed2, last2


@functools.lru_cache(maxsize=8)
def _compiled_pass(compile: Callable[[Callable[..., Any]], Callable[..., Any]], xp: Namespace) -> Callable[..., Any]:
    """``(w, parts) -> (w − QQᵀw, [‖·‖², ‖Qᵀw‖², last coefficient])`` for the rows ``Q`` in ``parts``.

    Compiled once per framework and kept across calls (and Lanczos runs),
    so that each shape of ``w`` and ``parts`` is traced once: meant for a
    pass against the last row or two.  The scalars come out side by side,
    for one read.
    """

    def one_pass(w: Array, parts: list[Array]) -> tuple[Array, Array]:
        out, last, removed = _project(xp, w, parts)
        scalars = [_squares(xp, out), removed, last]
        return out, xp.concat([xp.reshape(x, (-1,)) for x in scalars])

    return compile(one_pass)


def _project(xp: Namespace, w: Array, parts: list[Array]) -> tuple[Array, Array, Array]:
    """One classical Gram-Schmidt pass: ``w − QQᵀw``, the coefficient on the last row of ``Q`` and ``‖Qᵀw‖²``.

    ``Q`` is the rows in ``parts``, shaped ``(*batch, rows, n)``, taken part
    by part: joining them would copy every row at each pass.  The column
    ``wᵀ`` is a transposed view, which matmul reads in place (TensorFlow
    took twice as long for a reshaped copy).  Compiled against the last two
    rows, this form was 10 % faster than the joined one in JAX float32,
    30 % in float64 and 5 % in TensorFlow, for ``n = 2·10⁵``.
    """
    column = xp.matrix_transpose(w)
    coefs = [xp.matmul(part, column) for part in parts]  # w → Qᵀw, part by part
    out = None
    for part, c in zip(parts, coefs):
        # The coefficients are negated (a few numbers) so that the part's product, a new array, takes w in
        # place where arrays are writable: w itself is never written (it may be a product's input), and no
        # other array of length n is made.
        term = xp.matmul(-xp.matrix_transpose(c), part)  # → −Q Qᵀw
        if out is None:
            term += w  # → w − Q Qᵀw
            out = term
        else:
            out += term
    removed = sum(xp.sum(c * c, axis=(-2, -1)) for c in coefs)
    return out, coefs[-1][..., -1, 0], removed


def _squares(xp: Namespace, w: Array) -> Array:
    """``‖w‖²`` along the last axis, as an elementwise product and a sum.

    Never far from the fastest way in any framework.  On a CPU, for
    ``n = 2·10⁵``: ``vecdot`` takes 0.03-0.08 ms in PyTorch but 0.8 ms in JAX
    (float32); ``(1, n) @ (n, 1)`` takes 0.14 ms in JAX but 0.2-0.3 ms in
    PyTorch (float64); this takes 0.08-0.5 ms in PyTorch, JAX and TensorFlow.
    """
    return xp.sum(w * w, axis=-1)


def _fresh_direction(basis: Rows, draw: RandomVector) -> Array | None:
    """A random unit row ``(1, n)`` orthogonal to the basis, or ``None`` when none is left.

    A random vector keeps a fraction of about ``√((n − m) / n)`` of its norm
    off an ``m``-dimensional basis; one that keeps less than the square
    root of the accumulation epsilon is rounding, not a direction.
    """
    keep = float(np.sqrt(basis.device.eps))
    for _ in range(3):
        w = basis.device.send(draw()[None, :])
        w, _, before, after = basis.orthogonalize(w)
        if float(after) > keep * float(before):
            return w / float(after)
    return None


# ----------------------------------------------------------------------
# How far from orthogonal the Lanczos vectors drift: Simon's recurrence
# ----------------------------------------------------------------------
class Semiorthogonality:
    """Bounds on ``|q_{j+1}ᵀ q_k|`` for the Lanczos vectors, from ``α`` and ``β`` alone (Simon's ω recurrence).

    Reorthogonalizing every new vector against the whole basis reads the
    basis twice per step, ``2 m n`` numbers at step ``m``: with products as
    cheap as a small network's on a CPU, that costs more than the products.
    Yet the tridiagonal matrix's eigenvalues are those of ``A`` on the
    Krylov space, to the products' precision, as long as the basis stays
    *semi-orthogonal*, every ``|q_iᵀ q_k| ≤ √ε`` (Simon 1984, "The Lanczos
    algorithm with partial reorthogonalization", Math. Comp. 42).  The
    Lanczos recurrence itself says how the inner products grow:

    ``β_j ω_{j+1,k} = β_k ω_{j,k+1} + (α_k − α_j) ω_{j,k} + β_{k−1} ω_{j,k−1} − β_{j−1} ω_{j−1,k}``

    plus the rounding of one step, ``ε ‖A‖`` (taken with the sign that makes
    the bound grow).  So each new vector is orthogonalized against the last
    two only, these bounds are updated on the host (``O(j)`` numbers), and
    a vector is reorthogonalized against the whole basis when a bound
    passes ``√ε``.  The current vector is then reorthogonalized too, as
    Simon prescribes: the recurrence carries its error into every later
    vector, and resetting only the new vector's bounds would hide it.

    Parameters
    ----------
    eps : float
        The relative precision of the products and of the arithmetic (the coarser).

    Examples
    --------
    On the identity, Lanczos meets no rounding that grows: the bounds stay at ``ε``.

    >>> omega = Semiorthogonality(eps=1e-16)
    >>> omega.bound([1.0], [], b=1.0, scale=1.0)
    0.0
    >>> omega.accept(reorthogonalized=False)
    >>> omega.bound([1.0, 1.0], [1.0], b=1.0, scale=1.0) <= 1e-15
    True
    """

    def __init__(self, eps: float, batch: tuple[int, ...] = ()) -> None:
        self.eps = eps
        self.limit = float(np.sqrt(eps))
        self._current = np.ones((*batch, 1))  # ω_{j,k} for k = 0..j (ω_{j,j} = 1), per basis of the batch
        self._previous = np.zeros((*batch, 0))  # ω_{j−1,k} for k = 0..j−1
        self._next: np.ndarray | None = None

    def bound(self, alpha: Any, beta: Any, b: Any, scale: Any) -> Any:
        """The largest bound on ``|q_{j+1}ᵀ q_k|``, ``k < j``, for ``q_{j+1} = w / b`` (``j = len(beta)``).

        ``alpha`` (``j + 1`` values) and ``beta`` (``j``) run along the last
        axis; a batch of bases puts its shape before it, and ``b`` and
        ``scale`` have that shape.  Answers a float, or an array of the batch shape.
        """
        a, bt, cur = np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64), self._current
        j = bt.shape[-1]
        b = np.asarray(b, dtype=np.float64)[..., None]
        noise = self.eps * np.asarray(scale, dtype=np.float64)[..., None]
        t = (a[..., :j] - a[..., j : j + 1]) * cur[..., :j] + bt * cur[..., 1 : j + 1]
        t[..., 1:] += bt[..., : j - 1] * cur[..., : j - 1]
        if j:
            t -= bt[..., j - 1 : j] * self._previous[..., :j]
        new = np.empty((*cur.shape[:-1], j + 2))
        with np.errstate(divide="ignore", invalid="ignore"):  # b = 0: a breakdown, reorthogonalized anyway
            new[..., :j] = (t + np.where(t < 0, -noise, noise)) / b
            new[..., max(j - 1, 0) : j + 1] = noise / b  # what one pass against q_{j−1} and q_j leaves
        new[..., j + 1] = 1.0
        self._next = new
        worst = np.max(np.abs(new[..., :j]), axis=-1, initial=0.0)
        return float(worst) if worst.ndim == 0 else worst

    def accept(self, reorthogonalized: bool) -> None:
        """Move on to the vector whose bounds :meth:`bound` gave.

        ``reorthogonalized``: that vector and the current one were both
        orthogonalized against the whole basis (every basis of a batch), so
        both bounds start again from ``ε``.
        """
        new = self._next
        if reorthogonalized:
            dims = self._current.shape
            new, current = np.full((*dims[:-1], dims[-1] + 1), self.eps), np.full(dims, self.eps)
            new[..., -1] = current[..., -1] = 1.0
            self._current = current
        self._previous, self._current, self._next = self._current, new, None


# ----------------------------------------------------------------------
# Lanczos with partial reorthogonalization, for extreme eigenpairs
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
        Bounds on ``‖A x_i - θ_i x_i‖`` for each Ritz pair (``β_m |e_mᵀ y_i|``,
        0 where the Krylov space was found invariant).
    basis : Rows
        The Lanczos vectors, on the device (``basis.combine(Y)`` gives Ritz vectors).
    converged : bool
        Whether the wanted values met the tolerance (or the space was exhausted).
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    basis: Rows
    converged: bool


def lanczos_extreme(
    apply: DeviceOperator,
    n: int,
    k: int,
    which: str,
    max_steps: int,
    tol: float,
    breakdown: float,
    draw: RandomVector,
    resolution: float = 0.0,
) -> LanczosResult:
    """Lanczos on a symmetric ``n × n`` operator until ``k`` wanted Ritz values converge.

    A Ritz pair ``(θ_i, x_i)`` has converged when ``β_m |e_mᵀ y_i| ≤ tol · s``,
    with ``s`` the largest of ``|θ|`` and the norms ``‖A q_j‖`` seen so far.
    That estimate keeps shrinking below the rounding of the products, which
    the true residual cannot: a ``tol`` below ``resolution`` (the relative
    residual the products resolve) is never reported as met, and the run
    goes on to ``max_steps``.

    When the residual ``β`` falls below ``breakdown · s`` the recurrence
    cannot go on: the basis is extended with a random vector orthogonal to
    it, the tridiagonal matrix decouples there (``β = 0``), and the
    recurrence goes on in the complement, where further copies of repeated
    eigenvalues live.  The Krylov space is taken as invariant, and its Ritz
    pairs as exact, only when ``β ≤ tol · s`` as well: a ``breakdown`` above
    ``tol`` (the products cannot resolve ``tol``) never certifies a
    tolerance the residual does not meet.  After a breakdown the run ends
    when the current block cannot change the ``k`` wanted values (see
    :func:`_later_block_done`).

    Each step is one product, one or two Gram-Schmidt passes against the
    last two Lanczos vectors on the device and one host read of three
    scalars per pass.  When :class:`Semiorthogonality` says rounding has
    grown past ``√ε``, the newest vector and the next are orthogonalized
    against the whole basis as well (once or twice, a read each); after a
    breakdown every step is.
    """
    device = apply.device
    basis = Rows(device, (), n, min(max_steps, _INITIAL_ROWS))
    start = draw()
    # Not np.linalg.norm: its BLAS dot wakes OpenBLAS's threads, which then spin beside the framework's
    # products on the same cores (20 steps on a 2-core CPU took 180 ms instead of 120).
    q = device.send(start[None, :] / np.sqrt(np.sum(start * start)))
    basis.append(q)
    alpha: list[float] = []
    beta: list[float] = []
    scale = 0.0
    block_start = 0  # first index of the current invariant-subspace block
    reachable = tol >= resolution
    omega: Semiorthogonality | None = Semiorthogonality(apply.eps)  # None: every step fully (after a breakdown)
    while True:
        w = apply(q)  # v → Av
        # Minus its projection on the last two Lanczos vectors: the last coefficient is the recurrence's α_j,
        # the other β_{j-1}.  The rest of the basis is left to partial reorthogonalization.
        w, last, norm_aq, b = basis.orthogonalize(w, recent=None if omega is None else 2)
        b, last = float(b), float(last)
        scale = max(scale, float(norm_aq))
        if omega is not None:
            full = b <= breakdown * scale or omega.bound([*alpha, last], beta, b, scale) > omega.limit
            if full:
                # Rounding has grown past √ε (or the recurrence breaks down, which only a residual orthogonal
                # to everything can tell): q_j and w, minus their projections on every earlier Lanczos vector.
                basis.reorthogonalize_newest()
                w, more, _, b = basis.orthogonalize(w)
                b, last = float(b), last + float(more)
            if b > 0.0:
                omega.accept(full)
        alpha.append(last)
        m = basis.size
        exhausted = m == n
        broke = b <= breakdown * scale
        last_step = exhausted or m >= max_steps
        # A tolerance below what the products resolve is never met: the Ritz values are then needed only at the end.
        if broke or last_step or (reachable and m >= k and _check_now(m)):
            values, vectors = np.linalg.eigh(tridiagonal(np.array(alpha), np.array(beta)))
            scale = max(scale, float(np.max(np.abs(values))))
            exact = exhausted or (broke and b <= tol * scale)
            residuals = (0.0 if exact else b) * np.abs(vectors[-1, :])
            idx = wanted_indices(values, k, which)
            if not reachable:
                converged = False
            elif exhausted:
                converged = True
            elif block_start == 0:
                # Standard Lanczos: the wanted Ritz pairs are accurate.  A first breakdown
                # goes on instead, to look for further copies of the eigenvalues found.
                converged = not broke and len(idx) == k and bool(np.all(residuals[idx] <= tol * scale))
            else:
                converged = _later_block_done(alpha, beta, block_start, b, exact, values[idx], k, which, tol * scale)
            if converged or last_step:
                break
        if broke:
            fresh = _fresh_direction(basis, draw)
            if fresh is None:  # rounding made the basis span everything already
                values, vectors = np.linalg.eigh(tridiagonal(np.array(alpha), np.array(beta)))
                residuals, converged = np.zeros(m), reachable
                break
            block_start = m
            omega = None  # the later blocks keep the whole basis orthogonal at every step
            beta.append(0.0)
            q = fresh
            basis.append(q)
        else:
            beta.append(b)
            q = basis.append_scaled(w, 1.0 / b)  # the next Lanczos vector w / β
    return LanczosResult(values, vectors, residuals, basis, converged)


def _later_block_done(
    alpha: list[float],
    beta: list[float],
    block_start: int,
    b: float,
    exact: bool,
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
    find) have converged (or the block is itself ``exact``, after a breakdown).
    """
    T = tridiagonal(np.array(alpha), np.array(beta))
    before = np.linalg.eigvalsh(T[:block_start, :block_start])
    kept = before[wanted_indices(before, k, which)]
    if len(kept) < k or not np.allclose(kept, wanted, rtol=0, atol=atol):
        return False
    if exact:
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
    apply: DeviceOperator, starts: np.ndarray, num_steps: int, breakdown: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature nodes and weights of ``vᵀ f(A) v`` for each starting row ``v``.

    All starting vectors advance together, one batched product per step; each
    has its own basis, against which it is kept semi-orthogonal as in
    :func:`lanczos_extreme` (a full pass for every start when any needs
    one), all on the device (the starts, drawn on the host, are sent once).  When a start's
    Krylov space becomes invariant after ``m < num_steps`` steps its
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
    device, xp = apply.device, apply.xp
    p, n = starts.shape
    norms = np.linalg.norm(starts, axis=1)
    bases = Rows(device, (p,), n, num_steps)
    alpha = np.zeros((p, num_steps))
    beta = np.zeros((p, num_steps))
    steps = np.zeros(p, dtype=int)
    active = np.ones(p, dtype=bool)
    scale = np.zeros(p)
    omega = Semiorthogonality(apply.eps, (p,))
    Q = device.send(starts / norms[:, None])  # (p, n): one transfer for all starts
    for j in range(num_steps):
        bases.append(xp.reshape(Q, (p, 1, n)))
        W = xp.reshape(apply(Q), (p, 1, n))  # v → Av for every start at once
        # Minus each start's projection on its last two Lanczos vectors (the last coefficient is α_j).
        W, a, norm_aq, b = bases.orthogonalize(W, active, recent=2)
        scale = np.maximum(scale, norm_aq)
        bounds = omega.bound(np.concatenate([alpha[:, :j], a[:, None]], axis=1), beta[:, :j], b, scale)
        full = bool(np.any(active & ((b <= breakdown * scale) | (bounds > omega.limit))))
        if full:  # as in lanczos_extreme, for every start at once
            bases.reorthogonalize_newest()
            W, more, _, b = bases.orthogonalize(W, active)
            a = a + more
        omega.accept(full)
        alpha[active, j] = a[active]
        steps[active] = j + 1
        active &= b > breakdown * scale
        if j + 1 == num_steps or not active.any():
            break
        beta[active, j] = b[active]
        # Next vectors w / β; a start that stopped keeps its last vector, only to hold the product's shape.
        factors = device.send(np.stack([np.where(active, 1.0 / np.where(active, b, 1.0), 0.0), ~active * 1.0]))
        Q = xp.reshape(W, (p, n)) * xp.reshape(factors[0], (p, 1)) + Q * xp.reshape(factors[1], (p, 1))
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
    apply: DeviceOperator, n: int, k: int, which: str, max_steps: int, tol: float, draw: RandomVector
) -> tuple[np.ndarray, Array, bool]:
    """The ``k`` wanted eigenpairs by power iteration, deflating found vectors by projection.

    Each pair is iterated until ``‖A x - θ x‖ ≤ tol · s``, with ``s`` the
    magnitude of the dominant eigenvalue (found first), at most ``max_steps``
    products per pair, in the complement of the vectors found before.  Plain
    power iteration finds the largest magnitudes; for the largest algebraic
    values the operator is shifted by ``s``, which makes every eigenvalue of
    ``A + sI`` non-negative and orders them as ``A``'s.  The iterates stay on
    the device; each step reads ``θ``, the residual and a norm.

    Returns
    -------
    values : ndarray, shape (k,)
    vectors : Array, shape (k, n)
        The eigenvectors as rows, on the device, in the accumulation dtype.
    converged : bool
    """
    device, xp = apply.device, apply.xp
    found: Array | None = None
    values: list[float] = []
    converged = True

    def deflated(v: Array) -> Array:
        if found is None:
            return v
        c = xp.matmul(found, xp.reshape(v, (n, 1)))  # v → F v, the coefficients on the found vectors
        return v - xp.matmul(xp.reshape(c, (1, shape(found)[0])), found)  # → v − Fᵀ F v

    def unit(v: Array) -> Array:
        (squared,) = device.read(_squares(xp, v))
        return v / float(np.sqrt(squared[0]))

    def one_pair(shift: float, scale: float) -> tuple[float, Array]:
        nonlocal converged
        x = unit(deflated(device.send(draw()[None, :])))
        theta = 0.0
        for _ in range(max_steps):
            y = apply(x)  # x → Ax
            y = deflated(y + shift * x if shift else y)  # → (A + sI) x, off the found vectors
            theta_d = xp.sum(x * y, axis=-1)  # θ = xᵀ(A + sI)x, shape (1,)
            r = y - xp.reshape(theta_d, (1, 1)) * x  # the residual, measured directly (no cancellation)
            theta, residual2, norm2 = (float(v[0]) for v in device.read(theta_d, _squares(xp, r), _squares(xp, y)))
            residual, norm = float(np.sqrt(residual2)), float(np.sqrt(norm2))
            if residual <= tol * (scale or abs(theta)):
                return theta - shift, x
            if norm == 0.0:  # x lies in the null space of the deflated operator: θ = 0 exactly
                return theta - shift, x
            x = y / norm
        converged = False
        return theta - shift, x

    def keep(x: Array) -> Array:
        # Orthonormal against the found vectors even when a pair stopped short of convergence.
        x = unit(deflated(deflated(x)))
        return x if found is None else xp.concat([found, x], axis=0)

    dominant, x = one_pair(0.0, 0.0)
    scale = abs(dominant)
    shift = 0.0
    if which == "magnitude" or dominant >= 0.0:
        # The dominant eigenvalue is also the largest one unless it is negative.
        found = keep(x)
        values.append(dominant)
    if which == "largest":
        shift = scale
    while len(values) < k:
        value, x = one_pair(shift, scale)
        found = keep(x)
        values.append(value)
    return np.array(values), found, converged
