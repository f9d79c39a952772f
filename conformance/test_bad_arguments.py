"""Bad arguments to estimators, spectra, norms, summaries and the chain-rule error, in every backend.

Each error names the argument and the fix.  Operators are the conformance
problems' (cached per backend), so these checks add little time; the
statistical and numerical behaviour is checked against oracles in the
other files.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from . import mh
from ._problems import Problem, make_problem

PROBLEM = "tanh_mlp"
ESTIMATORS = [mh.trace, mh.diagonal]


def _problem(backend: str) -> Problem:
    return make_problem(PROBLEM, backend, "float64")


def _args(problem: Problem, **kw) -> dict:
    return {"data": problem.data, "loss": problem.loss, "backend": problem.backend, **kw}


def _cross_block(problem: Problem):
    """The Hessian block with the first layer's rows and the second layer's columns."""
    return problem.hessian(params=problem.layers["layer1"], col_params=problem.layers["layer2"])


# ----------------------------------------------------------------------
# trace and diagonal
# ----------------------------------------------------------------------
@pytest.mark.parametrize("estimate", ESTIMATORS)
def test_num_probes(backend: str, estimate) -> None:
    H = _problem(backend).hessian()
    for num_probes in (0, -3):
        with pytest.raises(ValueError, match="num_probes must be at least 1"):
            estimate(H, num_probes)
    for num_probes in (2.5, "10", True, np.float64(4.0)):
        with pytest.raises(TypeError, match="num_probes must be an int"):
            estimate(H, num_probes)
    assert estimate(H, np.int64(1)).num_probes == 1  # NumPy integers are integers


@pytest.mark.parametrize("estimate", ESTIMATORS)
def test_unknown_method_and_distribution(backend: str, estimate) -> None:
    H = _problem(backend).hessian()
    with pytest.raises(ValueError, match=r"unknown method='hutchison'.*'hutchinson'"):
        estimate(H, 4, method="hutchison")
    with pytest.raises(ValueError, match=r"unknown distribution='uniform'.*'rademacher', 'gaussian'"):
        estimate(H, 4, distribution="uniform")
    wrong = "xdiag" if estimate is mh.trace else "xtrace"
    with pytest.raises(ValueError, match=f"unknown method='{wrong}'"):
        estimate(H, 4, method=wrong)


def test_sketching_methods_need_enough_probes(backend: str) -> None:
    H = _problem(backend).hessian()
    for method, minimum in (("hutch++", 3), ("xtrace", 2)):
        message = re.escape(f"method='{method}' needs num_probes ≥ {minimum}, got {minimum - 1}")
        with pytest.raises(ValueError, match=message):
            mh.trace(H, minimum - 1, method=method)
    with pytest.raises(ValueError, match="method='xdiag' needs num_probes ≥ 2"):
        mh.diagonal(H, 1, method="xdiag")


@pytest.mark.parametrize("estimate", ESTIMATORS)
def test_exact_methods_need_a_ggn(backend: str, estimate) -> None:
    problem = _problem(backend)
    for method in ("exact", "mc"):
        with pytest.raises(ValueError, match=r"needs a GGN, mh\.ggn.*'hutchinson'"):
            estimate(problem.hessian(), method=method)
    with pytest.raises(ValueError, match="SumOperator does not have"):
        estimate(problem.curvature_effect(), method="exact")


def test_exact_with_a_callable_loss(backend: str) -> None:
    problem = make_problem("linear_regression", backend, "float64")
    xp = mh.get_backend(backend).xp
    G = mh.ggn(problem.model, problem.weights, **_args(problem, loss=lambda z, t: xp.sum((z - t) ** 2)))
    for method in ("exact", "mc"):
        with pytest.raises(ValueError, match="callable loss has none: use method='hutchinson' or 'xdiag'"):
            mh.diagonal(G, method=method)


def test_num_samples_and_memory_budget(backend: str) -> None:
    problem = _problem(backend)
    G, H = problem.ggn(), problem.hessian()
    with pytest.raises(ValueError, match="num_samples applies to method='mc' only"):
        mh.diagonal(G, method="exact", num_samples=3)
    with pytest.raises(ValueError, match="num_samples applies to method='mc' only"):
        mh.trace(G, 5, num_samples=3)
    for num_samples, error in ((0, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match="num_samples must be"):
            mh.diagonal(G, method="mc", num_samples=num_samples)
    for budget, error in ((0, ValueError), (-1, ValueError), ("1GB", TypeError), (1.0, TypeError)):
        with pytest.raises(error, match="memory_budget must be"):
            mh.trace(H, 2, memory_budget=budget)


def test_exact_needs_inputs_as_arrays(backend: str) -> None:
    problem = _problem(backend)
    x, y = problem.data

    def model(p, inputs):
        return problem.model(p, inputs["a"])

    G = mh.ggn(model, problem.weights, **_args(problem, data=({"a": x}, y)))
    with pytest.raises(TypeError, match="inputs x as an array, or a tuple of arrays"):
        mh.diagonal(G, method="exact")


# ----------------------------------------------------------------------
# What estimators, spectra and norms accept as an operator
# ----------------------------------------------------------------------
@pytest.mark.parametrize("fn", [mh.trace, mh.diagonal, mh.summary, mh.eigvalsh, mh.spectral_density, mh.frobenius_norm])
def test_not_an_operator(backend: str, fn) -> None:
    for obj in (object(), "H", [[1.0, 0.0], [0.0, 1.0]]):
        with pytest.raises(TypeError, match=f"{fn.__name__} expects a curvature operator"):
            fn(obj)


@pytest.mark.parametrize("fn", [mh.trace, mh.eigvalsh])
def test_a_framework_matrix_must_be_square(backend: str, fn) -> None:
    problem = _problem(backend)
    with pytest.raises(ValueError, match=r"expects a square matrix, got an array of shape \(2, 3\)"):
        fn(problem.to_backend(np.ones((2, 3))))


@pytest.mark.parametrize("fn", [mh.trace, mh.diagonal, mh.eigvalsh, mh.spectral_density])
def test_cross_block_is_not_symmetric(backend: str, fn) -> None:
    block = _cross_block(_problem(backend))
    m, n = block.shape
    with pytest.raises(ValueError, match=rf"needs a symmetric operator.*\({m}, {n}\)"):
        fn(block) if fn in (mh.eigvalsh, mh.spectral_density) else fn(block, 4)


def test_a_frobenius_norm_is_defined_for_any_block(backend: str) -> None:
    assert mh.frobenius_norm(_cross_block(_problem(backend)), num_probes=2).value > 0


# ----------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------
def test_summary_groups_and_methods(backend: str) -> None:
    problem = _problem(backend)
    H = problem.hessian()
    with pytest.raises(ValueError, match="groups is empty"):
        mh.summary(H, {})
    with pytest.raises(ValueError, match=r"group 'head': params='layer9\.\*' matches no parameter"):
        mh.summary(H, {"head": "layer9.*"})
    with pytest.raises(TypeError, match="group names must be strings"):
        mh.summary(H, {0: "layer1.*"})
    with pytest.raises(TypeError, match="groups given as a list must hold parameter names or glob patterns"):
        mh.summary(H, [problem.to_backend(np.ones(1))])
    with pytest.raises(TypeError, match="groups must be None, a dict"):
        mh.summary(H, "layer1.*")
    with pytest.raises(ValueError, match=r"unknown method='xdiag'.*'exact', 'mc', 'hutchinson'"):
        mh.summary(H, method="xdiag")
    with pytest.raises(ValueError, match="needs a GGN"):
        mh.summary(H, method="exact")


# ----------------------------------------------------------------------
# eigvalsh
# ----------------------------------------------------------------------
def test_eigvalsh_k(backend: str) -> None:
    H = _problem(backend).hessian()
    n = H.shape[0]
    with pytest.raises(ValueError, match=rf"k={n + 1} is larger than the operator's dimension {n}"):
        mh.eigvalsh(H, k=n + 1)
    for k in (0, -2):
        with pytest.raises(ValueError, match=f"k must be at least 1, got {k}"):
            mh.eigvalsh(H, k=k)
    for k in (2.5, "3", None, True):
        with pytest.raises(TypeError, match="k must be an int"):
            mh.eigvalsh(H, k=k)


def test_eigvalsh_options(backend: str) -> None:
    H = _problem(backend).hessian()
    with pytest.raises(ValueError, match=r"unknown method='arnoldi'; choose one of 'lanczos', 'power'"):
        mh.eigvalsh(H, k=2, method="arnoldi")
    with pytest.raises(ValueError, match=r"unknown which='smallest'; choose one of 'largest', 'magnitude'"):
        mh.eigvalsh(H, k=2, which="smallest")
    with pytest.raises(ValueError, match="num_iterations must be at least 3"):
        mh.eigvalsh(H, k=3, num_iterations=2)
    with pytest.raises(TypeError, match="num_iterations must be an int"):
        mh.eigvalsh(H, k=3, num_iterations=10.0)
    for tol in (0.0, float("nan")):
        with pytest.raises(ValueError, match="tol must be a positive finite number"):
            mh.eigvalsh(H, k=1, tol=tol)
    with pytest.raises(TypeError, match="seed must be an int"):
        mh.eigvalsh(H, k=1, seed=1.5)


def test_too_few_iterations_warns(backend: str) -> None:
    H = _problem(backend).hessian()
    with pytest.warns(RuntimeWarning, match=r"lanczos did not reach tol=1e-14 within 3 products"):
        mh.eigvalsh(H, k=2, num_iterations=3, tol=1e-14)
    with pytest.warns(RuntimeWarning, match=r"power did not reach tol=1e-14 within 2 products per eigenvalue"):
        mh.eigvalsh(H, k=1, method="power", num_iterations=2, tol=1e-14)


# ----------------------------------------------------------------------
# spectral_density and frobenius_norm
# ----------------------------------------------------------------------
@pytest.mark.parametrize("fn", [mh.spectral_density, mh.frobenius_norm])
def test_stochastic_spectra_num_probes(backend: str, fn) -> None:
    H = _problem(backend).hessian()
    with pytest.raises(ValueError, match="num_probes must be at least 1, got 0"):
        fn(H, num_probes=0)
    with pytest.raises(TypeError, match="num_probes must be an int.*float 2.5"):
        fn(H, num_probes=2.5)


def test_frobenius_norm_distribution(backend: str) -> None:
    with pytest.raises(ValueError, match=r"unknown distribution='uniform'; choose one of 'rademacher', 'gaussian'"):
        mh.frobenius_norm(_problem(backend).hessian(), distribution="uniform")


BAD_GRIDS = [
    (1, ValueError, "grid must be at least 2, got 1"),
    (2.5, TypeError, "grid must be a number of points"),
    ("fine", TypeError, "grid must be a number of points"),
    (np.zeros((3, 3)), ValueError, r"1-D array of at least 2 real points; got an array of shape \(3, 3\)"),
    ([0.5], ValueError, r"at least 2 real points; got an array of shape \(1,\)"),
    ([0.0, 2.0, 1.0], ValueError, "strictly increasing"),
    ([0.0, 1.0, 1.0], ValueError, "strictly increasing"),
    ([0.0, np.nan, 1.0], ValueError, "grid points must be finite"),
    (np.array(["a", "b"]), ValueError, "real points"),
]


def test_spectral_density_arguments(backend: str) -> None:
    H = _problem(backend).hessian()
    with pytest.raises(ValueError, match="num_steps must be at least 1, got 0"):
        mh.spectral_density(H, num_steps=0)
    with pytest.raises(ValueError, match="sigma must be a positive finite number, got -0.1"):
        mh.spectral_density(H, sigma=-0.1)
    for grid, error, message in BAD_GRIDS:
        with pytest.raises(error, match=message):
            mh.spectral_density(H, grid=grid)
    with pytest.warns(RuntimeWarning, match="holds none of the spectrum"):
        sd = mh.spectral_density(H, num_probes=1, num_steps=3, grid=np.linspace(1e3, 2e3, 5), sigma=1e-3)
    assert np.all(sd.density == 0)


# ----------------------------------------------------------------------
# chain_rule_error
# ----------------------------------------------------------------------
def test_chain_rule_error_needs_data_and_loss(backend: str) -> None:
    problem = _problem(backend)
    with pytest.raises(TypeError, match="data"):
        mh.chain_rule_error(problem.model, problem.weights, loss=problem.loss, backend=backend)
    with pytest.raises(ValueError, match="data= was given without loss="):
        mh.chain_rule_error(problem.model, problem.weights, **_args(problem, loss=None))


def test_chain_rule_error_bad_groups(backend: str) -> None:
    problem = _problem(backend)
    args = {"data": problem.data, "loss": problem.loss, "backend": backend}
    with pytest.raises(ValueError, match=r"group 'head': params='layer3\.\*' matches no parameter"):
        mh.chain_rule_error(problem.model, problem.weights, **args, groups={"head": "layer3.*"})
    with pytest.raises(ValueError, match="'all' is reserved for the whole direction"):
        mh.chain_rule_error(problem.model, problem.weights, **args, groups={"all": "layer1.*"})
    with pytest.raises(TypeError, match="groups given as a list must hold parameter names or glob patterns"):
        mh.chain_rule_error(problem.model, problem.weights, **args, groups=[problem.weights["layer1.weight"]])
    with pytest.raises(TypeError, match="groups must be None, a dict"):
        mh.chain_rule_error(problem.model, problem.weights, **args, groups="layer1.*")
    with pytest.raises(ValueError, match="groups is empty"):
        mh.chain_rule_error(problem.model, problem.weights, **args, groups={})


def test_chain_rule_error_bad_direction(backend: str) -> None:
    problem = _problem(backend)
    args = {"data": problem.data, "loss": problem.loss, "backend": backend}
    xp, n = mh.get_backend(backend).xp, problem.size
    with pytest.raises(ValueError, match=rf"v must be a flat vector of shape \({n},\)"):
        mh.chain_rule_error(problem.model, problem.weights, **args, direction=problem.to_backend(np.ones(5)))
    with pytest.raises(TypeError, match="dtype float32 but the parameters are float64"):
        direction = xp.astype(problem.to_backend(np.ones(n)), xp.float32)
        mh.chain_rule_error(problem.model, problem.weights, **args, direction=direction)
    bad = np.ones(n)
    bad[0] = np.nan
    with pytest.raises(ValueError, match="v contains NaN"):
        mh.chain_rule_error(problem.model, problem.weights, **args, direction=problem.to_backend(bad))


def test_chain_rule_error_of_a_zero_direction(backend: str) -> None:
    problem = _problem(backend)
    report = mh.chain_rule_error(
        problem.model, problem.weights, **_args(problem), direction=problem.to_backend(np.zeros(problem.size))
    )
    assert list(report) == ["all", "layer1", "layer2"]
    # A zero direction has no curvature and no relative error to speak of.
    assert report["all"].vHv == 0.0 and np.isnan(report["all"].relative_error)
