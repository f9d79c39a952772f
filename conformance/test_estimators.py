"""Trace and diagonal estimators, exact GGN diagonals and per-block summaries against float64 oracles.

Stochastic estimates are checked with seeded tolerances derived from each
estimator's variance, computed from the dense oracle (never from the
estimate): a Hutchinson trace with ``m`` Rademacher probes has variance
``2 (‖A‖_F² − Σ a_ii²) / m``, with Gaussian probes ``2 ‖A‖_F² / m``.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import mh
from ._oracles import _softmax, forward, relative_difference
from ._problems import LOSS_PROBLEMS, Problem, make_problem, tolerance

DISTRIBUTIONS = ("rademacher", "gaussian")
NUM_PROBES = 40
# Bound on |estimate − truth| in standard deviations: 4 for one number, 5 for every entry of a diagonal at once.
SIGMAS_SCALAR, SIGMAS_ENTRIES = 4.0, 5.0


def _operator(problem: Problem, kind: str):
    return problem.hessian() if kind == "hessian" else problem.ggn()


def _oracle(problem: Problem, kind: str, names: list[str] | None = None) -> np.ndarray:
    return problem.oracle_hessian(names) if kind == "hessian" else problem.oracle_ggn(names)


def _trace_variance(A: np.ndarray, distribution: str) -> float:
    """Variance of one Hutchinson sample ``zᵀAz`` for symmetric ``A``."""
    frobenius = float(np.sum(A * A))
    return 2.0 * (frobenius - float(np.sum(np.diag(A) ** 2))) if distribution == "rademacher" else 2.0 * frobenius


def _diagonal_variance(A: np.ndarray, distribution: str) -> np.ndarray:
    """Variance of each entry of one Hutchinson sample ``z ⊙ Az``."""
    off = np.sum(A * A, axis=1) - np.diag(A) ** 2
    return off if distribution == "rademacher" else off + 2.0 * np.diag(A) ** 2


def _numpy(problem: Problem, x) -> np.ndarray:
    return problem.to_numpy(x)


# ----------------------------------------------------------------------
# Hutchinson
# ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,distribution", [("hessian", "rademacher"), ("ggn", "gaussian")])
def test_hutchinson_trace_within_its_variance(backend: str, kind: str, distribution: str) -> None:
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    A = _oracle(p, kind)
    est = mh.trace(_operator(p, kind), NUM_PROBES, distribution=distribution, seed=3)
    sigma = np.sqrt(_trace_variance(A, distribution) / NUM_PROBES)
    assert est.method == "hutchinson" and est.num_probes == NUM_PROBES
    assert abs(est.value - np.trace(A)) <= SIGMAS_SCALAR * sigma
    # The reported standard error estimates sigma (a sample standard deviation of 40 samples).
    assert sigma / 3 <= est.std_error <= 3 * sigma


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_hutchinson_diagonal_within_its_variance(backend: str, distribution: str) -> None:
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    A = p.oracle_hessian()
    est = mh.diagonal(p.hessian(), NUM_PROBES, distribution=distribution, seed=5)
    sigma = np.sqrt(_diagonal_variance(A, distribution) / NUM_PROBES)
    error = np.abs(_numpy(p, est.value) - np.diag(A))
    assert np.all(error <= SIGMAS_ENTRIES * sigma + 1e-12)
    assert _numpy(p, est.std_error).shape == (A.shape[0],)


def test_hutchinson_on_a_parameter_block(backend: str) -> None:
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    names = ["layer1.weight"]
    A = p.oracle_hessian(names)
    est = mh.trace(p.hessian(params=names), NUM_PROBES, seed=1)
    assert abs(est.value - np.trace(A)) <= SIGMAS_SCALAR * np.sqrt(_trace_variance(A, "rademacher") / NUM_PROBES)


# ----------------------------------------------------------------------
# Hutch++, XTrace, XDiag
# ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,dtype", [("hessian", "float64"), ("ggn", "float32")])
def test_sketching_estimators_are_exact_with_enough_probes(backend: str, kind: str, dtype: str) -> None:
    # Gaussian sketches of more than n vectors span everything almost surely (few random
    # sign vectors in a space this small are often linearly dependent).
    p = make_problem("tanh_mlp", backend, dtype=dtype, seed=0)
    A, op = _oracle(p, kind), _operator(p, kind)
    n = A.shape[0]
    scale = float(np.sum(np.abs(np.diag(A))))
    tol = tolerance(dtype, scale).atol * 10
    hpp = mh.trace(op, 3 * n + 3, method="hutch++", distribution="gaussian")
    xtr = mh.trace(op, 2 * n + 2, method="xtrace", distribution="gaussian")
    assert abs(hpp.value - np.trace(A)) <= tol
    assert abs(xtr.value - np.trace(A)) <= tol
    xdg = mh.diagonal(op, 2 * n + 2, method="xdiag", distribution="gaussian")
    np.testing.assert_allclose(_numpy(p, xdg.value), np.diag(A), rtol=0, atol=tol)


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_sketch_covering_a_low_rank_ggn_is_exact(backend: str, method: str) -> None:
    # G = Σ_n J_nᵀ H_z J_n has rank ≤ N (C − 1) = 16 < n = 38: a sketch of 20 vectors captures its range.
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    A = p.oracle_ggn()
    assert np.linalg.matrix_rank(A, tol=1e-10 * np.abs(A).max()) < 20
    num = 60 if method == "hutch++" else 40
    est = mh.trace(p.ggn(), num, method=method, seed=2)
    assert abs(est.value - np.trace(A)) <= 1e-9 * np.trace(A)
    assert est.std_error <= 1e-9 * np.trace(A)


def test_xtrace_and_xdiag_error_estimates_are_sensible(backend: str) -> None:
    # Hessians of the tanh MLP are full rank: 24 probes leave a residual; the estimates stay
    # within a few of their reported errors, and well within Hutchinson's error for as many products.
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    A = p.oracle_hessian()
    hutch_sigma = np.sqrt(_trace_variance(A, "rademacher") / 24)
    est = mh.trace(p.hessian(), 24, method="xtrace", seed=4)
    assert 0 < est.std_error < hutch_sigma
    assert abs(est.value - np.trace(A)) <= SIGMAS_SCALAR * hutch_sigma
    hpp = mh.trace(p.hessian(), 24, method="hutch++", seed=4)
    assert abs(hpp.value - np.trace(A)) <= SIGMAS_SCALAR * hutch_sigma


def test_exchangeable_estimates_match_their_definition() -> None:
    """XTrace and XDiag from the sketch algebra equal the leave-one-out definition (dense NumPy)."""
    ExchangeableSketch, range_basis = mh._sketch.ExchangeableSketch, mh._sketch.range_basis
    rng = np.random.default_rng(0)
    eps = np.finfo(np.float64).eps
    # Full rank, rank deficient, more vectors than dimensions, and a repeated sign vector.
    for n, s, rank, repeat in [(30, 6, 30, False), (30, 8, 4, False), (8, 12, 8, False), (10, 5, 10, True)]:
        B = rng.standard_normal((n, rank))
        A = B @ np.diag(rng.standard_normal(rank)) @ B.T
        Om = np.where(rng.random((n, s)) < 0.5, -1.0, 1.0)
        if repeat:
            Om[:, -1] = Om[:, 0]
        Y = A @ Om
        Q = range_basis(Y, eps)
        sketch = ExchangeableSketch.build(Om, Y, Q, A @ Q)
        traces, diagonals = [], []
        for i in range(s):
            U, sv, _ = np.linalg.svd(np.delete(Y, i, axis=1), full_matrices=False)
            Qi = U[:, sv > sv[0] * 1e-12]
            P = Qi @ Qi.T
            w = Om[:, i]
            u = w - P @ w
            traces.append(np.trace(Qi.T @ A @ Qi) + u @ A @ u)
            diagonals.append(np.diag(P @ A) + w * ((np.eye(n) - P) @ A @ w))
        scale = np.abs(A).max() * n
        np.testing.assert_allclose(sketch.trace_samples(), traces, rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(sketch.diagonal_samples(), np.array(diagonals).T, rtol=0, atol=1e-10 * scale)


# ----------------------------------------------------------------------
# Exact and Monte Carlo GGN diagonals
# ----------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype", [(name, "float64") for name in LOSS_PROBLEMS] + [("tanh_mlp", "float32")])
def test_exact_ggn_diagonal_and_trace(backend: str, name: str, dtype: str) -> None:
    p = make_problem(name, backend, dtype=dtype, seed=0)
    roots = p.oracle_sqrt_hz_jacobians()  # (N, C, n): rows J_nᵀ S_n[:, c]
    expected = np.einsum("ncp,ncp->p", roots, roots)
    rtol = 1e-10 if dtype == "float64" else 1e-4
    est = mh.diagonal(p.ggn(), method="exact")
    assert est.method == "exact" and est.num_probes == 0
    np.testing.assert_allclose(_numpy(p, est.value), expected, rtol=0, atol=rtol * np.abs(expected).max())
    assert np.all(_numpy(p, est.std_error) == 0)
    total = mh.trace(p.ggn(), method="exact")
    assert abs(total.value - expected.sum()) <= rtol * expected.sum()
    assert total.std_error == 0.0


def test_exact_ggn_diagonal_of_a_parameter_block(backend: str) -> None:
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    names = ["layer2.weight", "layer1.bias"]
    G = p.ggn(params=names)
    roots = p.oracle_sqrt_hz_jacobians(G.rows.names)
    expected = np.einsum("ncp,ncp->p", roots, roots)
    np.testing.assert_allclose(_numpy(p, mh.diagonal(G, method="exact").value), expected, rtol=1e-10, atol=0)


def _mc_variance(p: Problem) -> np.ndarray:
    """Variance, per entry, of one sampled label's contribution ``Σ_n (J_nᵀ r_n)²`` (oracle side)."""
    roots = p.oracle_sqrt_hz_jacobians()  # A_n = S_nᵀ J_n, rows c
    second = np.einsum("ncp,ncp->np", roots, roots)  # E[(J_nᵀ r)²] per sample
    ref = p.reference
    if ref.loss == "mse":
        # r = S_n ξ with ξ standard normal: (J_nᵀ r)_i is normal with variance Σ_c A_nci².
        fourth = 3.0 * second**2
    else:
        # r = −S_n[:, ŷ] / √p_ŷ with ŷ ~ softmax: E[(J_nᵀ r)_i⁴] = Σ_c A_nci⁴ / p_c.
        probs = _softmax(forward(ref, ref.params))
        fourth = np.einsum("ncp,nc->np", roots**4, 1.0 / probs)
    return np.sum(fourth - second**2, axis=0)


