"""The exact Hessian of the loss as a lazy operator."""

from __future__ import annotations

from collections.abc import Callable

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
        self._hvp = problem.backend.hvp_function(problem.loss_function())

    def _matmat_rows(self, V: Array) -> Array:
        w = self.problem.binding.product_w
        return self.problem.batch_sum(lambda batch: self._hvp(w, batch, V))  # v → Σ_batches weight · H_batch v

    def _matvec(self, v: Array) -> Array:
        if not getattr(self._hvp, "takes_vectors", False):
            return super()._matvec(v)
        w = self.problem.binding.product_w
        return self.problem.batch_sum(lambda batch: self._hvp(w, batch, v))

    def _parts_product(self) -> tuple[Callable[..., Array], Problem]:
        return self._hvp, self.problem
