"""Bad input gets a clear error naming the problem (PyTorch models; the checks live in the core)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import multihess as mh


@pytest.fixture()
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    return model, x, y


def test_v_of_wrong_length(problem) -> None:
    model, x, y = problem
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"shape \(26,\)"):
        H @ torch.ones(25, dtype=torch.float64)


def test_v_tree_with_wrong_shape_or_keys(problem) -> None:
    model, x, y = problem
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    tree = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    tree["0.weight"] = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v\['0.weight'\] has shape"):
        H @ tree
    del tree["0.weight"]
    with pytest.raises(ValueError, match="parameters are"):
        H @ tree


def test_v_from_numpy_or_other_dtype(problem) -> None:
    model, x, y = problem
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    with pytest.raises(TypeError, match="NumPy"):
        H @ np.ones(26)
    with pytest.raises(TypeError, match="dtype float32"):
        H @ torch.ones(26)
    with pytest.raises(TypeError, match="floating point"):
        H @ torch.ones(26, dtype=torch.int64)


def test_nan_in_v_params_and_data(problem) -> None:
    model, x, y = problem
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    v = torch.ones(26, dtype=torch.float64)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="v contains NaN"):
        H @ v
    bad_x = x.clone()
    bad_x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="batch 0 of data contains NaN or inf"):
        mh.hessian(model, data=(bad_x, y), loss="cross_entropy")
    mh.hessian(model, data=(bad_x, y), loss="cross_entropy", check_finite=False)  # opting out is allowed
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    with pytest.raises(ValueError, match="parameters contain NaN"):
        mh.ggn(model, data=(x, y), loss="cross_entropy")


def test_unknown_loss_and_missing_pieces(problem) -> None:
    model, x, y = problem
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*cross_entropy"):
        mh.hessian(model, data=(x, y), loss="hinge")
    with pytest.raises(ValueError, match="without loss="):
        mh.hessian(model, data=(x, y))
    with pytest.raises(ValueError, match="GGN needs model outputs and a loss"):
        mh.ggn(lambda w: (w**2).sum(), torch.ones(3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        mh.hessian(model, data=(x, y), loss="mse", reduction="max")


def test_output_target_mismatch(problem) -> None:
    model, x, _ = problem
    with pytest.raises(ValueError, match=r"outputs have shape \(6, 2\) but targets have shape \(6, 3\)"):
        mh.hessian(model, data=(x, torch.zeros(6, 3, dtype=torch.float64)), loss="mse")
    with pytest.raises(ValueError, match="integer labels must have shape"):
        mh.hessian(model, data=(x, torch.zeros(6, 2, dtype=torch.int64)), loss="cross_entropy")


def test_integer_parameters_and_no_trainable_parameters(problem) -> None:
    model, x, y = problem
    params = {"w": torch.ones(3, 2, dtype=torch.int64)}
    with pytest.raises(TypeError, match="parameter 'w' has dtype int64"):
        mh.hessian(lambda p, x: x @ p["w"], params, data=(x, y), loss="cross_entropy")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        mh.hessian(model, data=(x, y), loss="cross_entropy")


def test_nondeterministic_model(problem) -> None:
    _, x, y = problem
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().train()
    with pytest.raises(ValueError, match="not deterministic.*model.eval"):
        mh.hessian(model, data=(x, y), loss="cross_entropy")
    mh.hessian(model.eval(), data=(x, y), loss="cross_entropy")


def test_params_selection_errors(problem) -> None:
    model, x, y = problem
    with pytest.raises(ValueError, match="matches no parameter"):
        mh.hessian(model, data=(x, y), loss="cross_entropy", params="encoder.*")
    with pytest.raises(ValueError, match="not one of the model's trainable parameters"):
        mh.hessian(model, data=(x, y), loss="cross_entropy", params=[torch.ones(2)])


def test_bad_data_and_backend(problem) -> None:
    model, x, y = problem
    with pytest.raises(TypeError, match="not a pair"):
        mh.hessian(model, data=[(x, y), x], loss="cross_entropy")
    with pytest.raises(ValueError, match="data is empty"):
        mh.hessian(model, data=[], loss="cross_entropy")
    with pytest.raises(ValueError, match="unknown backend 'mxnet'"):
        mh.hessian(model, data=(x, y), loss="cross_entropy", backend="mxnet")


def test_callable_loss_must_return_scalar(problem) -> None:
    model, x, y = problem
    with pytest.raises(ValueError, match="must return a scalar"):
        mh.hessian(model, data=(x, y), loss=lambda z, t: z)
