"""Diagonal estimators: Hutchinson, XDiag, and the exact or sampled GGN diagonal."""

from __future__ import annotations

import numpy as np

from ._checks import check_choice, check_count, check_memory_budget, check_operator
from ._estimate import Estimate
from ._exact_ggn import ggn_diagonal_samples, ggn_exact_diagonal
from ._operator import CurvatureOperator
from ._probes import DISTRIBUTIONS, RunningMoments, planned_chunks, probe_products, warn_low_precision
from ._progress import planned_passes
from ._sketch import exchangeable_sketch

DIAGONAL_METHODS = ("hutchinson", "xdiag", "exact", "mc")


def diagonal(
    op: CurvatureOperator,
    num_probes: int = 10,
    *,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    seed: int = 0,
    num_samples: int | None = None,
    memory_budget: int | None = None,
) -> Estimate:
    """Estimate (or compute) the diagonal of a symmetric curvature operator.

    Parameters
    ----------
    op : CurvatureOperator
        A Hessian, a GGN, or a diagonal block of one (``params=``).
    num_probes : int
        Products with random vectors: every probe of Hutchinson, all
        products of XDiag (at least 2).  Ignored by ``"exact"`` and ``"mc"``.
    method : {"hutchinson", "xdiag", "exact", "mc"}
        ``"hutchinson"``: the mean of ``z ⊙ Az`` over the probes (Bekas,
        Kokiopoulou and Saad 2007).  ``"xdiag"``: XDiag (Epperly, Tropp and
        Webber 2024): ``num_probes // 2`` test vectors ``ω_i``; with ``Q_(i)``
        an orthonormal basis of ``A`` times the other test vectors, the
        exchangeable estimates ``diag(Q_(i)Q_(i)ᵀA) + ω_i ⊙ ((I − Q_(i)Q_(i)ᵀ) A ω_i)``
        are averaged.  ``"exact"`` (a GGN only): ``diag(G) = Σ_n Σ_c (J_nᵀ S_n[:, c])²``
        through the square root ``S_n`` of the loss's output Hessian, ``C``
        per-sample vector-Jacobian products per input, for any model the
        framework differentiates.  ``"mc"`` (a GGN only): the same with
        ``num_samples`` random columns per input, the gradients ``∇_z ℓ(z, ŷ)``
        of the loss at labels ``ŷ`` drawn from the model's predictive
        distribution (scaled so that ``E[r rᵀ] = H_z``): unbiased, and
        cheaper than exact when the output has many entries.
    distribution : {"rademacher", "gaussian"}
        Entries of the probes.  Both give unbiased estimates.
    seed : int
        Seed of ``numpy.random.default_rng`` for the probes or the sampled
        labels: one seed gives the same estimate in every framework.
    num_samples : int, optional
        Labels sampled per input for ``method="mc"`` (default 1).
    memory_budget : int, optional
        Bytes the probe and product blocks, or the per-sample gradients, may
        take at once; default 1 GiB.

    Returns
    -------
    Estimate
        ``value`` and ``std_error`` are 1-D arrays of the operator's
        framework, dtype and device, in the operator's parameter order
        (``op.rows.names``; ``op.rows.to_tree(value)`` gives a parameter
        tree).  The standard error is per entry: for Hutchinson the sample
        standard deviation of ``z_i ⊙ Az_i`` over ``sqrt(num_probes)``; for
        XDiag the same spread of its exchangeable estimates (the analogue of
        XTrace's error estimate); for ``"mc"`` the spread of the
        ``num_samples`` independent estimates; 0 for ``"exact"``; NaN where a
        single sample leaves it undefined.

    Raises
    ------
    ValueError
        ``method="exact"`` or ``"mc"`` on an operator that is not a GGN (the
        exact Hessian has no such square root): use ``"hutchinson"`` or
        ``"xdiag"``.

    Notes
    -----
    Hutchinson's probe products are accumulated in float64 on the host;
    XDiag's sketch and estimate stay on the device, in float64 where the
    device has it (float32 otherwise); the exact and
    Monte Carlo diagonals are summed on the device per chunk of samples and
    accumulated in float64 on the host.  Products run in the operator's
    dtype; for float16 and bfloat16 operators the per-sample products of the
    exact and Monte Carlo diagonals are squared and summed in float32, and
    the float64 result is rounded once to the operator's dtype at the end
    (entries beyond float16's 65504 become inf there, as they would be in
    any float16 array).  A ``UserWarning`` says once per operator that
    half-precision products carry their rounding.  For the exact diagonal the inputs
    must be processed independently by the model (no batch statistics): this
    is checked on a few samples, and a model that mixes its inputs falls back
    to full-batch products, ``C · N`` of them, which is slow but exact.

    Examples
    --------
    >>> G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    >>> d = mh.diagonal(G, method="exact").value
    >>> bool(torch.allclose(d, torch.diagonal(G.dense())))
    True
    >>> G.rows.to_tree(d)["2.weight"].shape
    torch.Size([3, 8])
    """
    op = check_operator(op, "diagonal")
    warn_low_precision(op, "diagonal")
    num_probes = check_count(num_probes, "num_probes")
    method = check_choice(method, "method", DIAGONAL_METHODS)
    distribution = check_choice(distribution, "distribution", DISTRIBUTIONS)
    budget = check_memory_budget(memory_budget)
    if num_samples is not None and method != "mc":
        raise ValueError(f"num_samples applies to method='mc' only; method={method!r} uses num_probes")
    if method == "exact":
        value = ggn_exact_diagonal(op, budget)
        return Estimate(value, op.backend.xp.zeros_like(value), 0, method)
    if method == "mc":
        samples = ggn_diagonal_samples(op, method, num_samples, seed, budget)
        moments = RunningMoments()
        moments.add(samples)
        return _to_framework(op, moments.mean, moments.std_error(), samples.shape[0], method)
    rng = np.random.default_rng(seed)
    if method == "hutchinson":
        moments = RunningMoments()
        with planned_passes(planned_chunks(op, budget, num_probes), "diagonal (hutchinson)"):
            for Z, AZ in probe_products(op, rng, num_probes, distribution, budget):
                moments.add(Z.astype(np.float64) * AZ)  # z ⊙ Az of each probe, in float64
        return _to_framework(op, moments.mean, moments.std_error(), num_probes, method)
    if num_probes < 2:
        raise ValueError(f"method='xdiag' needs num_probes ≥ 2, got {num_probes}")
    with planned_passes(planned_chunks(op, budget, num_probes // 2, num_probes // 2), "diagonal (xdiag)"):
        sketch = exchangeable_sketch(op, rng, num_probes // 2, distribution, budget)
    # The mean and its error are formed on the device: the n-vectors never visit the host.
    value, std_error = sketch.diagonal_estimate()
    xp, like = op.backend.xp, op.rows.w
    return Estimate(xp.astype(value, like.dtype), xp.astype(std_error, like.dtype), num_probes, method)


def _to_framework(op: CurvatureOperator, value: np.ndarray, std_error: np.ndarray, num: int, method: str) -> Estimate:
    """An estimate whose arrays live in the operator's framework, dtype and device."""
    b, like = op.backend, op.rows.w
    return Estimate(b.asarray(np.asarray(value), like), b.asarray(np.asarray(std_error), like), num, method)
