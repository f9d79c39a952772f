"""The autodiff half of the backend protocol, primitive by primitive, against NumPy float64 oracles.

``value_and_grad``, ``jvp`` and ``vjp`` on the functions ``apply(w, x)``
that ``bind`` returns, nested in every order (a JVP of a gradient is a
Hessian-vector product, a VJP of a JVP a second derivative too);
``stop_gradient`` cutting every mode and order; dtypes kept; ``asarray``
and ``to_numpy``.  The scalar input function has a closed-form gradient and
Hessian; the MLP's Jacobian is hand-written backpropagation.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import _oracles as oracles
from . import mh
from ._problems import Problem, make_problem, probes

DTYPES = ("float64", "float32")
RTOL = {"float64": 1e-10, "float32": 1e-4}


def _close(actual: np.ndarray, expected: np.ndarray, dtype: str, what: str) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.max(np.abs(expected))) if expected.size else 1.0
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=RTOL[dtype], atol=RTOL[dtype] * scale, err_msg=what
    )


def _scalar(backend: str, dtype: str) -> tuple[Problem, object, object]:
    """The input function ``f(w)`` of the flat parameters, and its binding."""
    problem = make_problem("input_function", backend, dtype)
    impl = mh.get_backend(backend)
    binding = impl.bind(problem.model, problem.weights, problem.names)

    def f(w):
        return impl.xp.reshape(binding.apply(w, None), ())

    return problem, binding, f


def _check_dtype(impl, x, dtype: str, what: str) -> None:
    assert impl.to_numpy(x).dtype == np.dtype(dtype), f"{what} has dtype {impl.to_numpy(x).dtype}, expected {dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_and_grad(backend: str, dtype: str) -> None:
    problem, binding, f = _scalar(backend, dtype)
    impl, ref = mh.get_backend(backend), problem.reference
    value, grad = impl.value_and_grad(f, binding.w)
    _close(impl.to_numpy(value), oracles.loss_value(ref, ref.theta), dtype, "value")
    _close(impl.to_numpy(grad), problem.oracle_gradient(binding.names), dtype, "gradient")
    _check_dtype(impl, grad, dtype, "the gradient")


def test_jvp_and_vjp_of_a_model(backend: str) -> None:
    dtype = "float64"
    problem = make_problem("tanh_mlp", backend, dtype)
    impl, ref = mh.get_backend(backend), problem.reference
    binding = impl.bind(problem.model, problem.weights, problem.names)
    x = problem.data[0]
    # The oracle's Jacobian (N, C, n) with its columns in the binding's order.
    columns = ref.reorder(np.arange(ref.theta.size), binding.names)
    jac = oracles.jacobians(ref, ref.params)[:, :, columns]
    v = probes(binding.size, 1, seed=31)[:, 0]
    u = probes(jac.shape[0] * jac.shape[1], 1, seed=32)[:, 0].reshape(jac.shape[:2])
    out, jv = impl.jvp(lambda w: binding.apply(w, x), binding.w, problem.to_backend(v))
    _close(problem.to_numpy(out), oracles.forward(ref, ref.params), dtype, "jvp: f(w)")
    _close(problem.to_numpy(jv), np.einsum("ncp,p->nc", jac, v), dtype, "J v")
    out, jtu = impl.vjp(lambda w: binding.apply(w, x), binding.w, problem.to_backend(u))
    _close(problem.to_numpy(out), oracles.forward(ref, ref.params), dtype, "vjp: f(w)")
    _close(problem.to_numpy(jtu), np.einsum("ncp,nc->p", jac, u), dtype, "Jᵀ u")
    _check_dtype(impl, jv, dtype, "J v")
    _check_dtype(impl, jtu, dtype, "Jᵀ u")


def test_primitives_nest_in_every_order(backend: str) -> None:
    dtype = "float64"  # float32 is kept by single primitives above; here the second derivatives are exact
    problem, binding, f = _scalar(backend, dtype)
    impl = mh.get_backend(backend)
    H = problem.oracle_hessian(binding.names)
    u, v = probes(binding.size, 2, seed=33).T
    ub, vb, w = problem.to_backend(u), problem.to_backend(v), binding.w

    def grad(p):
        return impl.value_and_grad(f, p)[1]

    def directional(p):  # w ↦ ∇f(w)·v by forward mode
        return impl.jvp(f, p, vb)[1]

    one = problem.to_backend(np.ones(()))
    products = {
        "jvp of the gradient (forward over reverse)": impl.jvp(grad, w, vb)[1],
        "vjp of the gradient (reverse over reverse)": impl.vjp(grad, w, vb)[1],
        "gradient of a jvp (reverse over forward)": impl.value_and_grad(directional, w)[1],
        "vjp of a jvp": impl.vjp(directional, w, one)[1],
    }
    for what, hv in products.items():
        _close(problem.to_numpy(hv), H @ v, dtype, f"H v as the {what}")
        _check_dtype(impl, hv, dtype, what)
    # Forward over forward: uᵀ H v.
    second = impl.jvp(directional, w, ub)[1]
    _close(problem.to_numpy(second), u @ H @ v, dtype, "uᵀ H v as a jvp of a jvp")


def test_float32_stays_float32(backend: str) -> None:
    dtype = "float32"
    problem, binding, f = _scalar(backend, dtype)
    impl = mh.get_backend(backend)
    H = problem.oracle_hessian(binding.names)
    v = probes(binding.size, 1, seed=35)[:, 0]
    vb = problem.to_backend(v)
    out, jv = impl.jvp(f, binding.w, vb)
    _close(problem.to_numpy(jv), problem.oracle_gradient(binding.names) @ v, dtype, "jvp in float32")
    out, vjp = impl.vjp(lambda w: impl.value_and_grad(f, w)[1], binding.w, vb)
    _close(problem.to_numpy(vjp), H @ v, dtype, "vjp of the gradient in float32")
    for what, x in (("f(w)", out), ("jvp", jv), ("vjp", vjp), ("stop_gradient", impl.stop_gradient(binding.w))):
        _check_dtype(impl, x, dtype, f"{what} of float32 parameters")


def test_stop_gradient_cuts_every_mode_and_order(backend: str) -> None:
    dtype = "float64"
    problem, binding, _ = _scalar(backend, dtype)
    impl, xp = mh.get_backend(backend), mh.get_backend(backend).xp
    w_np = problem.to_numpy(binding.w)
    v = probes(binding.size, 1, seed=34)[:, 0]
    vb = problem.to_backend(v)

    def g(w):
        # Σ sg(w)·w: the value of Σ w², the gradient of a linear function with slope w.
        return xp.sum(impl.stop_gradient(w) * w)

    value, grad = impl.value_and_grad(g, binding.w)
    _close(impl.to_numpy(value), np.sum(w_np**2), dtype, "value through stop_gradient")
    _close(problem.to_numpy(grad), w_np, dtype, "gradient through stop_gradient (w, not 2 w)")
    _close(problem.to_numpy(impl.jvp(g, binding.w, vb)[1]), w_np @ v, dtype, "jvp through stop_gradient")
    # Second order: the slope is cut, so the Hessian of g is zero in every nesting.
    hv_fwd = impl.jvp(lambda p: impl.value_and_grad(g, p)[1], binding.w, vb)[1]
    hv_rev = impl.vjp(lambda p: impl.value_and_grad(g, p)[1], binding.w, vb)[1]
    for what, hv in (("forward over reverse", hv_fwd), ("reverse over reverse", hv_rev)):
        np.testing.assert_array_equal(problem.to_numpy(hv), np.zeros_like(v), err_msg=f"Hessian of Σ sg(w)·w, {what}")
    # stop_gradient keeps the value.
    np.testing.assert_array_equal(problem.to_numpy(impl.stop_gradient(binding.w)), w_np)


@pytest.mark.parametrize("dtype", DTYPES)
def test_asarray_and_to_numpy(backend: str, dtype: str) -> None:
    problem = make_problem("tanh_mlp", backend, dtype)
    impl = mh.get_backend(backend)
    like = problem.weights["layer1.bias"]
    floats = np.array([0.5, -1.25, 3.0])  # float64 NumPy data takes the parameters' dtype
    out = impl.asarray(floats, like)
    assert impl.is_array(out), f"asarray must give a {backend} array, got {type(out).__name__}"
    np.testing.assert_array_equal(impl.to_numpy(out), floats.astype(dtype))
    _check_dtype(impl, out, dtype, "asarray of float data")
    labels = impl.asarray(np.array([0, 2, 1]), like)
    assert impl.to_numpy(labels).dtype.kind == "i", "integer data (labels) must keep an integer dtype"
    np.testing.assert_array_equal(impl.to_numpy(labels), [0, 2, 1])
    assert isinstance(impl.to_numpy(like), np.ndarray)
    assert impl.is_array(like) and not impl.is_array([1.0, 2.0])
