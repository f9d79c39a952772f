"""Bad input to the operators gets an error that names the argument and the fix, in every backend.

The checks live in the core, but they read arrays through each backend
(shapes, dtypes, finiteness, which framework an array belongs to), so every
backend must let them through: a backend that casts, reshapes or accepts
what it should reject fails here.  The problems are the conformance
problems; bad arrays are made with the backend's own namespace.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import mh
from ._problems import Problem, make_problem, probes

# A two-layer tanh network on 8 samples with cross-entropy: 38 float64 parameters.
PROBLEM = "tanh_mlp"


def _problem(backend: str) -> Problem:
    return make_problem(PROBLEM, backend, "float64")


def _replaced(problem: Problem, name: str, value: np.ndarray) -> dict:
    """The problem's parameters with ``name`` replaced by ``value`` (a new dict; the problem is not changed)."""
    return {**problem.weights, name: problem.to_backend(value)}


def _args(problem: Problem, **kw) -> dict:
    return {"data": problem.data, "loss": problem.loss, "backend": problem.backend, **kw}


def _first_pass(op) -> None:
    """One product: a pass over every batch of the operator's data."""
    op @ op.backend.asarray(np.ones(op.shape[1]), op.rows.w)


# ----------------------------------------------------------------------
# Vectors passed to products
# ----------------------------------------------------------------------
def test_v_of_wrong_length(backend: str) -> None:
    problem = _problem(backend)
    H = problem.hessian()
    n = H.shape[1]
    with pytest.raises(ValueError, match=rf"shape \({n},\)"):
        H @ problem.to_backend(np.ones(n - 1))
    with pytest.raises(ValueError, match=rf"matmat expects shape \({n}, k\)"):
        H.matmat(problem.to_backend(np.ones((n + 1, 2))))


def test_v_tree_with_wrong_shape_or_entries(backend: str) -> None:
    problem = _problem(backend)
    H = problem.hessian()
    ref = problem.reference
    tree = {n: problem.to_backend(np.ones(s)) for n, s in ref.shapes.items()}
    wrong = {**tree, "layer1.weight": problem.to_backend(np.ones(ref.shapes["layer1.weight"][::-1]))}
    with pytest.raises(ValueError, match=r"v\['layer1.weight'\] has shape"):
        H @ wrong
    missing = {n: a for n, a in tree.items() if n != "layer2.bias"}
    with pytest.raises(ValueError, match="parameters are"):
        H @ missing


def test_v_of_another_framework_or_dtype(backend: str) -> None:
    problem = _problem(backend)
    H = problem.hessian()
    impl, n = mh.get_backend(backend), H.shape[1]
    if impl.is_array(np.ones(n)):
        # A framework whose arrays are NumPy arrays: NumPy vectors are its own.
        np.testing.assert_array_equal(
            problem.to_numpy(H @ np.ones(n)), problem.to_numpy(H @ problem.to_backend(np.ones(n)))
        )
    else:
        with pytest.raises(TypeError, match="NumPy"):
            H @ np.ones(n)
    with pytest.raises(TypeError, match="dtype float32 but the parameters are float64"):
        H @ impl.xp.astype(problem.to_backend(np.ones(n)), impl.xp.float32)
    with pytest.raises(TypeError, match="floating point"):
        H @ problem.to_backend(np.ones(n, dtype=np.int64))


def test_nan_in_v_parameters_and_data(backend: str) -> None:
    problem = _problem(backend)
    H = problem.hessian()
    x, y = problem.data
    v = probes(H.shape[1], 1, seed=0)[:, 0]
    v[3] = np.nan
    with pytest.raises(ValueError, match="v contains NaN"):
        H @ problem.to_backend(v)
    V = probes(H.shape[1], 2, seed=0)
    V[0, 1] = np.inf
    with pytest.raises(ValueError, match="V contains NaN or inf"):
        H.matmat(problem.to_backend(V))
    bad_x = problem.reference.x.copy()
    bad_x[0, 0] = np.inf
    data = (problem.to_backend(bad_x), y)
    with pytest.raises(ValueError, match="batch 0 of data contains NaN or inf"):
        mh.hessian(problem.model, problem.weights, **_args(problem, data=data))
    with np.errstate(invalid="ignore"):  # a NumPy-array backend evaluates the model on inf: NaN, and a warning
        mh.hessian(problem.model, problem.weights, **_args(problem, data=data), check_finite=False)  # opting out
    with pytest.raises(ValueError, match="batch 1 of data contains NaN or inf"):
        # Data is streamed: a later batch is read, and checked, on the first pass over the data.
        _first_pass(mh.hessian(problem.model, problem.weights, **_args(problem, data=[(x, y), data])))
    bias = problem.reference.params["layer1.bias"].copy()
    bias[0] = np.nan
    with pytest.raises(ValueError, match="parameters contain NaN"):
        mh.ggn(problem.model, _replaced(problem, "layer1.bias", bias), **_args(problem))