@pytest.mark.parametrize("name", ["tanh_mlp", "relu_mlp"])
def test_monte_carlo_ggn_diagonal_within_its_variance(backend: str, name: str) -> None:
    p = make_problem(name, backend, dtype="float64", seed=0)
    roots = p.oracle_sqrt_hz_jacobians()
    expected = np.einsum("ncp,ncp->p", roots, roots)
    k = 400
    est = mh.diagonal(p.ggn(), method="mc", num_samples=k, seed=1)
    assert est.method == "mc" and est.num_probes == k
    sigma = np.sqrt(_mc_variance(p) / k)
    error = np.abs(_numpy(p, est.value) - expected)
    assert np.all(error <= SIGMAS_ENTRIES * sigma + 1e-12 * expected.max())
    reported = _numpy(p, est.std_error)
    big = sigma > 1e-3 * sigma.max()
    assert np.all((reported[big] > sigma[big] / 2) & (reported[big] < 2 * sigma[big]))
    total = mh.trace(p.ggn(), method="mc", num_samples=k, seed=1)
    np.testing.assert_allclose(total.value, _numpy(p, est.value).sum(), rtol=1e-12)


def test_exact_needs_a_ggn(backend: str) -> None:
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    for op in (p.hessian(), p.curvature_effect()):
        with pytest.raises(ValueError, match="xdiag"):
            mh.diagonal(op, method="exact")
        with pytest.raises(ValueError, match="hutchinson"):
            mh.trace(op, method="exact")


