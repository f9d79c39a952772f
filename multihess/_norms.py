"""Norms of curvature operators estimated from products with random probes."""

from __future__ import annotations

import numpy as np

from ._estimate import Estimate
from ._lanczos import host_product
from ._operator import DENSE_CHUNK, CurvatureOperator
from ._spectral import check_choice, check_count, check_operator

_DISTRIBUTIONS = ("rademacher", "gaussian")


def frobenius_norm(
    op: CurvatureOperator, num_probes: int = 10, seed: int = 0, distribution: str = "rademacher"
) -> Estimate:
    """Estimate ``‖A‖_F`` from ``E ‖A z‖² = ‖A‖_F²`` for probes with ``E z zᵀ = I``.

    Parameters
    ----------
    op : CurvatureOperator
        Any operator, cross blocks included.
    num_probes : int
        Number of probes ``z``; their products are computed in batches.
    seed : int
        Seed of ``numpy.random.default_rng`` for the probes (the same numbers
        in every framework).
    distribution : {"rademacher", "gaussian"}
        Entries of the probes: random signs (lower variance) or standard normal.

    Returns
    -------
    Estimate
        ``value`` is ``sqrt(mean ‖A z_i‖²)``; ``std_error`` is the standard
        error of the mean of ``‖A z_i‖²`` carried to the norm by the delta
        method, ``se / (2 ‖A‖_F)`` (NaN with a single probe).

    Examples
    --------
    >>> norm, err = mh.frobenius_norm(mh.ggn(model, data=(x, y), loss="mse"), num_probes=20)  # doctest: +SKIP
    """
    op = check_operator(op, "frobenius_norm", symmetric=False)
    num_probes = check_count(num_probes, "num_probes")
    distribution = check_choice(distribution, "distribution", _DISTRIBUTIONS)
    n = op.shape[1]
    rng = np.random.default_rng(seed)
    if distribution == "rademacher":
        probes = 2.0 * rng.integers(0, 2, size=(num_probes, n)) - 1.0
    else:
        probes = rng.standard_normal((num_probes, n))
    apply = host_product(op)
    # ‖A z‖² of each probe, accumulated in float64 on the host.
    samples = np.concatenate(
        [np.sum(apply(probes[s : s + DENSE_CHUNK]) ** 2, axis=1) for s in range(0, num_probes, DENSE_CHUNK)]
    )
    mean_sq = float(np.mean(samples))
    value = float(np.sqrt(mean_sq))
    if num_probes < 2:
        std_error = float("nan")
    else:
        se_sq = float(np.std(samples, ddof=1)) / np.sqrt(num_probes)
        std_error = se_sq / (2.0 * value) if value > 0 else 0.0
    return Estimate(value, std_error, num_probes, "hutchinson")
