"""Losses with analytic output Hessians ``H_z`` and their square roots.

Each built-in loss follows PyTorch's conventions (``torch.nn.functional``):
the class axis of cross-entropy logits is axis 1, ``"mean"`` divides by the
number of reduced elements, ``"sum"`` adds them.  The value is written with
backend operations so that it is differentiable in every framework; the
output Hessian ``H_z`` and a square root ``S`` with ``H_z = S S^T`` are closed
forms (DESIGN.md, "The math the library is built on").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._arrays import dtype_name, is_floating, one_hot, shape, sigmoid, softplus
from ._backend import Array, Backend

REDUCTIONS = ("mean", "sum")


class Loss:
    """A loss ``ℓ(z, y)`` of network outputs ``z`` and targets ``y``.

    Parameters
    ----------
    reduction : {"mean", "sum"}
        How per-element losses are combined within one batch.
    """

    name = ""

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def check(self, backend: Backend, z: Array, y: Array) -> None:
        """Raise ``ValueError`` when outputs and targets cannot go together."""
        zs, ys = shape(z), shape(y)
        if zs != ys:
            raise ValueError(
                f"loss {self.name!r}: outputs have shape {zs} but targets have shape {ys}; "
                "they must match elementwise (reshape the targets or the model output)"
            )
        if not is_floating(backend.xp, y):
            raise TypeError(f"loss {self.name!r}: targets must be floating point, got {dtype_name(y)}")

    def num_reduced(self, backend: Backend, z: Array) -> int:
        """Number of elements that ``"mean"`` divides by."""
        return math.prod(shape(z))

    def scale(self, backend: Backend, z: Array) -> float:
        """Factor of the reduction: ``1/num_reduced`` for mean, 1 for sum."""
        return 1.0 / self.num_reduced(backend, z) if self.reduction == "mean" else 1.0

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        """The reduced loss, a differentiable scalar."""
        raise NotImplementedError

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        """``H_z u`` for a stack ``u`` of tangents shaped like ``z`` along a leading axis."""
        raise NotImplementedError

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        """Columns of ``S`` (``H_z = S S^T``): shape ``(K,) + z.shape``, K columns per sample."""
        raise NotImplementedError


class MSELoss(Loss):
    """Sum of squares ``Σ (z - y)^2`` (PyTorch's ``mse_loss``); ``H_z = 2 I``."""

    name = "mse"

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        return backend.xp.sum((z - y) ** 2) * self.scale(backend, z)

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        return u * (2.0 * self.scale(backend, z))

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        # S = sqrt(2 s) I: one column per output element of a sample, so the
        # columns are the unit tangents of each output coordinate.
        return _unit_columns(backend, z) * math.sqrt(2.0 * self.scale(backend, z))


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy on logits; ``H_z = σ(z)(1 - σ(z))`` elementwise."""

    name = "bce_with_logits"

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        return backend.xp.sum(softplus(backend.xp, z) - y * z) * self.scale(backend, z)

    def _curvature(self, backend: Backend, z: Array) -> Array:
        s = sigmoid(backend.xp, backend.stop_gradient(z))
        return s * (1.0 - s) * self.scale(backend, z)

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        return u * self._curvature(backend, z)

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        return _unit_columns(backend, z) * backend.xp.sqrt(self._curvature(backend, z))


class PoissonNLLLoss(Loss):
    """Poisson negative log-likelihood with log input: ``exp(z) - y z``; ``H_z = exp(z)``."""

    name = "poisson_nll"

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        return backend.xp.sum(backend.xp.exp(z) - y * z) * self.scale(backend, z)

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        return u * (backend.xp.exp(backend.stop_gradient(z)) * self.scale(backend, z))

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        root = backend.xp.exp(backend.stop_gradient(z) * 0.5) * math.sqrt(self.scale(backend, z))
        return _unit_columns(backend, z) * root


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy with integer labels or probability targets.

    Logits have shape ``(N, C)`` or ``(N, C, d1, ...)`` (class axis 1, as in
    PyTorch); integer targets have the logits' shape without the class axis,
    probability targets the logits' shape.  ``"mean"`` divides by the number
    of samples ``N·d1·…``.  ``H_z = t (diag(p) - p p^T)`` with ``t`` the sum of
    the target row (1 for labels and proper distributions).
    """

    name = "cross_entropy"

    def check(self, backend: Backend, z: Array, y: Array) -> None:
        zs, ys = shape(z), shape(y)
        if len(zs) < 2:
            raise ValueError(f"loss 'cross_entropy': logits must have shape (N, C) or (N, C, ...), got {zs}")
        if is_floating(backend.xp, y):
            if ys != zs:
                raise ValueError(
                    f"loss 'cross_entropy': probability targets must have the logits' shape {zs}, got {ys}"
                )
        elif ys != zs[:1] + zs[2:]:
            raise ValueError(
                f"loss 'cross_entropy': integer labels must have shape {zs[:1] + zs[2:]} "
                f"for logits of shape {zs}, got {ys}"
            )

    def num_reduced(self, backend: Backend, z: Array) -> int:
        dims = shape(z)
        return math.prod(dims[:1] + dims[2:])

    def _last(self, backend: Backend, x: Array) -> Array:
        """Class axis moved last."""
        return x if len(shape(x)) == 2 else backend.xp.moveaxis(x, 1, -1)

    def _first(self, backend: Backend, x: Array) -> Array:
        """Class axis moved back to position 1 (inverse of :meth:`_last`)."""
        return x if len(shape(x)) == 2 else backend.xp.moveaxis(x, -1, 1)

    def _targets(self, backend: Backend, z_last: Array, y: Array) -> Array:
        """Targets as distributions with the class axis last."""
        if is_floating(backend.xp, y):
            return self._last(backend, y)
        return one_hot(backend, y, shape(z_last)[-1], like=z_last)

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        z_last = self._last(backend, z)
        m = backend.stop_gradient(backend.xp.max(z_last, axis=-1, keepdims=True))
        log_norm = backend.xp.log(backend.xp.sum(backend.xp.exp(z_last - m), axis=-1, keepdims=True)) + m
        t = self._targets(backend, z_last, y)
        return -backend.xp.sum(t * (z_last - log_norm)) * self.scale(backend, z)

    def _probs(self, backend: Backend, z: Array, y: Array) -> tuple[Array, Array]:
        """Softmax probabilities and the weight ``t`` (target mass) per sample, class axis last."""
        z_last = backend.stop_gradient(self._last(backend, z))
        e = backend.xp.exp(z_last - backend.xp.max(z_last, axis=-1, keepdims=True))
        p = e / backend.xp.sum(e, axis=-1, keepdims=True)
        t = backend.xp.sum(self._targets(backend, z_last, y), axis=-1, keepdims=True)
        return p, t * self.scale(backend, z)

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        p, t = self._probs(backend, z, y)
        u_last = self._last_batched(backend, u)
        # (diag(p) - p p^T) u = p ⊙ (u - <p, u>)
        hu = p * (u_last - backend.xp.sum(p * u_last, axis=-1, keepdims=True)) * t
        return self._first_batched(backend, hu)

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        p, t = self._probs(backend, z, y)
        num_classes = shape(p)[-1]
        # Column c of S is sqrt(p_c) (e_c - p), scaled by sqrt(t).
        onehots = one_hot(backend, _arange_like(backend, num_classes, z), num_classes, like=p)
        root_p = backend.xp.sqrt(p)
        root_t = backend.xp.sqrt(t)
        cols = [root_p[..., c : c + 1] * (onehots[c] - p) * root_t for c in range(num_classes)]
        return self._first_batched(backend, backend.xp.stack(cols))

    def _last_batched(self, backend: Backend, u: Array) -> Array:
        return u if len(shape(u)) == 3 else backend.xp.moveaxis(u, 2, -1)

    def _first_batched(self, backend: Backend, u: Array) -> Array:
        return u if len(shape(u)) == 3 else backend.xp.moveaxis(u, -1, 2)


def _arange_like(backend: Backend, n: int, like: Array) -> Array:
    return backend.asarray(np.arange(n), like)


def _unit_columns(backend: Backend, z: Array) -> Array:
    """Unit tangents of every output coordinate of a sample: ``(K,) + z.shape``.

    Column ``k`` is 1 at coordinate ``k`` of every sample's output and 0
    elsewhere, so that ``K = z[0].size`` columns cover a diagonal ``H_z``.
    """
    dims = shape(z)
    per_sample = math.prod(dims[1:])
    eye = np.eye(per_sample).reshape((per_sample, 1) + dims[1:])
    eye = np.broadcast_to(eye, (per_sample,) + dims)
    return backend.asarray(np.ascontiguousarray(eye), z)


class CallableLoss(Loss):
    """A framework-native ``loss(outputs, targets) -> scalar``; ``H_z`` by autodiff."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        super().__init__("sum")
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def check(self, backend: Backend, z: Array, y: Array) -> None:
        return None

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        out = self.fn(z, y)
        if shape(out) not in ((), (1,)):
            raise ValueError(
                f"loss callable {self.name!r} returned shape {shape(out)}; it must return "
                "a scalar (reduce with mean or sum)"
            )
        return backend.xp.reshape(out, ())

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        z0 = backend.stop_gradient(z)

        def grad_z(q: Array) -> Array:
            return backend.value_and_grad(lambda r: self.value(backend, r, y), q)[1]

        rows = [backend.jvp(grad_z, z0, u[i])[1] for i in range(shape(u)[0])]
        return backend.xp.stack(rows)


LOSSES: dict[str, type[Loss]] = {
    cls.name: cls for cls in (CrossEntropyLoss, MSELoss, BCEWithLogitsLoss, PoissonNLLLoss)
}


def make_loss(loss: Any, reduction: str = "mean") -> Loss:
    """Resolve a built-in loss name or wrap a framework-native callable."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        key = loss.lower().replace("-", "_")
        if key not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable loss(outputs, targets)")
        return LOSSES[key](reduction)
    if callable(loss):
        return CallableLoss(loss)
    raise TypeError(f"loss must be a name from {sorted(LOSSES)} or a callable loss(outputs, targets), got {loss!r}")
