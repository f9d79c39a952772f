"""Spectra, norms and the chain-rule error of every backend against NumPy float64 oracles.

Eigenvalues are checked against ``numpy.linalg.eigvalsh`` of the dense
oracle matrices, eigenvectors by their residual against the oracle matrix,
and the stochastic estimators (spectral density, Frobenius norm) against the
oracle's exact value within a tolerance derived from the estimator's exact
variance for Rademacher probes, ``Var(zᵀBz) = 2(‖B‖_F² − Σ_i B_ii²)``.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import mh
from ._problems import Problem, make_problem, tolerance

# Problems whose top eigenvalues are checked: a repeated spectrum (linear
# regression: every eigenvalue twice), a null space (the GGNs), negative
# eigenvalues (the tanh MLP's Hessian, the input function).
SPECTRUM_CASES = [
    ("linear_regression", "hessian"),
    ("softmax_regression", "ggn"),
    ("tanh_mlp", "hessian"),
    ("relu_mlp", "ggn"),
    ("input_function", "hessian"),
]
WHICH = ("largest", "magnitude")
# Statistical checks allow this many standard deviations (the seeds are fixed, so they are deterministic).
Z = 5.0


def _operator(problem: Problem, kind: str, **kw) -> tuple[object, np.ndarray]:
    """The operator and its dense float64 oracle, in the operator's order."""
    if kind == "hessian":
        op = problem.hessian(**kw)
        return op, problem.oracle_hessian(op.rows.names, op.cols.names)
    op = problem.ggn(**kw)
    return op, problem.oracle_ggn(op.rows.names, op.cols.names)


def _top(values: np.ndarray, k: int, which: str) -> np.ndarray:
    key = values if which == "largest" else np.abs(values)
    return values[np.argsort(-key, kind="stable")[:k]]


def _rademacher_variance(B: np.ndarray) -> float:
    """``Var(sᵀ B s)`` for a symmetric ``B`` and a vector ``s`` of independent random signs."""
    return 2.0 * (float(np.sum(B * B)) - float(np.sum(np.diag(B) ** 2)))


# ----------------------------------------------------------------------
# Extreme eigenvalues
# ----------------------------------------------------------------------
@pytest.mark.parametrize("name,kind", SPECTRUM_CASES)
@pytest.mark.parametrize("which", WHICH)
def test_lanczos_top_k_and_eigenvectors(backend: str, name: str, kind: str, which: str) -> None:
    problem = make_problem(name, backend, "float64")
    op, A = _operator(problem, kind)
    oracle = np.linalg.eigvalsh(A)
    k = 4
    expected = _top(oracle, k, which)
    values, vectors = mh.eigvalsh(op, k=k, which=which, return_eigenvectors=True)
    scale = float(np.max(np.abs(oracle)))
    assert isinstance(values, np.ndarray) and values.dtype == np.float64 and values.shape == (k,)
    np.testing.assert_allclose(values, expected, rtol=1e-8, atol=1e-10 * scale)

    backend_impl = mh.get_backend(backend)
    assert backend_impl.is_array(vectors) and backend_impl.to_numpy(vectors).dtype == np.float64
    X = problem.to_numpy(vectors)
    assert X.shape == (A.shape[0], k)
    np.testing.assert_allclose(X.T @ X, np.eye(k), atol=1e-8)
    residuals = np.linalg.norm(A @ X - X * values, axis=0)
    assert np.all(residuals <= 1e-6 * scale), f"‖A x − λ x‖ = {residuals} against the oracle"


@pytest.mark.parametrize(
    "name,kind,which",
    [
        ("relu_mlp", "hessian", "largest"),
        ("input_function", "hessian", "magnitude"),
        ("softmax_regression", "hessian", "largest"),
    ],
)
def test_power_iteration_top_k(backend: str, name: str, kind: str, which: str) -> None:
    problem = make_problem(name, backend, "float64")
    op, A = _operator(problem, kind)
    oracle = np.linalg.eigvalsh(A)
    expected = _top(oracle, 3, which)
    values, vectors = mh.eigvalsh(op, k=3, which=which, method="power", return_eigenvectors=True)
    scale = float(np.max(np.abs(oracle)))
    np.testing.assert_allclose(values, expected, rtol=1e-8, atol=1e-10 * scale)
    X = problem.to_numpy(vectors)
    residuals = np.linalg.norm(A @ X - X * values, axis=0)
    assert np.all(residuals <= 1e-6 * scale), f"‖A x − λ x‖ = {residuals} against the oracle"


