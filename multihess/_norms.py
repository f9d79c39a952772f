"""Norms of curvature operators estimated from products with random probes."""

from __future__ import annotations

import numpy as np

from ._checks import check_choice, check_count, check_memory_budget, check_operator, make_rng
from ._estimate import Estimate
from ._operator import CurvatureOperator
from ._probes import DISTRIBUTIONS, RunningMoments, planned_chunks, probe_reductions, warn_low_precision
from ._progress import planned_passes


def frobenius_norm(
    op: CurvatureOperator,
    num_probes: int = 10,
    *,
    distribution: str = "rademacher",
    seed: int | None = 0,
    memory_budget: int | None = None,
) -> Estimate:
    """Estimate ``‖A‖_F`` from ``E ‖A z‖² = ‖A‖_F²`` for probes with ``E z zᵀ = I``.

    Parameters
    ----------
    op : CurvatureOperator
        Any operator, cross blocks included.
    num_probes : int
        Number of probes ``z``; their products are computed in batches.
    seed : int or None
        Seed of ``numpy.random.default_rng`` for the probes, which are drawn
        by parameter name: one seed means the same probes in every framework.
    distribution : {"rademacher", "gaussian"}
        Entries of the probes: random signs (lower variance) or standard normal.
    memory_budget : int, optional
        Bytes the probes and products of one batch may take (default 1 GiB).

    Returns
    -------
    Estimate
        ``value`` is ``sqrt(mean ‖A z_i‖²)``; ``std_error`` is the standard
        error of the mean of ``‖A z_i‖²`` carried to the norm by the delta
        method, ``se / (2 ‖A‖_F)`` (NaN with a single probe).

    Notes
    -----
    Each ``‖A z‖²`` is summed on the device in the operator's dtype, or in
    float32 for float16 and bfloat16 operators (a float16 sum of squares
    overflows once it passes 65504), and averaged in float64 on the host.
    Products of float16 and bfloat16 operators carry their rounding, and a
    ``UserWarning`` says so once per operator.

    Examples
    --------
    >>> G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    >>> norm, err = mh.frobenius_norm(G, num_probes=200)
    >>> bool(abs(norm - torch.linalg.matrix_norm(G.dense())) <= 5 * err)
    True
    """
    op = check_operator(op, "frobenius_norm", symmetric=False)
    warn_low_precision(op, "frobenius_norm")
    num_probes = check_count(num_probes, "num_probes")
    distribution = check_choice(distribution, "distribution", DISTRIBUTIONS)
    budget = check_memory_budget(memory_budget)
    rng = make_rng(seed)
    b = op.backend
    moments = RunningMoments()
    # ‖A z‖² of each probe, reduced on the device: only the chunk's scalars come back.
    with planned_passes(planned_chunks(op, budget, num_probes), "frobenius_norm"):
        for squares in probe_reductions(
            op, rng, num_probes, distribution, budget, lambda Z, AZ: b.xp.sum(AZ * AZ, axis=1)
        ):
            moments.add(squares)
    mean_sq = float(moments.mean)
    value = float(np.sqrt(max(mean_sq, 0.0)))
    se_sq = float(moments.std_error())
    std_error = se_sq / (2.0 * value) if value > 0 else (0.0 if num_probes > 1 else float("nan"))
    return Estimate(value, std_error, num_probes, "hutchinson")
