"""The lazy linear operator every curvature matrix is exposed as, and its algebra.

Return types follow one rule across the library: numbers that describe the
operator as a whole (traces, norms, eigenvalues, densities, chain-rule
errors) are NumPy float64 values on the host; anything indexed by parameters
(products, diagonals, eigenvectors, dense matrices) is an array of the
model's framework, in the parameters' dtype and on their device, or a tree
shaped like the parameters when a tree went in.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from ._arrays import all_finite, device_name, dtype_name, is_floating, itemsize, shape
from ._backend import Array, Backend, ParameterBinding
from ._progress import planned_passes

DENSE_CHUNK = 64
"""Columns computed per batched product when building a dense matrix."""

DENSE_BYTES_LIMIT = 4 * 2**30
"""Largest dense matrix :meth:`CurvatureOperator.dense` builds (4 GiB); bigger ones are refused before allocating."""


class CurvatureOperator:
    """A matrix ``A`` of shape ``(m, n)`` known through its products.

    Vectors go in and come out as flat 1-D arrays of the model's framework, or
    as trees shaped like the parameters (answered in the same form).

    The interface estimators rely on is small and public: :attr:`shape`,
    :attr:`dtype`, :attr:`device`, :attr:`backend` and the batched product
    :meth:`apply_rows`.  Estimators accept a ``CurvatureOperator``, a square
    dense matrix of a framework, or any object with ``shape``, ``dtype``,
    ``backend`` and ``apply_rows`` (see :func:`as_operator`).  Operators
    combine: ``H - G``, ``H + G``, ``2.0 * H``, ``-H``, ``H / 4`` and the
    damped ``H.damped(λ)`` (``H + λI``), each product equal to the
    combination; :meth:`to_scipy` exports a SciPy ``LinearOperator``.

    Subclasses implement :meth:`_matmat_rows`.

    Parameters
    ----------
    backend : Backend
        The framework the products run in.
    rows, cols : ParameterBinding
        The parameters indexing the rows and the columns (the same binding
        for a diagonal block such as the Hessian of a subset).
    check_finite : bool
        Whether user-facing products reject vectors with NaN or inf.

    Examples
    --------
    >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> H = mh.hessian(lambda w: w @ A @ w / 2, torch.zeros(2, dtype=torch.float64))
    >>> H
    HessianOperator(shape=(2, 2), dtype=float64, device=cpu, backend='torch')
    >>> (H - 0.5 * H).dense().tolist()
    [[1.0, 0.5], [0.5, 1.5]]
    >>> H.damped(1.0) @ torch.ones(2, dtype=torch.float64)
    tensor([4., 5.], dtype=torch.float64)
    """

    def __init__(
        self, backend: Backend, rows: ParameterBinding, cols: ParameterBinding, check_finite: bool = True
    ) -> None:
        self.backend = backend
        self.rows = rows
        self.cols = cols
        self.check_finite = check_finite

    # ------------------------------------------------------------------
    # Shape and type
    # ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: parameters of the rows, parameters of the columns."""
        return (self.rows.size, self.cols.size)

    @property
    def dtype(self) -> Any:
        """The framework dtype of the products (that of the parameters)."""
        return self.cols.w.dtype

    @property
    def device(self) -> str:
        """The device the products run on, as the framework names it (``"cpu"``, ``"cuda:0"``)."""
        return device_name(self.cols.w)

    @property
    def is_symmetric(self) -> bool:
        """Whether rows and columns are the same parameters."""
        return self.rows is self.cols

    @property
    def T(self) -> CurvatureOperator:  # noqa: N802 - NumPy's name
        """The transpose: the operator itself when symmetric, the mirrored block otherwise."""
        if self.is_symmetric:
            return self
        raise NotImplementedError(f"{type(self).__name__} has no transpose")

    def __repr__(self) -> str:
        return (
            f"{self._label_repr()}(shape={self.shape}, dtype={dtype_name(self.cols.w)}, device={self.device}, "
            f"backend={self.backend.name!r})"
        )

    def _label_repr(self) -> str:
        """How this operator reads inside the repr of a combination."""
        return type(self).__name__

    # ------------------------------------------------------------------
    # Products
    # ------------------------------------------------------------------
    def __matmul__(self, v: Any) -> Any:
        if self.backend.is_array(v) and len(shape(v)) == 2:
            return self.matmat(v)
        return self.matvec(v)

    def matvec(self, v: Any) -> Any:
        """``A v`` for a flat vector or a parameter tree ``v`` (answered in the same form)."""
        if not self.backend.is_array(v):
            out = self._tree_matvec(v)
            if out is not None:
                return out
        flat, as_tree = self._flatten_input(v, check_values=False)
        fused = self._fused(flat)
        if fused is not None:  # one compiled call gives the product and the finiteness of v
            out, finite = fused
        else:
            # The finiteness test is started before the product and read after it: in frameworks that
            # dispatch asynchronously the product does not wait for a host read first.
            finite = self._finite_sum(flat)
            out = self._matvec(flat)
        self._confirm_finite(finite if self.check_finite else None, [flat], "v")
        return self.rows.to_tree(out) if as_tree else out

    def _fused(self, flat: Array) -> tuple[Array, Array] | None:
        """``(A v, isfinite(Σ v))`` from one call of the compiled product's ``on_parts``, where there is one."""
        found = self._compiled_variant(self._parts_variant, one_batch=True)
        if found is None:
            return None
        on_parts, problem = found
        w = self.cols.product_w
        pieces, finite = problem.batch_sum(lambda batch: on_parts(w, batch, [flat]))
        return pieces[0], finite

    def _tree_matvec(self, v: Any) -> Any:
        """``A v`` for a parameter tree through the compiled product's ``on_parts`` (see :meth:`Backend.rowwise`).

        The tree's entries go in as they are and the product comes out in
        pieces: no flat vector is made on either side (in JAX the
        compiler drops both the joining and the cutting).  ``None`` where
        the operator, its binding or its data do not allow it (several
        batches or processes sum flat products).
        """
        if hasattr(v, "shape") and hasattr(v, "dtype"):  # a NumPy or foreign array: the flat path's errors
            return None
        binding = self.cols
        found = self._compiled_variant(self._parts_variant, one_batch=True)
        if found is None or binding.parts_of is None or binding.from_parts is None:
            return None
        on_parts, problem = found
        parts = binding.parts_of(v)
        pieces, finite = problem.batch_sum(lambda batch: on_parts(binding.product_w, batch, parts))
        self._confirm_finite(finite if self.check_finite else None, parts, "v")
        return binding.from_parts(pieces)

    @property
    def _parts_variant(self) -> str:
        """The ``on_parts`` variant to call: without the finiteness test when the operator checks nothing."""
        return "on_parts" if self.check_finite else "on_parts_unchecked"

    def _quadratic_forms(self, Z: Array) -> Array | None:
        """``zᵀAz`` per row of ``Z`` (any real dtype) in one compiled call, where the product has one; else ``None``.

        Through the ``forms`` of :meth:`Backend.rowwise`, summed over the
        batches as products are.
        """
        found = self._compiled_variant("forms")
        if found is None:
            return None
        forms, problem = found
        w = self.cols.product_w
        return problem.batch_sum(lambda batch: forms(w, batch, Z))

    def _compiled_variant(self, name: str, one_batch: bool = False) -> tuple[Callable[..., Any], Any] | None:
        """``(variant, problem)``: the compiled product's ``name`` variant (see :meth:`Backend.rowwise`), or ``None``.

        ``None`` for operators without such a product, cross blocks, and,
        with ``one_batch``, data of several batches or processes.
        """
        found = self._parts_product()
        if found is None or self.rows is not self.cols:
            return None
        product, problem = found
        variant = getattr(product, name, None)
        if variant is None or (one_batch and not problem.one_batch):
            return None
        return variant, problem

    def _parts_product(self) -> tuple[Callable[..., Any], Any] | None:
        """``(product, problem)`` of an operator whose product comes from :meth:`Backend.rowwise`, else ``None``."""
        return None

    def _finite_sum(self, v: Array) -> Array | None:
        """``isfinite(Σ v)`` as a device scalar, not yet read (``None`` when unchecked)."""
        if not self.check_finite or not is_floating(self.backend.xp, v):
            return None
        xp = self.backend.xp
        return xp.isfinite(xp.sum(v))

    def _confirm_finite(self, finite_sum: Array | None, parts: list[Array], what: str) -> None:
        """Raise if the input had a NaN or inf: a finite sum proves every entry finite, else each part is tested."""
        if finite_sum is None or bool(finite_sum):
            return
        if not all(all_finite(self.backend.xp, p) for p in parts):
            raise ValueError(f"{what} contains NaN or inf; products with it would be meaningless")

    def matmat(self, V: Array) -> Array:
        """``A V`` for a matrix ``V`` of shape ``(n, k)``; returns ``(m, k)``."""
        b = self.backend
        if not b.is_array(V):
            raise TypeError(f"matmat expects a {b.name} array of shape (n, k), got {type(V).__name__}")
        dims = shape(V)
        if len(dims) != 2 or dims[0] != self.shape[1]:
            raise ValueError(f"matmat expects shape ({self.shape[1]}, k), got {dims}")
        self._check_vector_values(V, "V")
        return b.xp.matrix_transpose(self._matmat_rows(b.xp.matrix_transpose(V)))

    def apply_rows(self, V: Array) -> Array:
        """``(A Vᵀ)ᵀ``: products with the rows of ``V`` (shape ``(k, n)`` → ``(k, m)``).

        The batched product estimators and Krylov methods use: framework
        arrays in the parameters' dtype and on their device, no input
        checks and no host reads, so that it can run once per step.
        """
        return self._matmat_rows(V)

    def _matmat_rows(self, V: Array) -> Array:
        """The product behind :meth:`apply_rows`, implemented by each operator."""
        raise NotImplementedError

    def _matvec(self, v: Array) -> Array:
        """The product behind :meth:`matvec` for a checked flat vector: :meth:`_matmat_rows` on one row.

        Operators whose compiled products take a vector as it is override
        this: in eager JAX each of the two reshapes costs about 0.1 ms, as
        much as a tenth of a small model's product.
        """
        xp = self.backend.xp
        # Reshapes, not stack and indexing: views in every framework, one cheap op each.
        return xp.reshape(self._matmat_rows(xp.reshape(v, (1, -1))), (-1,))

    def dense(self, chunk_size: int = DENSE_CHUNK, max_bytes: int = DENSE_BYTES_LIMIT) -> Array:
        """The full matrix, built from batched products on chunks of unit vectors.

        Only one ``(chunk_size, n)`` block of unit vectors exists at a time,
        besides the result.  Where the compiled product has a ``dense``
        variant (see :meth:`Backend.rowwise`), every chunk runs in one
        compiled call per batch that evaluates the part of the product which
        does not depend on the vector (the forward pass, the gradient) once:
        the columns of a last-layer block then cost little more than one
        gradient, as with ``jax.hessian``.  A matrix larger than
        ``max_bytes`` with the copies its building holds at once (twice the
        matrix; three times when a compiled call's matrix is added to the
        sum of earlier batches) is refused before anything is allocated.
        """
        b = self.backend
        m, n = self.shape
        found = self._compiled_variant("dense")
        # The blocks and their concatenation coexist for a moment: twice the matrix.  A compiled call makes
        # the same two copies while the sum over the earlier batches is held: three.
        copies = 3 if found is not None and not found[1].one_batch else 2
        needed = copies * m * n * itemsize(self.cols.w)
        if needed > max_bytes:
            raise MemoryError(
                f"the dense {m} x {n} matrix needs {needed / 2**30:.2f} GiB while built (limit "
                f"{max_bytes / 2**30:.2f} GiB, max_bytes=); take a block with params=, or use an estimator "
                "(mh.trace, mh.diagonal, mh.eigvalsh)"
            )
        if found is not None:  # one compiled call per batch: the part of the product shared by all columns once
            matrix, problem = found
            w = self.cols.w
            with planned_passes(1, "dense"):
                return problem.batch_sum(lambda batch: matrix(w, batch, chunk_size))
        blocks = []
        with planned_passes(-(-n // chunk_size), "dense"):
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                units = np.zeros((stop - start, n))
                units[np.arange(stop - start), np.arange(start, stop)] = 1.0
                blocks.append(self._matmat_rows(b.asarray(units, self.cols.w)))
        # Each block holds columns start..stop of A as rows.
        return b.xp.matrix_transpose(b.xp.concat(blocks, axis=0))

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` on float64 NumPy vectors, for ``eigsh``, ``cg`` and friends.

        Each product sends its vectors to the operator's device in its dtype
        and brings the answer back as float64.
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as err:  # pragma: no cover - SciPy is a test dependency
            raise ImportError("to_scipy needs SciPy: pip install scipy") from err
        b, like = self.backend, self.cols.w

        def rows_product(op: CurvatureOperator, X: np.ndarray) -> np.ndarray:
            V = b.asarray(np.ascontiguousarray(np.asarray(X, dtype=np.float64).T), like)  # columns → rows
            return np.asarray(b.to_numpy(op.apply_rows(V)), dtype=np.float64).T

        return LinearOperator(
            self.shape,
            matvec=lambda x: rows_product(self, np.reshape(x, (-1, 1)))[:, 0],
            matmat=lambda X: rows_product(self, X),
            rmatvec=lambda x: rows_product(self.T, np.reshape(x, (-1, 1)))[:, 0],
            rmatmat=lambda X: rows_product(self.T, X),
            dtype=np.float64,
        )

    # ------------------------------------------------------------------
    # Algebra
    # ------------------------------------------------------------------
    def __add__(self, other: Any) -> CurvatureOperator:
        if isinstance(other, numbers.Number):
            raise TypeError(
                "adding a number to an operator is ambiguous; for the damped operator H + λI use H.damped(λ)"
            )
        return SumOperator([(1.0, self), (1.0, _compatible(self, other, "+"))])

    def __sub__(self, other: Any) -> CurvatureOperator:
        if isinstance(other, numbers.Number):
            raise TypeError("subtracting a number from an operator is ambiguous; for H - λI use H.damped(-λ)")
        return SumOperator([(1.0, self), (-1.0, _compatible(self, other, "-"))])

    def __mul__(self, scalar: Any) -> CurvatureOperator:
        return SumOperator([(_scalar(scalar, "*"), self)])

    __rmul__ = __mul__

    def __truediv__(self, scalar: Any) -> CurvatureOperator:
        value = _scalar(scalar, "/")
        if value == 0.0:
            raise ZeroDivisionError("cannot divide an operator by 0")
        return SumOperator([(1.0 / value, self)])

    def __neg__(self) -> CurvatureOperator:
        return SumOperator([(-1.0, self)])

    def damped(self, damping: float) -> CurvatureOperator:
        """``A + λI``: the damped operator Newton and CG methods use (square operators only)."""
        value = _scalar(damping, "damped")
        if not self.is_symmetric:
            raise ValueError(
                f"damped needs a square operator over one set of parameters; this one is a cross block of shape "
                f"{self.shape}"
            )
        return SumOperator([(1.0, self), (value, IdentityOperator(self.backend, self.cols, self.check_finite))])

    # ------------------------------------------------------------------
    # Input handling
    # ------------------------------------------------------------------
    def _flatten_input(self, v: Any, check_values: bool = True) -> tuple[Array, bool]:
        b = self.backend
        n = self.shape[1]
        if b.is_array(v):
            dims = shape(v)
            if dims != (n,):
                raise ValueError(
                    f"v must be a flat vector of shape ({n},) or a tree shaped like the parameters "
                    f"{dict(zip(self.cols.names, self.cols.shapes))}; got an array of shape {dims}"
                )
            flat, as_tree = v, False
        elif isinstance(v, np.ndarray):
            raise TypeError(
                f"v is a NumPy array; pass a {b.name} array (same framework as the model) or a parameter tree"
            )
        else:
            flat, as_tree = self.cols.from_tree(v), True
        if not is_floating(b.xp, flat):
            raise TypeError(f"v must be floating point, got {dtype_name(flat)}")
        if check_values:
            self._check_vector_values(flat, "v")
        if dtype_name(flat) != dtype_name(self.cols.w):
            raise TypeError(
                f"v has dtype {dtype_name(flat)} but the parameters are {dtype_name(self.cols.w)}; "
                "cast v to the parameters' dtype"
            )
        return flat, as_tree

    def _check_vector_values(self, v: Array, what: str) -> None:
        if self.check_finite and not all_finite(self.backend.xp, v):
            raise ValueError(f"{what} contains NaN or inf; products with it would be meaningless")


class SumOperator(CurvatureOperator):
    """``Σ c_i A_i`` over operators on the same parameters (``H - G``, ``2 H``, ``H + λI``).

    Nested sums are flattened, so a combination is one list of terms and a
    product is one product per term.
    """

    def __init__(self, terms: list[tuple[float, CurvatureOperator]]) -> None:
        flat: list[tuple[float, CurvatureOperator]] = []
        for coef, op in terms:
            if isinstance(op, SumOperator):
                flat.extend((coef * inner_coef, inner) for inner_coef, inner in op.terms)
            else:
                flat.append((float(coef), op))
        first = flat[0][1]
        super().__init__(first.backend, first.rows, first.cols, first.check_finite)
        self.terms = flat

    @property
    def is_symmetric(self) -> bool:
        return all(op.is_symmetric for _, op in self.terms)

    @property
    def T(self) -> CurvatureOperator:  # noqa: N802 - NumPy's name
        return self if self.is_symmetric else SumOperator([(coef, op.T) for coef, op in self.terms])

    def _label_repr(self) -> str:
        text = ""
        for coef, op in self.terms:
            sign = "-" if coef < 0 else "+"
            size = abs(coef)
            term = op._label_repr() if size == 1.0 else f"{size:g} * {op._label_repr()}"
            text = (f"-{term}" if sign == "-" else term) if not text else f"{text} {sign} {term}"
        return f"SumOperator[{text}]"

    def _matmat_rows(self, V: Array) -> Array:
        return self._combined(lambda op: op._matmat_rows(V))

    def _matvec(self, v: Array) -> Array:
        return self._combined(lambda op: op._matvec(v))

    def _combined(self, product: Callable[[CurvatureOperator], Array]) -> Array:
        """``Σ c_i product(A_i)``: each term's product, scaled and summed."""
        total = None
        for coef, op in self.terms:
            part = product(op)  # v → A_i v
            part = part if coef == 1.0 else part * coef  # → c_i A_i v
            total = part if total is None else total + part  # → Σ c_i A_i v
        return total


class IdentityOperator(CurvatureOperator):
    """``I`` on one set of parameters: the damping term of :meth:`CurvatureOperator.damped`."""

    def __init__(self, backend: Backend, binding: ParameterBinding, check_finite: bool = True) -> None:
        super().__init__(backend, binding, binding, check_finite)

    def _matmat_rows(self, V: Array) -> Array:
        return V

    def _matvec(self, v: Array) -> Array:
        return v


class DenseOperator(CurvatureOperator):
    """A square dense matrix of a framework, seen as an operator (estimators accept one directly)."""

    def __init__(self, backend: Backend, matrix: Array) -> None:
        n = shape(matrix)[1]
        binding = flat_binding(backend.xp.reshape(matrix[0], (n,)))
        super().__init__(backend, binding, binding)
        self.matrix = matrix

    def _matmat_rows(self, V: Array) -> Array:
        return self.backend.xp.matmul(V, self.backend.xp.matrix_transpose(self.matrix))  # (A Vᵀ)ᵀ = V Aᵀ


class WrappedOperator(CurvatureOperator):
    """Any object with ``shape``, ``dtype``, ``backend`` and ``apply_rows``, seen as a curvature operator."""

    def __init__(self, backend: Backend, obj: Any) -> None:
        m, n = (int(d) for d in obj.shape)
        xp = backend.xp
        device = getattr(obj, "device", None)
        like = xp.zeros((n,), dtype=obj.dtype) if device is None else xp.zeros((n,), dtype=obj.dtype, device=device)
        cols = flat_binding(like)
        rows = cols if m == n else flat_binding(xp.zeros((m,), dtype=obj.dtype))
        super().__init__(backend, rows, cols)
        self.wrapped = obj

    @property
    def is_symmetric(self) -> bool:
        return self.shape[0] == self.shape[1] and bool(getattr(self.wrapped, "is_symmetric", True))

    def _label_repr(self) -> str:
        return f"WrappedOperator[{type(self.wrapped).__name__}]"

    def _matmat_rows(self, V: Array) -> Array:
        return self.wrapped.apply_rows(V)


def flat_binding(like: Array) -> ParameterBinding:
    """A binding of one flat vector ``"params"`` shaped like ``like``, for operators without a model."""
    n = shape(like)[0]

    def from_tree(tree: Any) -> Array:
        raise TypeError("this operator has no parameter tree: pass a flat vector")

    return ParameterBinding(like, ["params"], [(n,)], lambda w, x: w, lambda flat: flat, from_tree)


def as_operator(obj: Any, what: str) -> CurvatureOperator:
    """``obj`` as a curvature operator: itself, a square dense framework matrix, or an object with the interface.

    The interface is ``shape`` (a pair), ``dtype`` (a framework dtype),
    ``backend`` (a :class:`Backend` or its name) and ``apply_rows(V)``
    (products with the rows of a ``(k, n)`` framework array); an optional
    ``device`` places the probes.
    """
    from ._dispatch import find_backend, get_backend

    if isinstance(obj, CurvatureOperator):
        return obj
    if all(hasattr(obj, attr) for attr in ("shape", "dtype", "backend", "apply_rows")):
        return WrappedOperator(get_backend(obj.backend), obj)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # NumPy too: a NumPy-array framework may claim it
        try:
            backend = find_backend(None, obj, [])
        except TypeError:
            backend = None
        if backend is not None and backend.is_array(obj):
            dims = shape(obj)
            if len(dims) != 2 or dims[0] != dims[1]:
                raise ValueError(f"{what} expects a square matrix, got an array of shape {dims}")
            if not is_floating(backend.xp, obj):
                raise TypeError(f"{what} expects a floating-point matrix, got {dtype_name(obj)}")
            return DenseOperator(backend, obj)
    raise TypeError(
        f"{what} expects a curvature operator such as mh.hessian(...) or mh.ggn(...), a square framework matrix, "
        f"or an object with shape, dtype, backend and apply_rows; got {type(obj).__name__}"
    )


def _scalar(value: Any, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"operators combine with finite real numbers in {op!r}; got {value!r}")
    return float(value)


def _compatible(left: CurvatureOperator, right: Any, op: str) -> CurvatureOperator:
    """``right`` when it can be combined with ``left`` (same backend, parameters and dtype), else a clear error."""
    if not isinstance(right, CurvatureOperator):
        raise TypeError(f"unsupported operand for {op!r}: CurvatureOperator and {type(right).__name__}")
    if right.backend is not left.backend:
        raise ValueError(f"cannot combine operators of backends {left.backend.name!r} and {right.backend.name!r}")
    if right.rows.names != left.rows.names or right.cols.names != left.cols.names or right.shape != left.shape:
        raise ValueError(
            f"cannot combine operators over different parameters: {left.rows.names} x {left.cols.names} "
            f"{left.shape} and {right.rows.names} x {right.cols.names} {right.shape}; build both with the same params="
        )
    if dtype_name(right.cols.w) != dtype_name(left.cols.w):
        raise TypeError(f"cannot combine operators of dtypes {dtype_name(left.cols.w)} and {dtype_name(right.cols.w)}")
    return right