def test_repeated_and_zero_eigenvalues(backend: str) -> None:
    # A quadratic ½ wᵀAw has Hessian A: here with an eigenvalue of multiplicity 3, one of
    # multiplicity 2 and a null space, which one Krylov space alone cannot resolve.
    spectrum = np.array([3.0, 3.0, 3.0, -2.5, -2.5, 2.0, 1.0, 0.5] + [0.0] * 8)
    n = spectrum.size
    Q = np.linalg.qr(np.random.default_rng(4).standard_normal((n, n)))[0]
    A = (Q * spectrum) @ Q.T
    A = (A + A.T) / 2
    xp = mh.get_backend(backend).xp
    to_backend = make_problem("input_function", backend, "float64").to_backend
    A_b = to_backend(A)

    def quadratic(w):
        row = xp.reshape(w, (1, n))
        return xp.sum((row @ A_b) * row) / 2

    op = mh.hessian(quadratic, to_backend(np.zeros(n)), backend=backend)
    for which in WHICH:
        expected = _top(spectrum, 5, which)
        np.testing.assert_allclose(mh.eigvalsh(op, k=5, which=which), expected, rtol=1e-8, atol=1e-12, err_msg=which)
        values = mh.eigvalsh(op, k=5, which=which, method="power")
        np.testing.assert_allclose(values, expected, rtol=1e-8, atol=1e-12, err_msg=f"power, {which}")


def test_lanczos_on_a_diagonal_block(backend: str) -> None:
    problem = make_problem("tanh_mlp", backend, "float64")
    op, A = _operator(problem, "hessian", params="layer1.*")
    assert op.shape == (A.shape[0], A.shape[0]) and A.shape[0] < problem.size
    values = mh.eigvalsh(op, k=3, which="magnitude")
    np.testing.assert_allclose(values, _top(np.linalg.eigvalsh(A), 3, "magnitude"), rtol=1e-8)


def test_same_seed_same_numbers_in_every_backend(backends: list[str]) -> None:
    # Random vectors are drawn by parameter name, so a seed means the same vectors even
    # where frameworks order the parameters differently (JAX sorts dict keys).
    found = {}
    for name in backends:
        op, _ = _operator(make_problem("tanh_mlp", name, "float64"), "hessian")
        sd = mh.spectral_density(op, num_probes=3, num_steps=8, seed=3)
        found[name] = {
            "lanczos": mh.eigvalsh(op, k=3, seed=7),
            "power": mh.eigvalsh(op, k=2, method="power", seed=7),
            "nodes": sd.nodes,
            "weights": sd.weights,
            "frobenius": np.array([mh.frobenius_norm(op, num_probes=5, seed=2).value]),
        }
    first = found[backends[0]]
    for name, results in found.items():
        for what, values in results.items():
            np.testing.assert_allclose(values, first[what], rtol=1e-8, atol=1e-12, err_msg=f"{name}: {what}")


def test_float32_eigenvalues(backend: str) -> None:
    problem = make_problem("tanh_mlp", backend, "float32")
    op, A = _operator(problem, "hessian")
    oracle = np.linalg.eigvalsh(A)
    tol = tolerance("float32", float(np.max(np.abs(oracle))))
    for method in ("lanczos", "power"):
        values = mh.eigvalsh(op, k=2, method=method)
        np.testing.assert_allclose(values, _top(oracle, 2, "largest"), **tol, err_msg=method)


