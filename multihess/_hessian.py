"""The exact Hessian of the loss as a lazy operator."""

from __future__ import annotations

from ._backend import Array
from ._operator import CurvatureOperator
from ._problem import Problem


class HessianOperator(CurvatureOperator):
    """``H = D²_w ℓ``: exact Hessian-vector products.

    The product function comes from the backend once (compiled under JAX and
    TensorFlow, a kept gradient graph in PyTorch) and is reused for every
    product; only the vectors change between calls.
    """

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.backend, problem.binding, problem.binding, problem.check_finite)
        self.problem = problem
        self._hvp = problem.backend.hvp_function(problem.batch_loss)

    def _matmat_rows(self, V: Array) -> Array:
        w = self.problem.binding.w
        total = None
        for weight, batch in self.problem.weighted_batches():
            part = self._hvp(w, batch, V)
            part = part if weight == 1.0 else part * weight
            total = part if total is None else total + part
        return total