# ----------------------------------------------------------------------
# Same seed, same numbers
# ----------------------------------------------------------------------
def _all_estimates(backend: str) -> np.ndarray:
    """Every estimator on one problem, entries of diagonals in the oracle's (canonical) parameter order."""
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    H, G = p.hessian(), p.ggn()
    canonical = p.reference.names
    position = {n: i for i, n in enumerate(H.rows.names)}
    offsets = H.rows.offsets()
    order = np.concatenate([np.arange(offsets[n].start, offsets[n].stop) for n in canonical])
    assert sorted(position) == sorted(canonical)
    values = [mh.trace(H, 12, method=m, seed=7).value for m in ("hutchinson", "hutch++", "xtrace")]
    values += [mh.trace(H, 12, distribution="gaussian", seed=7).value]
    diagonals = [
        mh.diagonal(H, 12, seed=7),
        mh.diagonal(H, 12, method="xdiag", seed=7),
        mh.diagonal(G, method="mc", num_samples=3, seed=7),
    ]
    return np.concatenate([np.array(values)] + [_numpy(p, d.value)[order] for d in diagonals])


def test_same_seed_gives_the_same_numbers_in_every_backend(backends: list[str]) -> None:
    assert backends, "no backend could be loaded"
    first = _all_estimates(backends[0])
    # With a single backend, a second run must reproduce the first.
    for other in backends[1:] or backends[:1]:
        assert relative_difference(_all_estimates(other), first) <= 1e-8, f"{other} differs from {backends[0]}"


