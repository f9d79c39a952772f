"""Spectra of symmetric curvature operators: extreme eigenvalues and the spectral density."""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import Array
from ._lanczos import host_product, lanczos_extreme, lanczos_quadrature, power_iteration, wanted_indices
from ._operator import CurvatureOperator

_WHICH = ("largest", "magnitude")
_METHODS = ("lanczos", "power")
_POWER_STEPS = 1000
"""Default cap on power-iteration products per eigenpair."""


def check_operator(op: Any, what: str, symmetric: bool = True) -> CurvatureOperator:
    """``op`` as a curvature operator (a symmetric one when ``symmetric``), or a clear error."""
    if not isinstance(op, CurvatureOperator):
        raise TypeError(
            f"{what} expects a curvature operator such as mh.hessian(...) or mh.ggn(...), got {type(op).__name__}"
        )
    if symmetric and not op.is_symmetric:
        raise ValueError(
            f"{what} needs a symmetric operator, but this one is a cross block of shape {op.shape} "
            "(rows and columns are different parameters); build it without col_params="
        )
    return op


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """A positive integer argument, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


# ----------------------------------------------------------------------
# Extreme eigenvalues
# ----------------------------------------------------------------------
def eigvalsh(
    op: CurvatureOperator,
    k: int = 5,
    *,
    which: str = "largest",
    method: str = "lanczos",
    num_iterations: int | None = None,
    tol: float = 1e-8,
    seed: int = 0,
    return_eigenvectors: bool = False,
) -> np.ndarray | tuple[np.ndarray, Array]:
    """The ``k`` top eigenvalues of a symmetric operator (optionally with eigenvectors).

    Parameters
    ----------
    op : CurvatureOperator
        A symmetric operator: a Hessian, a GGN, or a diagonal block of one.
    k : int
        Number of eigenvalues, ``1 ≤ k ≤ n``.
    which : {"largest", "magnitude"}
        ``"largest"``: the ``k`` algebraically largest, in descending order;
        ``"magnitude"``: the ``k`` of largest absolute value, by descending
        absolute value.
    method : {"lanczos", "power"}
        ``"lanczos"``: Lanczos with full reorthogonalization, without
        restarts (the default; a few tens of products for well separated top
        eigenvalues).  ``"power"``: power iteration with deflation, slower,
        for comparison.
    num_iterations : int, optional
        Maximum number of products: Lanczos steps in all (default ``n``), or
        power iterations per eigenvalue (default 1000).
    tol : float
        Convergence tolerance: each wanted Ritz pair must have
        ``‖A x - θ x‖ ≤ tol · |θ_max|`` (Lanczos, with ``θ_max`` the Ritz
        value of largest magnitude) or ``≤ tol · |θ|`` (power iteration).
        Eigenvalues are then accurate to about ``tol²·|θ_max|/gap``, but
        never better than the precision of the products.
    seed : int
        Seed of ``numpy.random.default_rng`` for the starting vectors, so
        one seed gives the same numbers in every framework.
    return_eigenvectors : bool
        Also return the eigenvectors.

    Returns
    -------
    values : ndarray of float64, shape (k,)
    vectors : Array, shape (n, k)
        Only with ``return_eigenvectors=True``: unit eigenvectors as the
        columns of a flat array of the model's framework (dtype and device of
        the parameters); column ``i`` belongs to ``values[i]``.  Turn one into
        a parameter tree with ``op.rows.to_tree(vectors[:, i])``.

    Notes
    -----
    The Krylov basis is kept on the host in float64 (``num_steps × n`` numbers);
    each step moves one vector to the device and back.  Lanczos from one
    starting vector sees each distinct eigenvalue of an invariant subspace
    once: copies of a repeated eigenvalue appear only when the Krylov space is
    exhausted (small ``n``).  A warning is issued when the tolerance is not met
    within ``num_iterations``.

    Examples
    --------
    >>> top = mh.eigvalsh(mh.hessian(model, data=(x, y), loss="cross_entropy"), k=3)  # doctest: +SKIP
    """
    op = check_operator(op, "eigvalsh")
    n = op.shape[0]
    k = check_count(k, "k")
    if k > n:
        raise ValueError(f"k={k} is larger than the operator's dimension {n}; ask for at most {n} eigenvalues")
    which = check_choice(which, "which", _WHICH)
    method = check_choice(method, "method", _METHODS)
    tol = check_positive(tol, "tol")
    if num_iterations is not None:
        num_iterations = check_count(num_iterations, "num_iterations", minimum=k if method == "lanczos" else 1)
    rng = np.random.default_rng(seed)
    apply = host_product(op)

    if method == "lanczos":
        max_steps = n if num_iterations is None else min(num_iterations, n)
        result = lanczos_extreme(apply, n, k, which, max_steps, tol, rng)
        idx = wanted_indices(result.values, k, which)
        values = result.values[idx]
        converged = result.converged
        vectors = result.basis.T @ result.vectors[:, idx] if return_eigenvectors else None
    else:
        max_steps = _POWER_STEPS if num_iterations is None else num_iterations
        values, vectors, converged = power_iteration(apply, n, k, which, max_steps, tol, rng)
        order = wanted_indices(values, k, which)
        values, vectors = values[order], vectors[:, order]
    if not converged:
        warnings.warn(
            f"eigvalsh: {method} did not reach tol={tol:g} within num_iterations={max_steps}; "
            "the eigenvalues are less accurate (raise num_iterations or tol)",
            RuntimeWarning,
            stacklevel=2,
        )
    values = np.asarray(values, dtype=np.float64)
    if not return_eigenvectors:
        return values
    return values, op.backend.from_numpy(np.ascontiguousarray(vectors), op.cols.w)


# ----------------------------------------------------------------------
# Spectral density by stochastic Lanczos quadrature
# ----------------------------------------------------------------------
@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed eigenvalue density and the quadrature rules it came from.

    Attributes
    ----------
    grid : ndarray, shape (g,)
        Points where the density is evaluated.
    density : ndarray, shape (g,)
        The Gaussian-broadened density of eigenvalues, normalized so that its
        trapezoidal integral over ``grid`` is 1.
    nodes : ndarray, shape (num_probes, m)
        Gauss quadrature nodes (Ritz values) of each probe, ascending;
        ``m = min(num_steps, n)``.
    weights : ndarray, shape (num_probes, m)
        Their weights (squared first components of the tridiagonal's
        eigenvectors); each row sums to 1.  ``Σ_j weights[p, j] f(nodes[p, j])``
        estimates ``tr f(A) / n``.
    sigma : float
        The width of the Gaussian broadening.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float


def spectral_density(
    op: CurvatureOperator,
    num_probes: int = 5,
    num_steps: int = 30,
    grid: int | np.ndarray | None = None,
    sigma: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """The eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    For ``num_probes`` random Rademacher vectors ``v`` (normalized), Lanczos
    with full reorthogonalization builds an ``m``-point Gauss quadrature rule
    for ``vᵀ f(A) v``; averaged over the probes it estimates
    ``tr f(A) / n = ∫ f(λ) ρ(λ) dλ`` (Ubaru, Chen and Saad 2017; for Hessians,
    Ghorbani, Krishnan and Xiao 2019).  The density is the average rule with
    each node spread into a Gaussian of width ``sigma``.

    Parameters
    ----------
    op : CurvatureOperator
        A symmetric operator.
    num_probes : int
        Number of random starting vectors; all advance together, one batched
        product per step.
    num_steps : int
        Lanczos steps per probe (capped at ``n``).  With ``num_steps ≥ n`` the
        nodes are the eigenvalues themselves.
    grid : int or 1-D array, optional
        Number of evenly spaced points (default 512) over
        ``[min node - 5σ, max node + 5σ]``, or the points themselves
        (increasing).
    sigma : float, optional
        Width of the Gaussian broadening; default 1% of the spread of the
        nodes (of their magnitude if they coincide, 0.01 if all are 0).
    seed : int
        Seed of ``numpy.random.default_rng`` for the probes.

    Returns
    -------
    SpectralDensity
    """
    op = check_operator(op, "spectral_density")
    n = op.shape[0]
    num_probes = check_count(num_probes, "num_probes")
    num_steps = min(check_count(num_steps, "num_steps"), n)
    if sigma is not None:
        sigma = check_positive(sigma, "sigma")
    points = _check_grid(grid)

    rng = np.random.default_rng(seed)
    starts = (2.0 * rng.integers(0, 2, size=(num_probes, n)) - 1.0) / np.sqrt(n)
    nodes, weights = lanczos_quadrature(host_product(op), starts, num_steps)

    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        spread = hi - lo if hi > lo else max(abs(lo), abs(hi))
        sigma = 0.01 * spread if spread > 0 else 0.01
    if isinstance(points, int):
        points = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    density = _broadened(points, nodes.ravel(), weights.ravel() / num_probes, sigma)
    mass = _trapezoid(density, points)
    if not mass > 0:
        raise ValueError(
            f"the grid [{points[0]:g}, {points[-1]:g}] holds none of the spectrum, which lies in "
            f"[{lo:g}, {hi:g}]; widen the grid or let it default"
        )
    return SpectralDensity(points, density / mass, nodes, weights, sigma)


def _check_grid(grid: Any) -> int | np.ndarray:
    if grid is None:
        return 512
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        return check_count(grid, "grid", minimum=2)
    points = np.asarray(grid)
    if points.ndim != 1 or points.size < 2 or points.dtype.kind not in "fiu":
        raise ValueError("grid must be a number of points (int ≥ 2) or a 1-D array of at least 2 real points")
    points = points.astype(np.float64)
    if not np.all(np.isfinite(points)) or np.any(np.diff(points) <= 0):
        raise ValueError("grid points must be finite and strictly increasing")
    return points


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2)


def _broadened(points: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """``Σ_j w_j N(t; θ_j, σ²)`` at every grid point ``t``, in chunks of nodes to bound memory."""
    density = np.zeros_like(points)
    norm = 1.0 / (sigma * np.sqrt(2 * np.pi))
    for start in range(0, nodes.size, 256):
        theta, w = nodes[start : start + 256], weights[start : start + 256]
        density += norm * np.exp(-0.5 * ((points[:, None] - theta[None, :]) / sigma) ** 2) @ w
    return density