# ----------------------------------------------------------------------
# Spectral density by stochastic Lanczos quadrature
# ----------------------------------------------------------------------
def test_spectral_density_few_steps(backend: str) -> None:
    problem = make_problem("tanh_mlp", backend, "float64")
    op, A = _operator(problem, "hessian")
    n, probes, steps = A.shape[0], 6, 10
    sd = mh.spectral_density(op, num_probes=probes, num_steps=steps, seed=3)
    oracle = np.linalg.eigvalsh(A)

    assert sd.nodes.shape == sd.weights.shape == (probes, steps)
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(sd.weights >= 0)
    # Ritz values lie inside the spectrum.
    slack = 1e-10 * np.max(np.abs(oracle))
    assert sd.nodes.min() >= oracle[0] - slack and sd.nodes.max() <= oracle[-1] + slack
    assert sd.grid.ndim == 1 and sd.density.shape == sd.grid.shape and np.all(sd.density >= 0)
    assert np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0, abs=1e-12)
    # ∫ λ ρ(λ) dλ is the Hutchinson estimate of tr(A)/n, unbiased with a known variance.
    mean = np.trapezoid(sd.grid * sd.density, sd.grid)
    std = np.sqrt(_rademacher_variance(A) / probes) / n
    assert abs(mean - np.trace(A) / n) <= Z * std + 1e-6 * np.max(np.abs(oracle))


@pytest.mark.parametrize("name", ["softmax_regression", "input_function"])
def test_spectral_density_full_steps_matches_the_eigenvalues(backend: str, name: str) -> None:
    problem = make_problem(name, backend, "float64")
    op, A = _operator(problem, "hessian")
    n, probes = A.shape[0], 12
    sd = mh.spectral_density(op, num_probes=probes, num_steps=n + 5, seed=1)
    oracle, U = np.linalg.eigh(A)
    scale = float(np.max(np.abs(oracle)))

    assert sd.nodes.shape == (probes, n)
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, rtol=1e-12)
    # With n steps every node that carries weight is an eigenvalue.
    carried = sd.nodes[sd.weights > 1e-12]
    gaps = np.min(np.abs(carried[:, None] - oracle[None, :]), axis=1)
    assert np.all(gaps <= 1e-8 * scale), f"nodes off the spectrum by {gaps.max()}"
    # The density is sᵀ g(t − A) s / n averaged over the probes: its mean is the broadened
    # eigenvalue histogram, its variance that of a Rademacher quadratic form.
    g = np.exp(-0.5 * ((sd.grid[:, None] - oracle[None, :]) / sd.sigma) ** 2) / (sd.sigma * np.sqrt(2 * np.pi))
    expected = g.mean(axis=1)
    std = np.array([np.sqrt(_rademacher_variance((U * row) @ U.T) / probes) / n for row in g])
    assert np.all(np.abs(sd.density - expected) <= Z * std + 1e-8 * expected.max())
    assert np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0, abs=1e-12)


def test_spectral_density_on_a_given_grid(backend: str) -> None:
    problem = make_problem("input_function", backend, "float64")
    op, A = _operator(problem, "hessian")
    grid = np.linspace(-3.0, 4.0, 71)
    sd = mh.spectral_density(op, num_probes=3, num_steps=4, grid=grid, sigma=0.2)
    np.testing.assert_array_equal(sd.grid, grid)
    assert sd.sigma == 0.2
    # The documented formula: the probes' rules, each node a Gaussian of width σ.
    gauss = np.exp(-0.5 * ((grid[:, None] - sd.nodes.ravel()[None, :]) / 0.2) ** 2) / (0.2 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(sd.density, gauss @ sd.weights.ravel() / 3, rtol=1e-12, atol=1e-14)


def test_float32_spectral_density(backend: str) -> None:
    problem = make_problem("relu_mlp", backend, "float32")
    op, A = _operator(problem, "ggn")
    n, probes = A.shape[0], 6
    sd = mh.spectral_density(op, num_probes=probes, num_steps=12, seed=0)
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, rtol=1e-6)
    assert np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0, abs=1e-9)
    mean = np.trapezoid(sd.grid * sd.density, sd.grid)
    std = np.sqrt(_rademacher_variance(A) / probes) / n
    assert abs(mean - np.trace(A) / n) <= Z * std + 1e-4 * np.max(np.abs(A))


