"""The generalized Gauss-Newton matrix ``G = J^T H_z J`` (approximate chain rule)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ._backend import Array, Backend, Linearization
from ._losses import Loss
from ._operator import CurvatureOperator
from ._problem import Problem


def ggn_product(
    backend: Backend, loss: Loss, apply: Callable[[Array, Any], Array], w: Array, batch: Any, v: Array
) -> Array:
    """``J^T H_z J v`` for one vector and one batch, written with the primitives (compiled by the backend)."""
    x, y = batch
    f: Callable[[Array], Array] = lambda p: apply(p, x)  # noqa: E731
    z, jv = backend.jvp(f, w, v)
    hz_jv = loss.hz_matvec(backend, z, y, backend.xp.stack([jv]))[0]
    return backend.vjp(f, w, hz_jv)[1]


class GGNOperator(CurvatureOperator):
    """``G = Σ_batches J^T H_z J`` with ``H_z`` the loss's analytic output Hessian.

    A product is ``v → Jv → H_z Jv → J^T H_z Jv``.  In eager frameworks the
    linearization (kept output graph) is built once per batch and reused; in
    compiling frameworks the whole chain is one compiled function of
    ``(w, batch, V)``, traced once.
    """

    def __init__(self, problem: Problem) -> None:
        if problem.loss is None:
            raise ValueError("a GGN needs model outputs and a loss: pass data=(x, y) and loss=")
        super().__init__(problem.backend, problem.binding, problem.binding, problem.check_finite)
        self.problem = problem
        if getattr(problem.backend, "eager", False):
            self._linearizations: dict[int, Linearization] = {}
            self._product = self._eager_product
        else:
            b, loss, apply = problem.backend, problem.loss, problem.binding.apply
            # Holds the model and the loss, not the problem: the compiled program may outlive this operator.
            self._product = b.rowwise(functools.partial(ggn_product, b, loss, apply))

    def _eager_product(self, w: Array, batch: Any, V: Array) -> Array:
        b, loss = self.problem.backend, self.problem.loss
        lin = self._linearization(batch)
        jv = lin.jvp_batched(V)  # v → Jv
        hz_jv = loss.hz_matvec(b, lin.out, batch[1], jv)  # → H_z Jv
        return lin.vjp_batched(hz_jv)  # → J^T H_z Jv

    def _linearization(self, batch: Any) -> Linearization:
        # Keep the linearization of every batch only when there is one batch:
        # with many, the kept graphs would hold all activations at once.
        key = id(batch)
        if key in self._linearizations:
            return self._linearizations[key]
        lin = self.problem.backend.linearize(self.problem.binding.apply, self.problem.binding.w, batch[0])
        if self.problem.source.single is not None:
            self._linearizations[key] = lin
        return lin

    def _matmat_rows(self, V: Array) -> Array:
        w = self.problem.binding.product_w
        return self.problem.batch_sum(lambda batch: self._product(w, batch, V))

    def _parts_product(self) -> tuple[Callable[..., Array], Problem]:
        return self._product, self.problem

    def _matvec(self, v: Array) -> Array:
        if not getattr(self._product, "takes_vectors", False):
            return super()._matvec(v)
        w = self.problem.binding.product_w
        return self.problem.batch_sum(lambda batch: self._product(w, batch, v))