# ----------------------------------------------------------------------
# Losses, targets and models
# ----------------------------------------------------------------------
def test_unknown_loss_and_missing_pieces(backend: str) -> None:
    problem = _problem(backend)
    model, weights = problem.model, problem.weights
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*cross_entropy"):
        mh.hessian(model, weights, **_args(problem, loss="hinge"))
    with pytest.raises(ValueError, match="without loss="):
        mh.hessian(model, weights, **_args(problem, loss=None))
    with pytest.raises(ValueError, match="loss= was given without data="):
        mh.hessian(model, weights, loss="mse", backend=backend)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        mh.hessian(model, weights, **_args(problem), reduction="max")
    scalar = make_problem("input_function", backend, "float64")
    with pytest.raises(ValueError, match="GGN needs model outputs and a loss"):
        mh.ggn(scalar.model, scalar.weights, backend=backend)


def test_output_target_mismatch(backend: str) -> None:
    problem = make_problem("linear_regression", backend, "float64")  # outputs (8, 2), mean squared error
    x, _ = problem.data
    targets = problem.to_backend(np.zeros((8, 3)))
    with pytest.raises(ValueError, match=r"outputs have shape \(8, 2\) but targets have shape \(8, 3\)"):
        mh.hessian(problem.model, problem.weights, **_args(problem, data=(x, targets)))
    labels = problem.to_backend(np.zeros((8, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="integer labels must have shape"):
        mh.hessian(problem.model, problem.weights, **_args(problem, data=(x, labels), loss="cross_entropy"))


def test_callable_loss_must_return_a_scalar(backend: str) -> None:
    problem = _problem(backend)
    with pytest.raises(ValueError, match="must return a scalar"):
        mh.hessian(problem.model, problem.weights, **_args(problem, loss=lambda z, t: z))


def test_scalar_function_must_return_a_scalar(backend: str) -> None:
    scalar = make_problem("input_function", backend, "float64")
    with pytest.raises(ValueError, match="must return a scalar"):
        mh.hessian(lambda p: p["u"] * 2, scalar.weights, backend=backend)


def test_integer_parameters_and_no_parameters(backend: str) -> None:
    problem = _problem(backend)

    def model(p, x):
        return x @ p["w"]

    ints = {"w": problem.to_backend(np.ones((3, 3), dtype=np.int64))}
    with pytest.raises(TypeError, match="parameter 'w' has dtype int"):
        mh.hessian(model, ints, **_args(problem))
    with pytest.raises(ValueError, match="no trainable parameters"):
        mh.hessian(model, {}, **_args(problem))


def test_integer_parameter_excluded_with_params(backend: str) -> None:
    problem = _problem(backend)
    # Excluded with params= (the fix the error message names), an integer array is a constant of the model.
    mixed = {**problem.weights, "steps": problem.to_backend(np.arange(3))}
    H = mh.hessian(problem.model, mixed, **_args(problem), params="layer*")
    assert H.shape == problem.hessian().shape


def test_nondeterministic_model(backend: str) -> None:
    problem = _problem(backend)
    rng = np.random.default_rng(0)

    def noisy(p, x):
        # A fresh random constant on every call, like dropout in training mode.
        return problem.model(p, x) + problem.to_backend(rng.standard_normal(3))

    with pytest.raises(ValueError, match="not deterministic"):
        mh.hessian(noisy, problem.weights, **_args(problem))


# ----------------------------------------------------------------------
# Parameter selection, data and backend
# ----------------------------------------------------------------------
def test_params_selection_errors(backend: str) -> None:
    problem = _problem(backend)
    with pytest.raises(ValueError, match=r"params='encoder\.\*' matches no parameter"):
        mh.hessian(problem.model, problem.weights, **_args(problem), params="encoder.*")
    with pytest.raises(ValueError, match="matches no parameter"):
        mh.hessian(problem.model, problem.weights, **_args(problem), params="layer1.*", col_params=["nothing"])
    stranger = problem.to_backend(np.ones(2))
    with pytest.raises(ValueError, match="not one of the model's trainable parameters"):
        mh.hessian(problem.model, problem.weights, **_args(problem), params=[stranger])


def test_bad_data_and_backend(backend: str) -> None:
    problem = _problem(backend)
    x, y = problem.data
    model, weights = problem.model, problem.weights
    with pytest.raises(TypeError, match="batch 1 of data is .*not a pair"):
        _first_pass(mh.hessian(model, weights, **_args(problem, data=[(x, y), x])))
    with pytest.raises(ValueError, match="data is empty"):
        _first_pass(mh.hessian(model, weights, **_args(problem, data=[])))
    with pytest.raises(TypeError, match="one-shot iterator"):
        mh.hessian(model, weights, **_args(problem, data=((x, y) for _ in range(2))))
    with pytest.raises(ValueError, match="unknown backend 'mxnet'"):
        mh.hessian(model, weights, **_args(problem, backend="mxnet"))
    with pytest.raises(TypeError, match="belongs to no known backend"):
        mh.hessian(model, object(), **_args(problem))
