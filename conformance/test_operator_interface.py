"""The public operator interface of every backend: algebra, SciPy export, dense and foreign operators.

Every combination is compared with the same combination of the NumPy float64
oracle matrices; SciPy's solvers run on :meth:`CurvatureOperator.to_scipy`
and are compared with NumPy's dense solutions.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import mh
from ._oracles import assert_close
from ._problems import Problem, make_problem, probes

DTYPES = ("float64", "float32")
dtypes = pytest.mark.parametrize("dtype", DTYPES)


def _dense(problem: Problem, op) -> np.ndarray:
    return problem.to_numpy(op.dense())


@dtypes
def test_combinations_equal_the_combined_matrices(backend: str, dtype: str) -> None:
    problem = make_problem("tanh_mlp", backend, dtype)
    H, G = problem.hessian(), problem.ggn()
    h, g = problem.oracle_hessian(H.rows.names), problem.oracle_ggn(G.rows.names)
    eye = np.eye(H.shape[0])
    cases = {
        "H - G": (H - G, h - g),
        "H + G": (H + G, h + g),
        "2.5 * H": (2.5 * H, 2.5 * h),
        "H * 2.5": (H * 2.5, 2.5 * h),
        "H / 4": (H / 4, h / 4),
        "-G": (-G, -g),
        "H.damped(0.3)": (H.damped(0.3), h + 0.3 * eye),
        "(H - G).damped(1) - 0.5 * H": ((H - G).damped(1.0) - 0.5 * H, h - g + eye - 0.5 * h),
    }
    V = probes(H.shape[1], 3, seed=4)
    for label, (op, expected) in cases.items():
        assert op.shape == H.shape and op.is_symmetric, label
        assert_close(_dense(problem, op), expected, dtype, label)
        out = problem.to_numpy(op.matmat(problem.to_backend(V)))
        assert_close(out, expected @ V, dtype, f"({label}).matmat")


def test_repr_names_kind_shape_dtype_device_backend(backend: str) -> None:
    problem = make_problem("tanh_mlp", backend, "float64")
    H, G = problem.hessian(), problem.ggn()
    n = H.shape[0]
    for op, kind in ((H, "HessianOperator"), (H - 2 * G, "SumOperator[HessianOperator - 2 * GGNOperator]")):
        text = repr(op)
        assert text.startswith(kind + "(") and f"shape=({n}, {n})" in text, text
        assert "dtype=float64" in text and f"device={op.device}" in text and f"backend={backend!r}" in text, text
    assert "IdentityOperator" in repr(H.damped(0.1))


def test_combinations_reject_mismatches(backend: str) -> None:
    problem = make_problem("tanh_mlp", backend, "float64")
    H = problem.hessian()
    block = problem.hessian(params=problem.layers["layer1"])
    with pytest.raises(ValueError, match="different parameters"):
        H + block
    with pytest.raises(TypeError, match="damped"):
        H + 1.0
    with pytest.raises(TypeError, match="finite real"):
        H * float("nan")
    with pytest.raises(ZeroDivisionError):
        H / 0
    cross = problem.hessian(params=problem.layers["layer1"], col_params=problem.layers["layer2"])
    with pytest.raises(ValueError, match="square"):
        cross.damped(0.1)
    with pytest.raises(MemoryError, match="params="):
        H.dense(max_bytes=16)


def test_scipy_export_solves_and_finds_eigenvalues(backend: str) -> None:
    from scipy.sparse.linalg import cg, eigsh

    problem = make_problem("tanh_mlp", backend, "float64")
    G = problem.ggn()
    g = problem.oracle_ggn(G.rows.names)
    S = G.to_scipy()
    x = probes(G.shape[1], 1, seed=2)[:, 0]
    assert S.dtype == np.float64 and S.shape == G.shape
    np.testing.assert_allclose(S @ x, g @ x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.matmat(np.stack([x, 2 * x], axis=1))[:, 1], 2 * g @ x, rtol=1e-10, atol=1e-12)

    top = eigsh(S, k=2, which="LA", return_eigenvectors=False, tol=1e-12)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(g)[-2:], rtol=1e-8)

    # Damped Newton step (G + λI) s = x by conjugate gradients.
    damping = 0.1
    step, info = cg(G.damped(damping).to_scipy(), x, rtol=1e-12, atol=0.0, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(step, np.linalg.solve(g + damping * np.eye(len(x)), x), rtol=1e-8)


def test_scipy_export_of_a_cross_block_has_its_transpose(backend: str) -> None:
    problem = make_problem("relu_mlp", backend, "float64")
    rows, cols = problem.layers["layer1"], problem.layers["layer2"]
    block = problem.hessian(params=rows, col_params=cols)
    expected = problem.oracle_hessian(block.rows.names, block.cols.names)
    S = block.to_scipy()
    u, v = probes(block.shape[0], 1, seed=5)[:, 0], probes(block.shape[1], 1, seed=6)[:, 0]
    np.testing.assert_allclose(S @ v, expected @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.rmatvec(u), expected.T @ u, rtol=1e-10, atol=1e-12)


def test_estimators_take_a_dense_matrix_and_any_object_with_the_interface(backend: str) -> None:
    problem = make_problem("tanh_mlp", backend, "float64")
    H = problem.hessian()
    h = problem.oracle_hessian(H.rows.names)
    expected = np.linalg.eigvalsh(h)[::-1][:2]
    dense = problem.to_backend(h)
    np.testing.assert_allclose(mh.eigvalsh(dense, k=2), expected, rtol=1e-8)
    estimate = mh.trace(dense, num_probes=200, seed=3)
    assert 0 < estimate.std_error and abs(float(estimate.value) - np.trace(h)) <= 5 * estimate.std_error

    class Matrix:
        """A user-made operator: only shape, dtype, backend and apply_rows."""

        def __init__(self) -> None:
            self.shape, self.dtype, self.backend = h.shape, dense.dtype, backend
            self.calls = 0

        def apply_rows(self, V):
            self.calls += 1
            return V @ dense

    custom = Matrix()
    np.testing.assert_allclose(mh.eigvalsh(custom, k=2), expected, rtol=1e-8)
    assert custom.calls > 0
    with pytest.raises(ValueError, match="square"):
        mh.eigvalsh(problem.to_backend(np.ones((2, 3))), k=1)
    with pytest.raises(TypeError, match="apply_rows"):
        mh.trace(object())