# ----------------------------------------------------------------------
# Frobenius norm
# ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kind,block,distribution",
    [
        ("tanh_mlp", "hessian", None, "rademacher"),
        ("relu_mlp", "ggn", None, "gaussian"),
        ("tanh_mlp", "hessian", ("layer1.*", "layer2.*"), "rademacher"),
    ],
)
def test_frobenius_norm(backend: str, name: str, kind: str, block, distribution: str) -> None:
    problem = make_problem(name, backend, "float64")
    kw = {} if block is None else {"params": block[0], "col_params": block[1]}
    op, A = _operator(problem, kind, **kw)
    probes = 40
    estimate = mh.frobenius_norm(op, num_probes=probes, seed=2, distribution=distribution)
    value, std_error = estimate
    assert estimate.num_probes == probes
    # E‖Az‖² = ‖A‖_F², with the variance of the quadratic form zᵀ(AᵀA)z.
    B = A.T @ A
    variance = _rademacher_variance(B) if distribution == "rademacher" else 2.0 * float(np.sum(B * B))
    exact = np.linalg.norm(A)
    assert abs(value**2 - exact**2) <= Z * np.sqrt(variance / probes)
    # The reported standard error is a sample estimate of the delta-method one.
    true_error = np.sqrt(variance / probes) / (2 * exact)
    assert 0.5 * true_error <= std_error <= 1.6 * true_error


# ----------------------------------------------------------------------
# Chain-rule approximation error
# ----------------------------------------------------------------------
def _restricted(problem: Problem, v: np.ndarray, names: list[str]) -> np.ndarray:
    owner = np.concatenate([[n] * int(np.prod(problem.shapes[n], dtype=np.int64)) for n in problem.names])
    return np.where(np.isin(owner, names), v, 0.0)


@pytest.mark.parametrize("name", ["softmax_regression", "tanh_mlp", "relu_mlp"])
def test_chain_rule_error_along_the_gradient(backend: str, name: str) -> None:
    problem = make_problem(name, backend, "float64")
    report = mh.chain_rule_error(problem.model, problem.weights, data=problem.data, loss=problem.loss, backend=backend)
    assert list(report) == ["all", *problem.layers]
    H, G, g = problem.oracle_hessian(), problem.oracle_ggn(), problem.oracle_gradient()
    for key, result in report.items():
        assert isinstance(result, mh.ChainRuleResult)
        v = g if key == "all" else _restricted(problem, g, problem.layers[key])
        vHv, vGv = v @ H @ v, v @ G @ v
        scale = np.linalg.norm(H, 2) * (v @ v)
        assert result.vHv == pytest.approx(vHv, rel=1e-8, abs=1e-10 * scale), key
        assert result.vGv == pytest.approx(vGv, rel=1e-8, abs=1e-10 * scale), key
        assert result.relative_error == pytest.approx(abs(vGv - vHv) / (v @ v), rel=1e-6, abs=1e-10 * scale), key
    # G = H where the outputs are linear in the parameters: a linear model, and each layer of a ReLU net.
    linear = report if name == "softmax_regression" else {}
    if name == "relu_mlp":
        linear = {k: r for k, r in report.items() if k != "all"}
    for key, result in linear.items():
        assert result.relative_error <= 1e-10 * np.linalg.norm(H, 2), key
    if name in ("tanh_mlp", "relu_mlp"):
        # Across layers (and within a tanh layer) the curvature effect is visible.
        assert report["all"].relative_error > 1e-3


def test_chain_rule_error_along_a_given_direction(backend: str) -> None:
    problem = make_problem("tanh_mlp", backend, "float64")
    v = np.random.default_rng(5).standard_normal(problem.size)
    groups = {"first": "layer1.*", "weights": ["layer1.weight", "layer2.weight"]}
    report = mh.chain_rule_error(
        problem.model,
        problem.weights,
        data=problem.data,
        loss=problem.loss,
        direction=problem.to_backend(v),
        groups=groups,
        backend=backend,
    )
    assert list(report) == ["all", "first", "weights"]
    H, G = problem.oracle_hessian(), problem.oracle_ggn()
    members = {"all": problem.names, "first": problem.layers["layer1"], "weights": ["layer1.weight", "layer2.weight"]}
    for key, names in members.items():
        u = _restricted(problem, v, names)
        assert report[key].vHv == pytest.approx(u @ H @ u, rel=1e-8), key
        assert report[key].vGv == pytest.approx(u @ G @ u, rel=1e-8), key
