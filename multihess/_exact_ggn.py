"""The exact GGN diagonal through the square root of the output Hessian, and its Monte Carlo variant.

``G = Σ_n J_nᵀ S_n S_nᵀ J_n`` with ``H_z = S_n S_nᵀ`` per sample, so

    diag(G) = Σ_n Σ_c (J_nᵀ S_n[:, c])²

takes ``C`` vector-Jacobian products per sample (``C`` columns of ``S_n``),
squared entrywise and summed: the backend's
:meth:`~multihess.Backend.per_sample_squares`, which works on chunks of
samples and columns bounded by a memory budget.  The Monte Carlo variant replaces the
columns by ``k`` random ones, gradients of the loss at sampled labels, with
``E[r rᵀ] = H_z``.  Nothing here knows about layers: any model the framework
differentiates works.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ._arrays import itemsize, machine_epsilon, shape
from ._backend import Array, Backend, ParameterBinding, map_rows
from ._blocks import BlockOperator
from ._checks import check_count
from ._ggn import GGNOperator
from ._losses import CallableLoss, CrossEntropyLoss, Loss
from ._operator import CurvatureOperator
from ._per_sample import sample_slice
from ._problem import Problem

_SAMPLE_CHECKS = 3
"""Samples evaluated alone to check that the model treats its inputs independently."""


class _State:
    """What is reused between calls on one operator: compiled functions and whether samples are independent.

    Mixing samples (batch statistics) is a property of the model, so it is
    checked once, on the first batch the operator meets, and not per batch:
    a streamed dataset brings new batch objects on every pass.
    """

    def __init__(self) -> None:
        self.squares: dict[bool, Callable[..., Array]] = {}
        self.independent: bool | None = None
        self.roots: Callable[[Array, Array], Array] | None = None


_STATES: weakref.WeakKeyDictionary[CurvatureOperator, _State] = weakref.WeakKeyDictionary()


def ggn_parts(op: CurvatureOperator, method: str) -> tuple[Problem, ParameterBinding]:
    """The problem and parameter binding of a GGN (or a diagonal block of one), or a clear error."""
    inner = op.inner if isinstance(op, BlockOperator) else op
    if isinstance(inner, GGNOperator) and op.is_symmetric:
        return inner.problem, op.rows
    raise ValueError(
        f"method={method!r} needs a GGN, mh.ggn(...): the exact diagonal and trace come from the square root "
        f"of the loss's output Hessian, which a {type(inner).__name__} does not have; for this operator use "
        "method='hutchinson' or 'xdiag' (diagonal), or 'hutchinson', 'hutch++' or 'xtrace' (trace)"
    )


def ggn_exact_diagonal(op: CurvatureOperator, budget: int) -> Array:
    """The exact GGN diagonal as a 1-D array of the parameters' framework, dtype and device.

    On one batch, in one process, the device's sum is the result: the
    round trip through float64 NumPy of :func:`ggn_diagonal_samples` would
    add nothing but two conversions of ``P`` numbers (a fifth of the whole
    call on a small MLP).  Streamed or sharded data are summed on the host
    in float64, as there.
    """
    problem, _ = ggn_parts(op, "exact")
    b, like = problem.backend, problem.binding.w
    if not problem.one_batch:
        return b.asarray(ggn_diagonal_samples(op, "exact", None, 0, budget)[0], like)
    part = _batch_totals(op, "exact", None, 0, budget, on_host=False)
    return b.asarray(part, like) if isinstance(part, np.ndarray) else b.xp.astype(part, like.dtype)


def ggn_diagonal_samples(
    op: CurvatureOperator, method: str, num_samples: int | None, seed: int, budget: int
) -> np.ndarray:
    """The exact GGN diagonal as one row, or ``num_samples`` independent Monte Carlo estimates as rows.

    Float64 NumPy of shape ``(1, P)`` (``"exact"``) or ``(num_samples, P)`` (``"mc"``),
    in the operator's parameter order.
    """
    total = _batch_totals(op, method, num_samples, seed, budget, on_host=True)
    return total[None] if method == "exact" else total


def _batch_totals(
    op: CurvatureOperator, method: str, num_samples: int | None, seed: int, budget: int, on_host: bool
) -> Any:
    """The data's sum of per-batch squares: ``(P,)`` (exact) or ``(num_samples, P)`` (mc).

    Float64 NumPy if ``on_host``; otherwise each batch's device array (or
    the host's float64 sums of :func:`_squares_full_batch`) as it comes.
    """
    problem, binding = ggn_parts(op, method)
    loss = problem.loss
    if isinstance(loss, CallableLoss):
        raise ValueError(
            f"method={method!r} needs a built-in loss with a closed-form output Hessian; a callable loss has "
            "none: use method='hutchinson' or 'xdiag' (diagonal), or 'hutchinson', 'hutch++' or 'xtrace' (trace)"
        )
    k = 1 if num_samples is None else check_count(num_samples, "num_samples")
    rng = np.random.default_rng(seed)
    state = _STATES.setdefault(op, _State())
    b = problem.backend

    if method == "exact" and state.roots is None:
        # Compiled once: run op by op, the square roots cost more than the structured squares (JAX).
        state.roots = b.compile(lambda z, y: per_sample_roots(b, loss, z, y))

    def batch_squares(batch: Any) -> Any:
        y = batch[1]
        check_target_mass(b, loss, y, method)
        if method == "exact":
            cotangents = lambda z: state.roots(z, y)  # noqa: E731
        else:
            cotangents = lambda z: sampled_roots(b, loss, z, y, k, rng)  # noqa: E731
        part = _squares(state, problem, binding, batch, cotangents, per_cotangent=method == "mc", budget=budget)
        return np.asarray(b.to_numpy(part), dtype=np.float64) if on_host and not isinstance(part, np.ndarray) else part

    return problem.batch_sum(batch_squares)


def check_target_mass(b: Backend, loss: Loss, y: Array, method: str) -> None:
    """Refuse cross-entropy probability targets with a negative mass in some sample (host check, per batch).

    ``H_z = t (diag(p) - p pᵀ)`` has a real square root only for ``t ≥ 0``;
    with ``t < 0`` the square root would be NaN and so would the diagonal.
    """
    if not isinstance(loss, CrossEntropyLoss):
        return
    mass = loss.sample_mass(b, y)
    if mass is None or mass.size == 0 or float(mass.min()) >= 0.0:
        return
    worst = float(mass.min())
    count = int(np.sum(mass < 0))
    raise ValueError(
        f"method={method!r}: {count} sample(s) of the cross-entropy probability targets have a negative total "
        f"mass (as low as {worst:.3g}); their output Hessian t·(diag(p) − p pᵀ) is negative semi-definite and has "
        "no real square root. Pass targets whose rows sum to a non-negative number (distributions sum to 1), or "
        "use method='hutchinson' or 'xdiag' (diagonal), 'hutchinson', 'hutch++' or 'xtrace' (trace)"
    )


# ----------------------------------------------------------------------
# Cotangents: columns of the square root of H_z, exact or sampled
# ----------------------------------------------------------------------
def per_sample_roots(b: Backend, loss: Loss, z: Array, y: Array) -> Array:
    """Columns of a square root of ``H_z`` that act on one sample each: ``(K, N, ...)``.

    The loss's ``sqrt_hz`` gives ``K`` columns for every sample.  For
    cross-entropy over extra axes (``(N, C, d1, ...)``, or ``(N, d1, ..., C)``
    with the class axis last) a column spans every position of a sample, but
    ``H_z`` has no terms across positions, so each column is split into one
    per position (``K = C · d1 · …``).
    """
    S = loss.sqrt_hz(b, z, y)
    dims = shape(z)
    if not isinstance(loss, CrossEntropyLoss) or len(dims) <= 2:
        return S
    if loss.class_axis == 1:
        spatial, num_classes = dims[2:], dims[1]
        mask_shape = (1, 1) + spatial  # against (N, C, d1, ...)
    else:
        spatial, num_classes = dims[1:-1], dims[-1]
        mask_shape = (1,) + spatial + (1,)  # against (N, d1, ..., C)
    positions = math.prod(spatial)
    mask = np.eye(positions).reshape((positions,) + mask_shape)
    split = S[:, None] * b.asarray(mask, z)  # (C, D) + z.shape
    return b.xp.reshape(split, (num_classes * positions,) + dims)


def sampled_roots(b: Backend, loss: Loss, z: Array, y: Array, k: int, rng: np.random.Generator) -> Array:
    """``k`` random columns per sample with ``E[r rᵀ] = H_z``: ``(k, N, ...)``.

    Labels ``ŷ`` are drawn (on the host, from ``rng``) from the distribution
    whose negative log-likelihood is the loss with ``"sum"`` reduction,
    ``ℓ_sum``: softmax categorical (cross-entropy), Gaussian of variance ½
    (sum of squares), Bernoulli (BCE) and Poisson.  For these the Fisher
    identity ``E[∇_z ℓ_sum ∇_z ℓ_sumᵀ] = ∇²_z ℓ_sum`` holds per sample, and
    the reduced loss has ``H_z = s t ∇²_z ℓ_sum`` with ``s`` the reduction's
    factor and ``t`` the target mass of a cross-entropy sample (1 for
    labels).  The gradient of the loss itself at ``ŷ`` is ``s ∇_z ℓ_sum``,
    so ``r = sqrt(t / s) ∇_z ℓ(z, ŷ)`` has ``E[r rᵀ] = H_z``: the sampled GGN
    is unbiased.
    """
    z_np = np.asarray(b.to_numpy(z), dtype=np.float64)
    mass = None
    if isinstance(loss, CrossEntropyLoss):
        last = loss.class_axis == -1
        logits = z_np if last else np.moveaxis(z_np, 1, -1)
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        u = rng.random((k,) + p.shape[:-1])
        labels = np.minimum((np.cumsum(p, axis=-1) < u[..., None]).sum(axis=-1), p.shape[-1] - 1)
        # As one-hot probability targets on the loss's class axis (the same loss and gradient as labels).
        onehot = np.eye(p.shape[-1])[labels]
        draws = list(onehot if last else np.moveaxis(onehot, -1, 2))
        mass = loss.sample_mass(b, y)  # probability targets: H_z carries each sample's target mass
        loss = loss.with_probability_targets()
    elif loss.name == "mse":
        noise = rng.standard_normal((k,) + z_np.shape) / math.sqrt(2.0)
        draws = [z_np + noise[j] for j in range(k)]
    elif loss.name == "bce_with_logits":
        prob = 1.0 / (1.0 + np.exp(-z_np))
        draws = list((rng.random((k,) + z_np.shape) < prob).astype(np.float64))
    elif loss.name == "poisson_nll":
        draws = list(rng.poisson(np.exp(z_np), size=(k,) + z_np.shape).astype(np.float64))
    else:
        raise ValueError(f"method='mc' has no label sampler for loss {loss.name!r}; use method='exact' or 'hutchinson'")
    factor = np.full((1,) * len(z_np.shape), 1.0 / loss.scale(b, z)) if mass is None else mass / loss.scale(b, z)
    root = b.asarray(np.sqrt(factor), z)
    targets = b.asarray(np.stack(draws), z)

    def sampled_gradient(target: Array) -> Array:
        return b.value_and_grad(lambda q: loss.value(b, q, target), z)[1]

    # ∇_z ℓ(z, ŷ) for every draw at once (vmapped where the backend can).
    return map_rows(b, sampled_gradient)(targets) * root


# ----------------------------------------------------------------------
# Sums of squared per-sample products, in chunks
# ----------------------------------------------------------------------
def _squares(
    state: _State,
    problem: Problem,
    binding: ParameterBinding,
    batch: Any,
    cotangents: Callable[[Array], Array],
    per_cotangent: bool,
    budget: int,
) -> np.ndarray:
    """``Σ_n (J_nᵀ U[k, n])²``, ``U = cotangents(z)``: ``(K, P)`` if ``per_cotangent``, else ``(P,)``.

    The squares are summed on the device in the parameters' dtype, or in
    float32 for half-precision parameters (see :func:`_widened`), and left
    there; a model whose samples interact gives float64 NumPy instead.
    """
    b = problem.backend
    x = batch[0]
    if state.independent is None:
        state.independent = _samples_independent(b, binding, x)
    f, w = _widened(b, binding)
    if not state.independent:
        return _squares_full_batch(b, f, w, x, cotangents, per_cotangent, budget)
    if per_cotangent not in state.squares:
        state.squares[per_cotangent] = b.per_sample_squares(f, per_cotangent)
    return state.squares[per_cotangent](w, x, cotangents, budget)


def _widened(b: Backend, binding: ParameterBinding) -> tuple[Callable[[Array, Any], Array], Array]:
    """``(apply, w)`` with half-precision parameters entering through a float32 copy.

    The model still runs in its own dtype (``apply`` casts the float32
    vector back first), so every per-sample product is computed in float16
    or bfloat16, but the derivative of that cast turns each product into
    float32 before it is squared and summed: squares of float16 products
    under 6e-5 (2^-14) would be subnormal or zero, and sums over many
    samples above 65504 would be inf.
    """
    if itemsize(binding.w) >= 4:
        return binding.apply, binding.w
    xp, dtype = b.xp, binding.w.dtype
    return (lambda w, x: binding.apply(xp.astype(w, dtype), x)), xp.astype(binding.w, xp.float32)


def _samples_independent(b: Backend, binding: ParameterBinding, x: Any) -> bool:
    """Whether a few samples evaluated alone give the batch's outputs (no batch statistics)."""
    if not isinstance(x, tuple) and not b.is_array(x):
        raise TypeError(
            "exact and Monte Carlo GGN diagonals need the inputs x as an array, or a tuple of arrays, with the "
            f"samples along axis 0; got {type(x).__name__}"
        )
    z = binding.apply(binding.w, x)
    N = shape(z)[0]
    z_np = np.asarray(b.to_numpy(z), dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(z_np))) if z_np.size else 1.0)
    tol = 10.0 * math.sqrt(machine_epsilon(z)) * scale
    for n in sorted({0, N // 2, N - 1})[:_SAMPLE_CHECKS]:
        try:
            alone = binding.apply(binding.w, sample_slice(x, n, n + 1))
        except Exception:  # a model that cannot run on one sample alone mixes its samples
            return False
        alone = np.asarray(b.to_numpy(alone), dtype=np.float64)
        if alone.shape != z_np[n : n + 1].shape or np.max(np.abs(alone - z_np[n : n + 1]), initial=0.0) > tol:
            return False
    return True


def _squares_full_batch(
    b: Backend,
    f: Callable[[Array, Any], Array],
    w: Array,
    x: Any,
    cotangents: Callable[[Array], Array],
    per_cotangent: bool,
    budget: int,
) -> np.ndarray:
    """The same sums by VJPs through the whole batch, one per (column, sample): exact when samples interact."""
    lin = b.linearize(f, w, x)
    U = cotangents(b.stop_gradient(lin.out))
    K, N = shape(U)[:2]
    out_shape = shape(U)[2:]
    P = shape(w)[0]
    item = itemsize(w)
    per_row = (P + N * math.prod(out_shape)) * item
    rows = int(max(1, budget // max(per_row, 1)))
    total = np.zeros((K, P))
    ones = (1,) * len(out_shape)
    for k in range(K):
        for n0 in range(0, N, rows):
            n1 = min(n0 + rows, N)
            # Row j: column k of sample n0 + j, zero on every other sample.
            mask = np.zeros((n1 - n0, N) + ones)
            mask[np.arange(n1 - n0), np.arange(n0, n1)] = 1.0
            cot = U[k][None] * b.asarray(mask, U)
            grads = np.asarray(b.to_numpy(lin.vjp_batched(cot)), dtype=np.float64)
            total[k] += np.sum(grads * grads, axis=0)  # squared in float64 on the host
    return total if per_cotangent else total.sum(axis=0)
