"""Curvature operators of every backend against NumPy float64 oracles.

Every product is compared with an oracle from :mod:`._oracles` (closed forms,
finite differences of hand-written gradients, analytic Jacobians), in the
operator's own parameter order (``op.rows.names``).
"""

from __future__ import annotations

import numpy as np
import pytest

from . import _oracles as oracles
from . import mh
from ._oracles import assert_close, relative_difference, tolerance
from ._problems import LOSS_PROBLEMS, PROBLEM_NAMES, Problem, make_problem, make_reference, probes

DTYPES = ("float64", "float32")
LINEAR_MODELS = ("linear_regression", "softmax_regression")
# (problem, operator) pairs: every problem has a Hessian, those with a loss a GGN too.
OPERATOR_CASES = [(n, "hessian") for n in PROBLEM_NAMES] + [(n, "ggn") for n in LOSS_PROBLEMS]

all_problems = pytest.mark.parametrize("name", PROBLEM_NAMES)
loss_problems = pytest.mark.parametrize("name", LOSS_PROBLEMS)
dtypes = pytest.mark.parametrize("dtype", DTYPES)
operator_cases = pytest.mark.parametrize("name,kind", OPERATOR_CASES)


def _oracle(problem: Problem, kind: str, names: list[str], col_names: list[str] | None = None) -> np.ndarray:
    if kind == "hessian":
        return problem.oracle_hessian(names, col_names)
    return problem.oracle_ggn(names, col_names)


def _dense(problem: Problem, op) -> np.ndarray:
    return problem.to_numpy(op.dense())


# ----------------------------------------------------------------------
# The backend itself
# ----------------------------------------------------------------------
def test_backend_loads(backend: str) -> None:
    impl = mh.get_backend(backend)
    assert isinstance(impl, mh.Backend)
    assert impl.name, "a backend needs a non-empty name"


