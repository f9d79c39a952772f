"""Central finite differences of gradients: an independent check of Hessian products."""

from __future__ import annotations

import numpy as np

from ._arrays import machine_epsilon, shape
from ._backend import Array
from ._operator import CurvatureOperator
from ._problem import Problem


class FiniteDifferenceHessian(CurvatureOperator):
    """``H v ≈ (∇ℓ(w + εv) - ∇ℓ(w - εv)) / (2ε)``.

    Step rule: ``ε = step · max(1, ‖w‖) / ‖v‖`` with ``step`` defaulting to
    the cube root of the dtype's machine epsilon, which balances the
    ``O(ε²)`` truncation error of central differences against the
    ``O(eps/ε)`` rounding error of the gradient difference.  Expect about
    ``eps^(2/3)`` relative accuracy: ~1e-10 in float64, ~1e-4 in float32.

    Parameters
    ----------
    problem : Problem
    step : float, optional
        Relative step; see the rule above.
    """

    def __init__(self, problem: Problem, step: float | None = None) -> None:
        super().__init__(problem.backend, problem.binding, problem.binding, problem.check_finite)
        self.problem = problem
        b = problem.backend
        eps = machine_epsilon(problem.binding.w)
        self.step = float(np.cbrt(eps)) if step is None else float(step)
        self._grad = b.compile(lambda w, batch: b.value_and_grad(lambda p: problem.batch_loss(p, batch), w)[1])
        self._w_norm = float(np.linalg.norm(b.to_numpy(problem.binding.w).astype(np.float64)))

    def _gradient(self, w: Array) -> Array:
        return self.problem.batch_sum(lambda batch: self._grad(w, batch))

    def _matmat_rows(self, V: Array) -> Array:
        b = self.backend
        w = self.problem.binding.w
        rows = []
        for i in range(shape(V)[0]):
            v = V[i]
            v_norm = float(np.linalg.norm(b.to_numpy(v).astype(np.float64)))
            if v_norm == 0.0:
                rows.append(b.xp.zeros_like(v))
                continue
            eps = self.step * max(1.0, self._w_norm) / v_norm
            rows.append((self._gradient(w + v * eps) - self._gradient(w - v * eps)) * (0.5 / eps))
        return b.xp.stack(rows)