# ----------------------------------------------------------------------
# Per-block summaries
# ----------------------------------------------------------------------
def test_summary_of_a_ggn_matches_its_oracle_blocks(backend: str) -> None:
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    report = mh.summary(p.ggn())
    assert list(report) == list(dict.fromkeys(n.split(".")[0] for n in p.ggn().rows.names))
    for layer, block in report.items():
        assert sorted(block.names) == sorted(p.layers[layer])
        B = p.oracle_ggn(block.names)
        assert abs(block.trace.value - np.trace(B)) <= 1e-10 * np.trace(B)
        np.testing.assert_allclose(_numpy(p, block.diagonal.value), np.diag(B), rtol=1e-10, atol=0)
        top = np.linalg.eigvalsh(B)[-1]
        assert abs(block.top_eigenvalue - top) <= 1e-8 * top


def test_summary_of_a_hessian_by_blocks_of_probes(backend: str) -> None:
    p = make_problem("tanh_mlp", backend, dtype="float64", seed=0)
    groups = {"weights": "*.weight", "biases": ["layer1.bias", "layer2.bias"]}
    report = mh.summary(p.hessian(), groups, num_probes=NUM_PROBES, seed=2)
    assert list(report) == ["weights", "biases"]
    for block in report.values():
        B = p.oracle_hessian(block.names)
        assert block.trace.method == "hutchinson"
        assert abs(block.trace.value - np.trace(B)) <= SIGMAS_SCALAR * np.sqrt(
            _trace_variance(B, "rademacher") / NUM_PROBES
        )
        sigma = np.sqrt(_diagonal_variance(B, "rademacher") / NUM_PROBES)
        assert np.all(np.abs(_numpy(p, block.diagonal.value) - np.diag(B)) <= SIGMAS_ENTRIES * sigma + 1e-12)
        top = np.linalg.eigvalsh(B)[-1]
        assert abs(block.top_eigenvalue - top) <= 1e-8 * abs(top)
