"""Blocks of an operator: rows for one parameter subset, columns for another."""

from __future__ import annotations

import numpy as np

from ._arrays import shape
from ._backend import Array, ParameterBinding
from ._operator import CurvatureOperator


class BlockOperator(CurvatureOperator):
    """The block ``A[rows, cols]`` of an operator over the union of both subsets.

    A column vector is embedded into the union (zeros on parameters outside
    ``cols``), multiplied, and the entries of the ``rows`` parameters are
    read off.  Parameters are contiguous segments of the flat vector, so
    both steps are concatenations of slices.
    """

    def __init__(self, inner: CurvatureOperator, rows: ParameterBinding, cols: ParameterBinding) -> None:
        super().__init__(inner.backend, rows, cols, inner.check_finite)
        self.inner = inner
        offsets = inner.cols.offsets()
        self._row_slices = [offsets[n] for n in rows.names]
        col_offsets = cols.offsets()
        # For each union parameter: its slice in a column vector, or its size (zeros).
        self._embed = [
            (col_offsets[n], None) if n in col_offsets else (None, size)
            for n, size in zip(inner.cols.names, inner.cols.sizes)
        ]
        self._zeros: dict[int, dict[int, Array]] = {}

    @property
    def T(self) -> CurvatureOperator:  # noqa: N802 - NumPy's name
        # The full operators (H, G, H - G) are symmetric, so A[rows, cols]ᵀ = A[cols, rows].
        return self if self.is_symmetric else BlockOperator(self.inner, self.cols, self.rows)

    def _label_repr(self) -> str:
        return f"BlockOperator[{self.inner._label_repr()}]"

    def _matmat_rows(self, V: Array) -> Array:
        b = self.backend
        k = shape(V)[0]
        if k not in self._zeros:  # made once per number of columns, on the device
            self._zeros[k] = {size: b.asarray(np.zeros((k, size)), V) for piece, size in self._embed if size}
        parts = [V[:, piece] if piece is not None else self._zeros[k][size] for piece, size in self._embed]
        full = self.inner._matmat_rows(b.xp.concat(parts, axis=1))
        return b.xp.concat([full[:, s] for s in self._row_slices], axis=1)
