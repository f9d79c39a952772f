"""Bad arguments to the spectral functions, norms and the chain-rule error get errors naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import multihess as mh


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    return model, x, y


@pytest.fixture(scope="module")
def H(problem):
    model, x, y = problem
    return mh.hessian(model, data=(x, y), loss="cross_entropy")


# ----------------------------------------------------------------------
# eigvalsh
# ----------------------------------------------------------------------
def test_k_out_of_range(H) -> None:
    n = H.shape[0]
    with pytest.raises(ValueError, match=rf"k={n + 1} is larger than the operator's dimension {n}"):
        mh.eigvalsh(H, k=n + 1)
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        mh.eigvalsh(H, k=0)
    with pytest.raises(ValueError, match="k must be at least 1, got -2"):
        mh.eigvalsh(H, k=-2)


@pytest.mark.parametrize("k", [2.5, "3", None, True])
def test_k_not_an_integer(H, k) -> None:
    with pytest.raises(TypeError, match="k must be an int"):
        mh.eigvalsh(H, k=k)


def test_unknown_method_or_which(H) -> None:
    with pytest.raises(ValueError, match=r"unknown method='arnoldi'; choose one of 'lanczos', 'power'"):
        mh.eigvalsh(H, k=2, method="arnoldi")
    with pytest.raises(ValueError, match=r"unknown which='smallest'; choose one of 'largest', 'magnitude'"):
        mh.eigvalsh(H, k=2, which="smallest")


def test_bad_iterations_tol_or_seed(H) -> None:
    with pytest.raises(ValueError, match="num_iterations must be at least 3"):
        mh.eigvalsh(H, k=3, num_iterations=2)
    with pytest.raises(TypeError, match="num_iterations must be an int"):
        mh.eigvalsh(H, k=3, num_iterations=10.0)
    with pytest.raises(ValueError, match="tol must be a positive finite number"):
        mh.eigvalsh(H, k=1, tol=0.0)
    with pytest.raises(ValueError, match="tol must be a positive finite number"):
        mh.eigvalsh(H, k=1, tol=float("nan"))
    with pytest.raises(TypeError, match="seed must be an int"):
        mh.eigvalsh(H, k=1, seed=1.5)


def test_cross_block_is_not_symmetric(problem) -> None:
    model, x, y = problem
    block = mh.hessian(model, data=(x, y), loss="cross_entropy", params="0.*", col_params="2.*")
    for fn in (mh.eigvalsh, mh.spectral_density):
        with pytest.raises(ValueError, match=r"needs a symmetric operator.*cross block of shape \(16, 10\)"):
            fn(block)
    # A Frobenius norm is defined for any block.
    assert mh.frobenius_norm(block, num_probes=2).value > 0


def test_not_an_operator() -> None:
    with pytest.raises(TypeError, match="eigvalsh expects a curvature operator.*got ndarray"):
        mh.eigvalsh(np.eye(3), k=1)
    with pytest.raises(TypeError, match="spectral_density expects a curvature operator"):
        mh.spectral_density("H")
    with pytest.raises(TypeError, match="frobenius_norm expects a curvature operator"):
        mh.frobenius_norm([[1.0]])


def test_too_few_iterations_warns(H) -> None:
    with pytest.warns(RuntimeWarning, match=r"lanczos did not reach tol=1e-14 within 3 products"):
        mh.eigvalsh(H, k=2, num_iterations=3, tol=1e-14)
    with pytest.warns(RuntimeWarning, match=r"power did not reach tol=1e-14 within 2 products per eigenvalue"):
        mh.eigvalsh(H, k=1, method="power", num_iterations=2, tol=1e-14)


# ----------------------------------------------------------------------
# spectral_density and frobenius_norm
# ----------------------------------------------------------------------
@pytest.mark.parametrize("fn", [mh.spectral_density, mh.frobenius_norm])
def test_num_probes(H, fn) -> None:
    with pytest.raises(ValueError, match="num_probes must be at least 1, got 0"):
        fn(H, num_probes=0)
    with pytest.raises(TypeError, match="num_probes must be an int.*float 2.5"):
        fn(H, num_probes=2.5)


def test_num_steps_and_sigma(H) -> None:
    with pytest.raises(ValueError, match="num_steps must be at least 1, got 0"):
        mh.spectral_density(H, num_steps=0)
    with pytest.raises(ValueError, match="sigma must be a positive finite number, got -0.1"):
        mh.spectral_density(H, sigma=-0.1)


@pytest.mark.parametrize(
    "grid, error, message",
    [
        (1, ValueError, "grid must be at least 2, got 1"),
        (2.5, TypeError, "grid must be a number of points"),
        ("fine", TypeError, "grid must be a number of points"),
        (np.zeros((3, 3)), ValueError, r"1-D array of at least 2 real points; got an array of shape \(3, 3\)"),
        ([0.5], ValueError, r"at least 2 real points; got an array of shape \(1,\)"),
        ([0.0, 2.0, 1.0], ValueError, "strictly increasing"),
        ([0.0, 1.0, 1.0], ValueError, "strictly increasing"),
        ([0.0, np.nan, 1.0], ValueError, "grid points must be finite"),
        (np.array(["a", "b"]), ValueError, "real points"),
    ],
)
def test_bad_grid(H, grid, error, message) -> None:
    with pytest.raises(error, match=message):
        mh.spectral_density(H, grid=grid)


def test_grid_away_from_the_spectrum_warns(H) -> None:
    with pytest.warns(RuntimeWarning, match="holds none of the spectrum"):
        sd = mh.spectral_density(H, num_steps=3, grid=np.linspace(1e3, 2e3, 5), sigma=1e-3)
    assert np.all(sd.density == 0)


def test_unknown_distribution(H) -> None:
    with pytest.raises(ValueError, match=r"unknown distribution='uniform'; choose one of 'rademacher', 'gaussian'"):
        mh.frobenius_norm(H, distribution="uniform")


# ----------------------------------------------------------------------
# chain_rule_error
# ----------------------------------------------------------------------
def test_chain_rule_error_needs_data_and_loss(problem) -> None:
    model, x, y = problem
    with pytest.raises(TypeError, match="data"):
        mh.chain_rule_error(model, loss="cross_entropy")
    with pytest.raises(ValueError, match="data= was given without loss="):
        mh.chain_rule_error(model, data=(x, y), loss=None)


def test_chain_rule_error_bad_groups(problem) -> None:
    model, x, y = problem
    args = dict(data=(x, y), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"group 'head': params='3\.\*' matches no parameter"):
        mh.chain_rule_error(model, **args, groups={"head": "3.*"})
    with pytest.raises(ValueError, match="'all' is reserved for the whole direction"):
        mh.chain_rule_error(model, **args, groups={"all": "0.*"})
    with pytest.raises(TypeError, match="groups given as a list must hold parameter names or glob patterns"):
        mh.chain_rule_error(model, **args, groups=[model[0].weight])
    with pytest.raises(TypeError, match="groups must be None, a dict"):
        mh.chain_rule_error(model, **args, groups="0.*")
    with pytest.raises(ValueError, match="groups is empty"):
        mh.chain_rule_error(model, **args, groups={})


def test_chain_rule_error_bad_direction(problem) -> None:
    model, x, y = problem
    args = dict(data=(x, y), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"v must be a flat vector of shape \(26,\)"):
        mh.chain_rule_error(model, **args, direction=torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype float32 but the parameters are float64"):
        mh.chain_rule_error(model, **args, direction=torch.ones(26))
    bad = torch.ones(26, dtype=torch.float64)
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="v contains NaN"):
        mh.chain_rule_error(model, **args, direction=bad)


def test_chain_rule_error_reports_by_layer(problem) -> None:
    model, x, y = problem
    report = mh.chain_rule_error(
        model, data=(x, y), loss="cross_entropy", direction=torch.zeros(26, dtype=torch.float64)
    )
    assert list(report) == ["all", "0", "2"]
    # A zero direction has no curvature and no relative error to speak of.
    assert report["all"].vHv == 0.0 and np.isnan(report["all"].relative_error)
