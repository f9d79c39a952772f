"""Central finite differences of gradients: an independent check of Hessian products."""

from __future__ import annotations

import warnings

import numpy as np

from ._arrays import dtype_name, machine_epsilon, shape
from ._backend import Array
from ._operator import CurvatureOperator
from ._probes import warn_low_precision
from ._problem import Problem

STEP_CHECK_FACTOR = 100.0
"""How far (in units of the expected accuracy ``eps^(2/3)``) the two step sizes may disagree before a warning."""


class FiniteDifferenceHessian(CurvatureOperator):
    """``H v ≈ (∇ℓ(w + εv) - ∇ℓ(w - εv)) / (2ε)``.

    Step rule: ``ε = step · max(1, ‖w‖) / ‖v‖`` with ``step`` defaulting to
    the cube root of the dtype's machine epsilon, which balances the
    ``O(ε²)`` truncation error of central differences against the
    ``O(eps/ε)`` rounding error of the gradient difference.  Expect about
    ``eps^(2/3)`` relative accuracy on a smooth loss: ~1e-10 in float64,
    ~1e-4 in float32.

    Limits: the rule assumes a loss whose gradient is smooth within ``±ε``.
    Through a piecewise-linear network (ReLU, max-pooling, ``abs``) the
    difference averages the Hessians of the regions the step crosses, which
    can be far from the exact Hessian at ``w``: a float32 ReLU network at the
    default step (``ε ≈ 5e-3 · ‖w‖``) showed relative errors of 1 to 3.  In
    float16 and bfloat16 the default step is 10% and 20% of ``‖w‖`` and the
    differences are no check at all.  To see such cases, the first product
    (its first vector) is also computed at ``ε/2`` and a ``UserWarning`` is
    raised when the two disagree by more than ``100 · eps^(2/3)`` relative
    plus what rounding explains (``eps · ‖∇ℓ‖ / ε`` per difference).  This
    costs two more gradients, once per operator; ``check_step=False`` skips
    it.  Prefer float64 parameters (and a smaller ``step`` for kinked
    networks) when using differences as a reference.

    Parameters
    ----------
    problem : Problem
    step : float, optional
        Relative step; see the rule above.
    check_step : bool
        Compare the first product with one at half the step and warn when
        they disagree (see above).
    """

    def __init__(self, problem: Problem, step: float | None = None, check_step: bool = True) -> None:
        super().__init__(problem.backend, problem.binding, problem.binding, problem.check_finite)
        self.problem = problem
        b = problem.backend
        self.eps = machine_epsilon(problem.binding.w)
        self.step = float(np.cbrt(self.eps)) if step is None else float(step)
        self._step_checked = not check_step
        self._grad = b.compile(lambda w, batch: b.value_and_grad(lambda p: problem.batch_loss(p, batch), w)[1])
        self._w_norm = float(np.linalg.norm(b.to_numpy(problem.binding.w).astype(np.float64)))
        warn_low_precision(self, "finite_difference_hessian")

    def _gradient(self, w: Array) -> Array:
        return self.problem.batch_sum(lambda batch: self._grad(w, batch))

    def _difference(self, v: Array, h: float) -> tuple[Array, Array, Array]:
        """``(central difference, ∇ℓ(w + h v), ∇ℓ(w - h v))``."""
        w = self.problem.binding.w
        plus, minus = self._gradient(w + v * h), self._gradient(w - v * h)
        return (plus - minus) * (0.5 / h), plus, minus

    def _matmat_rows(self, V: Array) -> Array:
        b = self.backend
        rows = []
        for i in range(shape(V)[0]):
            v = V[i]
            v_norm = float(np.linalg.norm(b.to_numpy(v).astype(np.float64)))
            if v_norm == 0.0:
                rows.append(b.xp.zeros_like(v))
                continue
            h = self.step * max(1.0, self._w_norm) / v_norm
            row, plus, minus = self._difference(v, h)
            if not self._step_checked:
                self._step_checked = True
                self._check_step(v, h, row, plus, minus)
            rows.append(row)
        return b.xp.stack(rows)

    def _check_step(self, v: Array, h: float, row: Array, plus: Array, minus: Array) -> None:
        """Warn when the difference at ``h`` and at ``h/2`` disagree beyond truncation and rounding."""
        b = self.backend
        half, plus_half, minus_half = self._difference(v, h / 2)
        host = lambda a: np.asarray(b.to_numpy(a), dtype=np.float64)  # noqa: E731
        d_full, d_half = host(row), host(half)
        # Rounding of a gradient difference is about eps · ‖∇ℓ‖; divided by 2h it is the rounding of the product.
        grad_scale = max(np.linalg.norm(host(g)) for g in (plus, minus, plus_half, minus_half))
        rounding = self.eps * grad_scale / h + self.eps * grad_scale / (h / 2)
        scale = max(np.linalg.norm(d_full), np.linalg.norm(d_half))
        accuracy = STEP_CHECK_FACTOR * self.eps ** (2.0 / 3.0)
        gap = float(np.linalg.norm(d_full - d_half))
        if gap <= accuracy * scale + 10.0 * rounding:
            return
        relative = gap / scale if scale > 0 else float("inf")
        warnings.warn(
            f"finite_difference_hessian: the products at step {self.step:.3g} and at half that step disagree by "
            f"{relative:.2g} (relative), far more than the {self.eps ** (2.0 / 3.0):.1g} central differences reach "
            f"on a smooth loss in {dtype_name(self.problem.binding.w)}. The loss is not smooth at this scale "
            "(ReLU, max-pooling or abs kinks crossed within the step) or rounding dominates, so these products "
            "are no reliable check of the Hessian. Use float64 parameters and a smaller step= (e.g. 1e-7 for a "
            "ReLU network), or compare on a smooth model; check_step=False silences this check.",
            UserWarning,
            stacklevel=4,
        )
