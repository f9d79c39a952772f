"""Spectra of symmetric curvature operators: extreme eigenvalues and the spectral density."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import dtype_name
from ._backend import Array
from ._checks import check_choice, check_count, check_operator, check_positive, make_rng
from ._lanczos import DeviceOperator, lanczos_extreme, lanczos_quadrature, power_iteration, wanted_indices
from ._operator import CurvatureOperator
from ._probes import draw_probes, probe_order
from ._progress import planned_passes

_WHICH = ("largest", "magnitude")
_METHODS = ("lanczos", "power")
_POWER_STEPS = 1000
"""Default cap on power-iteration products per eigenpair."""
_LANCZOS_STEPS = 300
"""Default cap on Lanczos steps (raised to ``3k`` for large ``k``, lowered to ``n``)."""
_GRID_POINTS = 512
_RESOLUTION = 10.0
"""Relative residuals below this many ε of the products cannot be told from their rounding.

The float16 products of a small tanh MLP's Hessian are off by about 0.5 ε ‖A‖ (see
``tests/test_device_linalg.py``); a tolerance below ``10 ε`` is never reported as met.
"""


def random_vectors(op: CurvatureOperator, seed: Any) -> Callable[[int, str], np.ndarray]:
    """``draw(num, distribution)``: fresh float64 probes of ``op``'s columns from one seed.

    Drawn by parameter name (see ``_probes``), so that a seed means the same
    vectors for the same parameters in every framework, whatever order the
    framework keeps them in.
    """
    rng, n, order = make_rng(seed), op.shape[1], probe_order(op)
    return lambda num, distribution: draw_probes(rng, num, n, distribution, order)


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
    tol: float | None = None,
    seed: int | None = 0,
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
        ``"lanczos"``: Lanczos with partial reorthogonalization, without
        restarts (the default; a few tens of products for well separated top
        eigenvalues).  ``"power"``: power iteration with deflation, slower,
        for comparison.
    num_iterations : int, optional
        Maximum number of products: Lanczos steps in all (default
        ``min(n, max(300, 3k))``, at least ``k``), or power iterations per
        eigenvalue (default 1000).
    tol : float, optional
        Convergence tolerance: each wanted pair must have
        ``‖A x - θ x‖ ≤ tol · s``, with ``s`` an estimate of ``‖A‖`` (the
        largest Ritz value in magnitude).  An eigenvalue is then accurate to
        about ``min(tol · s, tol² · s / gap)``, with ``gap`` its distance to
        the rest of the spectrum, and never better than the precision of the
        products.  Default: the square root of the machine epsilon ``ε`` of
        the products' dtype (1.5e-8 in float64, 3.5e-4 in float32, 0.031 in
        float16), or of the accumulation dtype where that is coarser.  A
        ``tol`` below ``10 ε``, which rounding hides, is never reported as met.
    seed : int or None
        Seed of ``numpy.random.default_rng`` for the starting vectors, drawn
        by parameter name: one seed gives the same numbers in every framework.
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

    Raises
    ------
    ValueError
        For ``k`` outside ``[1, n]``, an unknown ``which`` or ``method``, or
        a cross block (not symmetric).
    TypeError
        For a non-integer ``k`` or ``num_iterations``, or ``op`` that is not
        a curvature operator.

    Notes
    -----
    Everything of length ``n`` stays on the parameters' device: each step is
    one product ``op._matmat_rows`` with one vector in the operator's dtype,
    and the Krylov basis (``steps · n`` numbers) is kept there, in float64
    where the device has it (float32 otherwise: JAX without
    ``jax_enable_x64``, Apple's MPS).  Each new vector is orthogonalized
    against the last two, and against all of the basis only when Simon's
    recurrence says that rounding has grown past ``√ε`` (partial
    reorthogonalization): the basis stays orthogonal to ``√ε``, which keeps
    the Ritz values as accurate as the products.
    Per step, a few scalars come back to the host, where the small
    tridiagonal eigenproblems are solved in float64.  Lanczos from one starting
    vector sees each distinct eigenvalue once while its Krylov space grows:
    further copies of an eigenvalue of multiplicity > 1 appear only after
    the space becomes invariant (typically for small ``n`` or low rank),
    when the run continues from a fresh direction orthogonal to it.  A
    ``RuntimeWarning`` says when the tolerance was not met within
    ``num_iterations``.

    Examples
    --------
    >>> H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    >>> top = mh.eigvalsh(H, k=3)
    >>> bool(np.allclose(top, np.linalg.eigvalsh(H.dense().numpy())[::-1][:3]))
    True
    >>> values, vectors = mh.eigvalsh(H, k=1, return_eigenvectors=True)
    >>> vectors.shape
    torch.Size([67, 1])
    """
    op = check_operator(op, "eigvalsh")
    n = op.shape[0]
    k = check_count(k, "k")
    if k > n:
        raise ValueError(f"k={k} is larger than the operator's dimension {n}; ask for at most {n} eigenvalues")
    which = check_choice(which, "which", _WHICH)
    method = check_choice(method, "method", _METHODS)
    apply = DeviceOperator(op)
    # The products' precision, or the accumulation's where that is coarser (float32 without float64).
    eps = apply.eps
    tol = float(np.sqrt(eps)) if tol is None else check_positive(tol, "tol")
    if num_iterations is not None:
        num_iterations = check_count(num_iterations, "num_iterations", minimum=k if method == "lanczos" else 1)
    draw = random_vectors(op, seed)

    def gaussian() -> np.ndarray:
        return draw(1, "gaussian")[0]

    rows = None
    if method == "lanczos":
        default_steps = min(n, max(_LANCZOS_STEPS, 3 * k))
        max_steps = default_steps if num_iterations is None else min(num_iterations, n)
        breakdown = breakdown_threshold(tol, eps)
        with planned_passes(max_steps, "eigvalsh (lanczos)"):
            result = lanczos_extreme(apply, n, k, which, max_steps, tol, breakdown, gaussian, _RESOLUTION * eps)
        idx = wanted_indices(result.values, k, which)
        values, converged = result.values[idx], result.converged
        if return_eigenvectors:
            rows = result.basis.combine(np.ascontiguousarray(result.vectors[:, idx].T))  # Ritz vectors Yᵀ Q, (k, n)
    else:
        max_steps = _POWER_STEPS if num_iterations is None else num_iterations
        with planned_passes(k * max_steps, "eigvalsh (power)"):  # at most max_steps per eigenvalue
            values, found, converged = power_iteration(apply, n, k, which, max_steps, tol, gaussian)
        order = wanted_indices(values, k, which)
        values = values[order]
        rows = op.backend.xp.stack([found[int(i)] for i in order]) if return_eigenvectors else None
    if not converged:
        per = " per eigenvalue" if method == "power" else ""
        floor = _RESOLUTION * eps
        if tol < floor:  # no number of steps can certify it
            coarse = dtype_name(apply.device.like if eps > apply.eps_product else op.cols.w)
            why = f", which is below what {coarse} arithmetic resolves (about {floor:.1g}); raise tol to at least that"
        else:
            why = "; the eigenvalues are less accurate (raise num_iterations, or tol)"
        warnings.warn(
            f"eigvalsh: {method} did not reach tol={tol:g} within {max_steps} products{per}{why}",
            RuntimeWarning,
            stacklevel=2,
        )
    values = np.asarray(values, dtype=np.float64)
    if not return_eigenvectors:
        return values
    # Columns in the parameters' dtype, on their device.
    return values, apply.to_product_dtype(op.backend.xp.matrix_transpose(rows))


