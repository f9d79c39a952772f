"""Bad arguments to the trace and diagonal estimators and to summaries get clear errors (PyTorch models)."""

from __future__ import annotations

import re

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
def operators(problem):
    model, x, y = problem
    return {
        "hessian": mh.hessian(model, data=(x, y), loss="cross_entropy"),
        "ggn": mh.ggn(model, data=(x, y), loss="cross_entropy"),
    }


ESTIMATORS = [mh.trace, mh.diagonal]


@pytest.mark.parametrize("estimate", ESTIMATORS)
@pytest.mark.parametrize("num_probes", [0, -3])
def test_num_probes_below_one(operators, estimate, num_probes) -> None:
    with pytest.raises(ValueError, match="num_probes must be at least 1"):
        estimate(operators["hessian"], num_probes)


@pytest.mark.parametrize("estimate", ESTIMATORS)
@pytest.mark.parametrize("num_probes", [2.5, "10", True, np.float64(4.0)])
def test_num_probes_not_an_integer(operators, estimate, num_probes) -> None:
    with pytest.raises(TypeError, match="num_probes must be an int"):
        estimate(operators["hessian"], num_probes)


def test_numpy_integers_are_accepted(operators) -> None:
    assert mh.trace(operators["hessian"], np.int64(3)).num_probes == 3


@pytest.mark.parametrize("estimate", ESTIMATORS)
def test_unknown_method_lists_the_choices(operators, estimate) -> None:
    with pytest.raises(ValueError, match=r"unknown method='hutchison'.*'hutchinson'"):
        estimate(operators["hessian"], 4, method="hutchison")


def test_xdiag_is_not_a_trace_method_nor_xtrace_a_diagonal_method(operators) -> None:
    with pytest.raises(ValueError, match="unknown method='xdiag'"):
        mh.trace(operators["hessian"], 4, method="xdiag")
    with pytest.raises(ValueError, match="unknown method='xtrace'"):
        mh.diagonal(operators["hessian"], 4, method="xtrace")


@pytest.mark.parametrize("estimate", ESTIMATORS)
def test_unknown_distribution(operators, estimate) -> None:
    with pytest.raises(ValueError, match=r"unknown distribution='uniform'.*'rademacher', 'gaussian'"):
        estimate(operators["hessian"], 4, distribution="uniform")


@pytest.mark.parametrize("method,minimum", [("hutch++", 3), ("xtrace", 2)])
def test_sketching_trace_needs_enough_probes(operators, method, minimum) -> None:
    message = re.escape(f"method='{method}' needs num_probes ≥ {minimum}, got {minimum - 1}")
    with pytest.raises(ValueError, match=message):
        mh.trace(operators["hessian"], minimum - 1, method=method)


def test_xdiag_needs_two_probes(operators) -> None:
    with pytest.raises(ValueError, match="method='xdiag' needs num_probes ≥ 2"):
        mh.diagonal(operators["hessian"], 1, method="xdiag")


@pytest.mark.parametrize("estimate", ESTIMATORS)
@pytest.mark.parametrize("method", ["exact", "mc"])
def test_exact_on_a_hessian_suggests_the_stochastic_methods(operators, estimate, method) -> None:
    with pytest.raises(ValueError, match=r"needs a GGN, mh\.ggn.*'hutchinson'"):
        estimate(operators["hessian"], method=method)


def test_exact_on_the_curvature_effect(problem) -> None:
    model, x, y = problem
    with pytest.raises(ValueError, match="SumOperator does not have"):
        mh.diagonal(mh.curvature_effect(model, data=(x, y), loss="cross_entropy"), method="exact")


def test_exact_with_a_callable_loss(problem) -> None:
    model, x, y = problem
    G = mh.ggn(model, data=(x, y), loss=nn.functional.cross_entropy)
    for method in ("exact", "mc"):
        with pytest.raises(ValueError, match="callable loss has none: use method='hutchinson' or 'xdiag'"):
            mh.diagonal(G, method=method)


def test_num_samples_only_with_mc(operators) -> None:
    with pytest.raises(ValueError, match="num_samples applies to method='mc' only"):
        mh.diagonal(operators["ggn"], method="exact", num_samples=3)
    with pytest.raises(ValueError, match="num_samples applies to method='mc' only"):
        mh.trace(operators["ggn"], 5, num_samples=3)


@pytest.mark.parametrize("num_samples,error", [(0, ValueError), (1.5, TypeError)])
def test_num_samples_must_be_a_positive_int(operators, num_samples, error) -> None:
    with pytest.raises(error, match="num_samples must be"):
        mh.diagonal(operators["ggn"], method="mc", num_samples=num_samples)


@pytest.mark.parametrize("budget,error", [(0, ValueError), (-1, ValueError), ("1GB", TypeError), (1.0, TypeError)])
def test_memory_budget(operators, budget, error) -> None:
    with pytest.raises(error, match="memory_budget must be"):
        mh.trace(operators["hessian"], 2, memory_budget=budget)


@pytest.mark.parametrize("estimate", ESTIMATORS + [mh.summary])
def test_not_an_operator(problem, estimate) -> None:
    with pytest.raises(TypeError, match="expects a curvature operator"):
        estimate([[1.0, 0.0], [0.0, 1.0]])  # a nested list is no operator; a framework matrix would be


@pytest.mark.parametrize("estimate", ESTIMATORS)
def test_cross_block_is_not_symmetric(problem, estimate) -> None:
    model, x, y = problem
    H = mh.hessian(model, data=(x, y), loss="cross_entropy", params="0.*", col_params="2.*")
    with pytest.raises(ValueError, match="needs a symmetric operator"):
        estimate(H, 4)


def test_summary_groups(operators) -> None:
    H = operators["hessian"]
    with pytest.raises(ValueError, match="groups is empty"):
        mh.summary(H, {})
    with pytest.raises(ValueError, match=r"group 'head': params='9\.\*' matches no parameter"):
        mh.summary(H, {"head": "9.*"})
    with pytest.raises(TypeError, match="group names must be strings"):
        mh.summary(H, {0: "0.*"})
    with pytest.raises(TypeError, match="groups given as a list must hold parameter names or glob patterns"):
        mh.summary(H, [torch.ones(1)])
    with pytest.raises(TypeError, match="groups must be None, a dict"):
        mh.summary(H, "0.*")


def test_summary_methods(operators) -> None:
    with pytest.raises(ValueError, match=r"unknown method='xdiag'.*'exact', 'mc', 'hutchinson'"):
        mh.summary(operators["hessian"], method="xdiag")
    with pytest.raises(ValueError, match="needs a GGN"):
        mh.summary(operators["hessian"], method="exact")


def test_exact_needs_inputs_as_arrays() -> None:
    def model(params, x):
        return x["a"] @ params["w"]

    params = {"w": torch.randn(3, 2, dtype=torch.float64)}
    data = ({"a": torch.randn(4, 3, dtype=torch.float64)}, torch.randint(0, 2, (4,)))
    G = mh.ggn(model, params, data=data, loss="cross_entropy")
    with pytest.raises(TypeError, match="inputs x as an array, or a tuple of arrays"):
        mh.diagonal(G, method="exact")
