"""Trace estimators: Hutchinson, Hutch++, XTrace, and the exact or sampled GGN trace."""

from __future__ import annotations

import numpy as np

from ._checks import check_choice, check_count, check_memory_budget, check_operator
from ._estimate import Estimate
from ._exact_ggn import ggn_diagonal_samples
from ._operator import CurvatureOperator
from ._probes import DISTRIBUTIONS, RunningMoments, planned_chunks, probe_forms, warn_low_precision
from ._progress import planned_passes
from ._sketch import exchangeable_sketch, hutch_plus_plus

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "exact", "mc")
_MIN_PROBES = {"hutch++": 3, "xtrace": 2}


def trace(
    op: CurvatureOperator,
    num_probes: int = 10,
    *,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    seed: int = 0,
    num_samples: int | None = None,
    memory_budget: int | None = None,
) -> Estimate:
    """Estimate the trace of a symmetric curvature operator.

    Parameters
    ----------
    op : CurvatureOperator
        A Hessian, a GGN, or a diagonal block of one (``params=``).
    num_probes : int
        Products with random vectors the estimate may use: every probe of
        Hutchinson, all products of Hutch++ (at least 3) and XTrace (at
        least 2).  Ignored by ``"exact"`` and ``"mc"``.
    method : {"hutchinson", "hutch++", "xtrace", "exact", "mc"}
        ``"hutchinson"``: the mean of ``zᵀAz`` over ``num_probes`` probes
        (Hutchinson 1989).  ``"hutch++"``: Hutch++ (Meyer, Musco, Musco and
        Woodruff 2021): ``num_probes // 3`` probes sketch the range of ``A``,
        whose part of the trace is taken exactly, and Hutchinson with the
        remaining probes, projected off that range, estimates the rest;
        much more accurate when the spectrum decays.  ``"xtrace"``: XTrace
        (Epperly, Tropp and Webber 2024): ``num_probes // 2`` test vectors,
        each used both in the sketch and, leaving itself out of the sketch,
        as a Hutchinson probe; the estimate averages these exchangeable
        estimates.  ``"exact"`` (a GGN only): the sum of the exact GGN
        diagonal, see :func:`diagonal`.  ``"mc"`` (a GGN only): the sum of
        the Monte Carlo GGN diagonal with ``num_samples`` sampled labels.
    distribution : {"rademacher", "gaussian"}
        Entries of the probes: random signs (the lower variance) or standard
        normal.
    seed : int
        Seed of ``numpy.random.default_rng`` for the probes (or the sampled
        labels): one seed gives the same estimate in every framework.
    num_samples : int, optional
        Labels sampled per input for ``method="mc"`` (default 1).
    memory_budget : int, optional
        Bytes the probe and product blocks (and, for ``"exact"`` and
        ``"mc"``, the per-sample gradients) may take at once; default 1 GiB.
        Probes go through the operator in batches of at most 64 within it.

    Returns
    -------
    Estimate
        ``value`` (float) and ``std_error``:

        - Hutchinson: the sample standard deviation of ``zᵀAz`` over
          ``sqrt(num_probes)``.  The exact variance of one Rademacher sample
          is ``2 (‖A‖_F² − Σ a_ii²)``, of a Gaussian one ``2 ‖A‖_F²``.
        - Hutch++: the same for the Hutchinson part on the remaining probes
          (the sketched part is exact given the sketch).
        - XTrace: its built-in error estimate, the standard deviation of
          the exchangeable estimates over the square root of their number.
        - exact: 0.  mc: the spread of the ``num_samples`` independent
          estimates (NaN for one sample).

        A standard error is NaN where a single sample leaves it undefined.

    Notes
    -----
    Probes go to the device in batches (at most 64 per product) and each
    product comes back once.  Hutchinson reduces each ``zᵀAz`` on the device,
    in the operator's dtype (float32 for float16 and bfloat16 operators,
    whose sums would overflow at 65504 or lose all but 8 bits), and averages
    them in float64 on the host; the
    sketches of Hutch++ and XTrace are held and processed in float64 on the
    host (``num_probes × n`` numbers).  Both are exact up to rounding
    once the sketch captures the whole range of ``A``: with
    ``num_probes ≥ 3 n`` (Hutch++) or ``≥ 2 n + 2`` (XTrace) for Gaussian
    probes (almost surely; a few random sign vectors in a small space are
    often linearly dependent), or when ``A`` has low rank, as a GGN of a
    small batch does (rank at most ``N·C``).  The probes of all methods are
    drawn for the parameters sorted by name and then put in the operator's
    order, so that the same seed gives the same estimate in every framework.
    Where Hutchinson runs as one compiled call per batch of probes (JAX,
    TensorFlow), the probes last sent stay on the device, up to 64 MiB in
    all, and a later call with the same seed uses them instead of drawing
    and sending them again.

    Products are computed in the operator's dtype.  For a float16 or
    bfloat16 operator each product carries that dtype's rounding (relative
    error about 1e-3 and 8e-3), which the estimate inherits; a
    ``UserWarning`` says so once per operator.  The value is a Python float
    whatever the dtype.

    Examples
    --------
    >>> H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    >>> est = mh.trace(H, 30, method="xtrace")
    >>> bool(abs(est.value - torch.trace(H.dense())) <= 5 * est.std_error)
    True
    """
    op = check_operator(op, "trace")
    warn_low_precision(op, "trace")
    num_probes = check_count(num_probes, "num_probes")
    method = check_choice(method, "method", TRACE_METHODS)
    distribution = check_choice(distribution, "distribution", DISTRIBUTIONS)
    budget = check_memory_budget(memory_budget)
    if num_samples is not None and method != "mc":
        raise ValueError(f"num_samples applies to method='mc' only; method={method!r} uses num_probes")
    if method in ("exact", "mc"):
        samples = ggn_diagonal_samples(op, method, num_samples, seed, budget).sum(axis=1)
        return _from_samples(samples, method, exact=method == "exact")
    minimum = _MIN_PROBES.get(method, 1)
    if num_probes < minimum:
        raise ValueError(f"method={method!r} needs num_probes ≥ {minimum}, got {num_probes}")
    rng = np.random.default_rng(seed)
    estimator = {"hutchinson": _hutchinson, "hutch++": _hutch_plus_plus, "xtrace": _xtrace}[method]
    with planned_passes(_planned_passes(op, method, num_probes, budget), f"trace ({method})"):
        return estimator(op, rng, num_probes, distribution, budget)