def breakdown_threshold(tol: float, eps: float) -> float:
    """The relative residual below which Lanczos takes its Krylov space as invariant.

    Far enough above the rounding of the products to catch a true invariant
    subspace (at most a few hundred ε in practice, so ``1e3 ε``, and never
    more than ``√ε``, which is already 3 % of the norm in float16), and no
    larger than the tolerance asked for unless that is below the rounding.
    A breakdown above ``tol`` restarts the recurrence but certifies nothing
    (see :func:`multihess._lanczos.lanczos_extreme`).
    """
    root = float(np.sqrt(eps))
    return max(min(tol, root), min(1e3 * eps, root))


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
        ``Σ_p Σ_j weights[p, j] N(t; nodes[p, j], σ²) / num_probes`` at each
        grid point ``t``.  On the default grid, which covers every node by
        ``5σ``, it is rescaled so that its trapezoidal integral is exactly 1
        (it is 1 up to discretization already); on a given grid the values
        are left as they are.
    nodes : ndarray, shape (num_probes, m)
        Gauss quadrature nodes (Ritz values) of each probe, ascending;
        ``m = min(num_steps, n)``.  A probe whose Krylov space became
        invariant after ``m' < m`` steps repeats its last node with weight 0.
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
    seed: int | None = 0,
) -> SpectralDensity:
    """The eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    For ``num_probes`` random Rademacher vectors ``v`` (normalized), Lanczos
    with partial reorthogonalization builds an ``m``-point Gauss quadrature rule
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
        (finite, strictly increasing).
    sigma : float, optional
        Width of the Gaussian broadening; default 1% of the spread of the
        nodes (of their magnitude if they coincide, 0.01 if all are 0).
    seed : int or None
        Seed of ``numpy.random.default_rng`` for the probes, drawn by
        parameter name: one seed gives the same probes in every framework.

    Returns
    -------
    SpectralDensity

    Notes
    -----
    The bases of all probes are kept on the parameters' device, in float64
    where it has it (``8 · num_probes · num_steps · n`` bytes); per step, a
    few scalars per probe come back to the host.

    Examples
    --------
    >>> sd = mh.spectral_density(mh.hessian(model, data=(x, y), loss="cross_entropy"), num_probes=10)
    >>> sd.grid.shape == sd.density.shape
    True
    """
    op = check_operator(op, "spectral_density")
    n = op.shape[0]
    num_probes = check_count(num_probes, "num_probes")
    num_steps = min(check_count(num_steps, "num_steps"), n)
    if sigma is not None:
        sigma = check_positive(sigma, "sigma")
    points = _check_grid(grid)

    starts = random_vectors(op, seed)(num_probes, "rademacher") / np.sqrt(n)
    apply = DeviceOperator(op)
    with planned_passes(num_steps, "spectral_density"):  # every probe's step in one pass
        nodes, weights = lanczos_quadrature(apply, starts, num_steps, float(np.sqrt(apply.eps)))

    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        spread = hi - lo if hi > lo else max(abs(lo), abs(hi))
        sigma = 0.01 * spread if spread > 0 else 0.01
    if isinstance(points, int):
        points = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
        density = _broadened(points, nodes.ravel(), weights.ravel() / num_probes, sigma)
        density = density / _trapezoid(density, points)
    else:
        density = _broadened(points, nodes.ravel(), weights.ravel() / num_probes, sigma)
        if not np.any(density > 0):
            warnings.warn(
                f"spectral_density: the grid [{points[0]:g}, {points[-1]:g}] holds none of the spectrum, "
                f"which lies in [{lo:g}, {hi:g}]; the density is 0 there",
                RuntimeWarning,
                stacklevel=2,
            )
    return SpectralDensity(points, density, nodes, weights, sigma)


def _check_grid(grid: Any) -> int | np.ndarray:
    if grid is None:
        return _GRID_POINTS
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        return check_count(grid, "grid", minimum=2)
    if isinstance(grid, (bool, str, numbers.Number)):
        raise TypeError(
            f"grid must be a number of points (an int ≥ 2) or a 1-D array of points, got {type(grid).__name__}"
        )
    points = np.asarray(grid)
    if points.ndim != 1 or points.size < 2 or points.dtype.kind not in "fiu":
        raise ValueError(
            "grid must be a number of points (an int ≥ 2) or a 1-D array of at least 2 real points; "
            f"got an array of shape {points.shape} and dtype {points.dtype}"
        )
    points = points.astype(np.float64)
    if not np.all(np.isfinite(points)):
        raise ValueError("grid points must be finite; drop the NaN/inf entries")
    if np.any(np.diff(points) <= 0):
        raise ValueError("grid points must be strictly increasing; sort them and drop duplicates")
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