@all_problems
@dtypes
def test_parameters_are_flattened_by_name(backend: str, name: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    H = problem.hessian()
    ref = problem.reference
    assert H.shape == (ref.theta.size, ref.theta.size)
    assert sorted(H.rows.names) == sorted(ref.names), "the operator must cover every parameter once"
    assert dict(zip(H.rows.names, map(tuple, H.rows.shapes))) == ref.shapes
    assert mh.get_backend(backend).to_numpy(H.rows.w).dtype == np.dtype(dtype)
    # The flat vector is the concatenation of row-major ravels in the order of op.rows.names.
    np.testing.assert_array_equal(problem.to_numpy(H.rows.w), ref.reorder(ref.theta, H.rows.names))


# ----------------------------------------------------------------------
# Products against the oracles
# ----------------------------------------------------------------------
@operator_cases
@dtypes
def test_matvec(backend: str, name: str, kind: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    op = getattr(problem, kind)()
    v = probes(op.shape[1], 1, seed=1)[:, 0]
    expected = _oracle(problem, kind, op.rows.names) @ v
    assert_close(problem.to_numpy(op @ problem.to_backend(v)), expected, dtype, f"{kind} @ v")


@operator_cases
@dtypes
def test_matmat(backend: str, name: str, kind: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    op = getattr(problem, kind)()
    # As many probes as parameters: the product has the shape dense() computes, so
    # compiling backends reuse one traced product for both.
    V = probes(op.shape[1], op.shape[1], seed=2)
    expected = _oracle(problem, kind, op.rows.names) @ V
    out = op.matmat(problem.to_backend(V))
    assert_close(problem.to_numpy(out), expected, dtype, f"{kind}.matmat(V)")
    assert_close(problem.to_numpy(op @ problem.to_backend(V)), expected, dtype, f"{kind} @ V")


@operator_cases
@dtypes
def test_dense(backend: str, name: str, kind: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    op = getattr(problem, kind)()
    assert_close(_dense(problem, op), _oracle(problem, kind, op.rows.names), dtype, f"{kind}.dense()")


@operator_cases
@dtypes
def test_symmetry(backend: str, name: str, kind: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    op = getattr(problem, kind)()
    u, v = probes(op.shape[1], 2, seed=3).T
    hu = problem.to_numpy(op @ problem.to_backend(u))
    hv = problem.to_numpy(op @ problem.to_backend(v))
    scale = max(np.linalg.norm(u) * np.linalg.norm(hv), np.linalg.norm(v) * np.linalg.norm(hu))
    assert_close(u @ hv, v @ hu, dtype, f"uᵀ{kind}v = vᵀ{kind}u", scale=scale)


@operator_cases
@dtypes
def test_tree_in_tree_out(backend: str, name: str, kind: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    op = getattr(problem, kind)()
    ref = problem.reference
    v = probes(ref.theta.size, 1, seed=4)[:, 0]  # canonical order
    tree = {n: problem.to_backend(part) for n, part in ref.unflatten(v).items()}
    out = op @ tree
    assert isinstance(out, dict), f"a dict of parameters must come back as a dict, got {type(out).__name__}"
    assert sorted(out) == sorted(ref.names)
    expected = ref.unflatten(_oracle(problem, kind, ref.names) @ v)
    for n in ref.names:
        assert tuple(out[n].shape) == ref.shapes[n]
        assert_close(problem.to_numpy(out[n]), expected[n], dtype, f"({kind} @ tree)[{n!r}]")


# ----------------------------------------------------------------------
# Structure: G is PSD, and equals H where the outputs are linear in the parameters
# ----------------------------------------------------------------------
@loss_problems
@dtypes
def test_ggn_is_positive_semidefinite(backend: str, name: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    G = _dense(problem, problem.ggn())
    assert_close(G, G.T, dtype, "G must be symmetric", scale=np.max(np.abs(G)))
    smallest = np.linalg.eigvalsh((G + G.T) / 2).min()
    assert smallest >= -tolerance(dtype, np.max(np.abs(G))).atol, f"G has eigenvalue {smallest} < 0"


@pytest.mark.parametrize("name", LINEAR_MODELS)
@dtypes
def test_ggn_equals_hessian_for_linear_models(backend: str, name: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    H, G = problem.hessian(), problem.ggn()
    assert_close(_dense(problem, G), _dense(problem, H), dtype, "G == H when z is linear in w")
    assert_close(_dense(problem, G), problem.oracle_hessian(G.rows.names), dtype, "G == oracle H")


@pytest.mark.parametrize("name", ("tanh_mlp", "relu_mlp"))
@dtypes
def test_ggn_equals_hessian_on_last_layer(backend: str, name: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    last = list(problem.layers.values())[-1]
    H, G = problem.hessian(params=last), problem.ggn(params=last)
    assert H.shape == G.shape == (problem.reference.reorder(problem.reference.theta, last).size,) * 2
    assert_close(_dense(problem, H), problem.oracle_hessian(H.rows.names), dtype, "last-layer H block")
    assert_close(_dense(problem, G), _dense(problem, H), dtype, "G == H on the last layer")


@dtypes
def test_relu_ggn_equals_hessian_within_each_layer(backend: str, dtype: str) -> None:
    problem = make_problem("relu_mlp", backend, dtype)
    for layer, names in problem.layers.items():
        H, G = problem.hessian(params=names), problem.ggn(params=names)
        assert sorted(H.rows.names) == sorted(names)
        assert_close(_dense(problem, H), problem.oracle_hessian(H.rows.names), dtype, f"H block of {layer}")
        assert_close(_dense(problem, G), problem.oracle_ggn(G.rows.names), dtype, f"G block of {layer}")
        assert_close(_dense(problem, G), _dense(problem, H), dtype, f"G == H within {layer} of a ReLU net")


@dtypes
def test_relu_ggn_differs_from_hessian_across_layers(backend: str, dtype: str) -> None:
    problem = make_problem("relu_mlp", backend, dtype)
    rows, cols = problem.layers["layer1"], problem.layers["layer2"]
    H = problem.hessian(params=rows, col_params=cols)
    G = problem.ggn(params=rows, col_params=cols)
    h_block, g_block = _dense(problem, H), _dense(problem, G)
    assert h_block.shape == g_block.shape == (H.rows.size, G.cols.size)
    assert_close(h_block, problem.oracle_hessian(H.rows.names, H.cols.names), dtype, "cross-layer H block")
    assert_close(g_block, problem.oracle_ggn(G.rows.names, G.cols.names), dtype, "cross-layer G block")
    gap = relative_difference(h_block, g_block)
    assert gap > 100 * tolerance(dtype).rtol, f"cross-layer blocks of H and G should differ, relative gap {gap}"


def test_tanh_ggn_differs_from_hessian_within_first_layer(backend: str) -> None:
    # A curved activation makes z non-linear within the first layer, so G != H there.
    dtype = "float64"
    problem = make_problem("tanh_mlp", backend, dtype)
    names = problem.layers["layer1"]
    h_block = _dense(problem, problem.hessian(params=names))
    g_block = _dense(problem, problem.ggn(params=names))
    assert relative_difference(h_block, g_block) > 100 * tolerance(dtype).rtol


@loss_problems
@dtypes
def test_curvature_effect(backend: str, name: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    op = problem.curvature_effect()
    names = op.rows.names
    expected = problem.oracle_hessian(names) - problem.oracle_ggn(names)
    scale = np.max(np.abs(problem.oracle_hessian(names)))  # H − G vanishes for linear models
    assert_close(_dense(problem, op), expected, dtype, "curvature effect H − G", scale=scale)


@all_problems
@dtypes
def test_finite_difference_hessian(backend: str, name: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    op = problem.finite_difference_hessian()
    V = probes(op.shape[1], 2, seed=5)
    expected = problem.oracle_hessian(op.rows.names) @ V
    out = problem.to_numpy(op.matmat(problem.to_backend(V)))
    assert_close(out, expected, dtype, "finite-difference Hessian products", finite_difference=True)


# ----------------------------------------------------------------------
# The oracles against each other (NumPy only)
# ----------------------------------------------------------------------
@all_problems
def test_oracles_agree(name: str) -> None:
    ref = make_reference(name)
    theta = ref.theta
    # Hand-written gradient against central differences of the loss value.
    fd_grad = oracles.fd_jacobian(lambda t: np.array([oracles.loss_value(ref, t)]), theta)[0]
    np.testing.assert_allclose(ref.gradient(), fd_grad, rtol=1e-9, atol=1e-11)
    # Finite differences of the analytic gradient against the closed form, where one exists.
    if ref.kind in ("linear", "input_function"):
        np.testing.assert_allclose(oracles.fd_hessian(ref), oracles.closed_form_hessian(ref), rtol=1e-9, atol=1e-11)
    if ref.loss is None:
        return
    # Analytic Jacobians against central differences of the forward pass.
    n_samples, num_out = ref.y.shape[0], oracles.forward(ref, ref.params).shape[1]
    fd_jac = oracles.fd_jacobian(lambda t: oracles.forward(ref, ref.unflatten(t)).ravel(), theta)
    jac = oracles.jacobians(ref, ref.params)
    np.testing.assert_allclose(jac.reshape(n_samples * num_out, -1), fd_jac, rtol=1e-9, atol=1e-11)
    # G from the square roots S against G from the explicit output Hessian H_z.
    z = oracles.forward(ref, ref.params)
    if ref.loss == "mse":
        hz = np.broadcast_to(2.0 / z.size * np.eye(num_out), (n_samples, num_out, num_out))
    else:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        hz = (np.einsum("nc,cd->ncd", p, np.eye(num_out)) - np.einsum("nc,nd->ncd", p, p)) / n_samples
    np.testing.assert_allclose(ref.ggn(), np.einsum("ncp,ncd,ndq->pq", jac, hz, jac), rtol=1e-12, atol=1e-14)
    scale = np.max(np.abs(ref.hessian()))
    if ref.kind == "linear":
        np.testing.assert_allclose(ref.ggn(), ref.hessian(), rtol=1e-9, atol=1e-11 * scale)
    if ref.kind == "relu_mlp":
        for names in (["layer1.weight", "layer1.bias"], ["layer2.weight", "layer2.bias"]):
            np.testing.assert_allclose(ref.reorder(ref.ggn(), names), ref.reorder(ref.hessian(), names), atol=1e-11)
        cross = ref.reorder(ref.hessian() - ref.ggn(), ["layer1.weight"], ["layer2.weight"])
        assert np.max(np.abs(cross)) > 1e-3 * scale
