"""The lazy linear operator every curvature matrix is exposed as."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import all_finite, dtype_name, is_floating, shape
from ._backend import Array, Backend, ParameterBinding

DENSE_CHUNK = 64
"""Columns computed per batched product when building a dense matrix."""


class CurvatureOperator:
    """A matrix ``A`` of shape ``(m, n)`` known through its products.

    Vectors go in and come out as flat 1-D arrays of the model's framework, or
    as trees shaped like the parameters (answered in the same form).
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
    def is_symmetric(self) -> bool:
        """Whether rows and columns are the same parameters."""
        return self.rows is self.cols

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, backend={self.backend.name!r})"

    # ------------------------------------------------------------------
    # Products
    # ------------------------------------------------------------------
    def __matmul__(self, v: Any) -> Any:
        if self.backend.is_array(v) and len(shape(v)) == 2:
            return self.matmat(v)
        return self.matvec(v)

    def matvec(self, v: Any) -> Any:
        """``A v`` for a flat vector or a parameter tree ``v`` (answered in the same form)."""
        flat, as_tree = self._flatten_input(v)
        out = self._matmat_rows(self.backend.xp.stack([flat]))[0]
        return self.rows.to_tree(out) if as_tree else out

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

    def _matmat_rows(self, V: Array) -> Array:
        """``(A V^T)^T``: products with the rows of ``V`` (shape ``(k, n)`` → ``(k, m)``).

        The internal entry point: no input checks, so estimators and Lanczos
        call it without a host read per product.
        """
        raise NotImplementedError

    def dense(self, chunk_size: int = DENSE_CHUNK) -> Array:
        """The full matrix, built from batched products on chunks of unit vectors.

        Only one ``(chunk_size, n)`` block of unit vectors exists at a time,
        besides the result.
        """
        b = self.backend
        m, n = self.shape
        blocks = []
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            units = np.zeros((stop - start, n))
            units[np.arange(stop - start), np.arange(start, stop)] = 1.0
            blocks.append(self._matmat_rows(b.asarray(units, self.cols.w)))
        # Each block holds columns start..stop of A as rows.
        return b.xp.matrix_transpose(b.xp.concat(blocks, axis=0))

    # ------------------------------------------------------------------
    # Input handling
    # ------------------------------------------------------------------
    def _flatten_input(self, v: Any) -> tuple[Array, bool]:
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
    """``Σ c_i A_i`` over operators on the same parameters (e.g. the curvature effect ``H - G``)."""

    def __init__(self, terms: list[tuple[float, CurvatureOperator]]) -> None:
        first = terms[0][1]
        super().__init__(first.backend, first.rows, first.cols, first.check_finite)
        self.terms = terms

    def _matmat_rows(self, V: Array) -> Array:
        total = None
        for coef, op in self.terms:
            part = op._matmat_rows(V) * coef
            total = part if total is None else total + part
        return total