def _planned_passes(op: CurvatureOperator, method: str, num: int, budget: int) -> int:
    """Batched products each method makes (at most: a rank-deficient sketch needs fewer)."""
    if method == "hutchinson":
        return planned_chunks(op, budget, num)
    if method == "hutch++":  # S → AS, Q → AQ, then the projected probes
        return planned_chunks(op, budget, num // 3, num // 3, num - 2 * (num // 3))
    return planned_chunks(op, budget, num // 2, num // 2)  # XTrace: Ω → AΩ, Q → AQ


def _from_samples(samples: np.ndarray, method: str, exact: bool) -> Estimate:
    """An estimate from independent samples of a scalar (one sample and no error when exact)."""
    if exact:
        return Estimate(float(samples[0]), 0.0, 0, method)
    moments = RunningMoments()
    moments.add(samples)
    return Estimate(float(moments.mean), float(moments.std_error()), len(samples), method)


def _hutchinson(op: CurvatureOperator, rng: np.random.Generator, num: int, distribution: str, budget: int) -> Estimate:
    moments = RunningMoments()
    # zᵀAz of each probe, reduced on the device: only the chunk's scalars come back.
    for forms in probe_forms(op, rng, num, distribution, budget):
        moments.add(forms)
    return Estimate(float(moments.mean), float(moments.std_error()), num, "hutchinson")


def _hutch_plus_plus(
    op: CurvatureOperator, rng: np.random.Generator, num: int, distribution: str, budget: int
) -> Estimate:
    low_rank, samples = hutch_plus_plus(op, rng, num, distribution, budget)  # on the device; scalars come back
    moments = RunningMoments()
    moments.add(samples)
    return Estimate(low_rank + float(moments.mean), float(moments.std_error()), num, "hutch++")


def _xtrace(op: CurvatureOperator, rng: np.random.Generator, num: int, distribution: str, budget: int) -> Estimate:
    sketch = exchangeable_sketch(op, rng, num // 2, distribution, budget)
    samples = sketch.trace_samples()
    moments = RunningMoments()
    moments.add(samples)
    return Estimate(float(moments.mean), float(moments.std_error()), num, "xtrace")
