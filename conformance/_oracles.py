"""NumPy float64 oracles for the conformance problems.

Nothing here calls the library under test.  Each problem is described by a
:class:`Reference`: its parameters (in a canonical order), its data and its
loss, all in float64 NumPy.  From that the oracles give

- closed-form Hessians where they exist (linear regression, softmax
  regression, the scalar input function);
- for the MLPs, central finite differences (Richardson-extrapolated) of
  gradients obtained by hand-written backpropagation;
- GGNs ``Σ_n J_nᵀ H_z J_n`` from analytic per-sample Jacobians and the
  loss's analytic output Hessian.

Flat vectors follow the library's convention: the concatenation of the
row-major ravel of each parameter, in whatever order of names is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

# Relative accuracy of the products checked against these oracles, per dtype.
_RTOL = {"float64": 1e-10, "float32": 1e-4}
# Finite-difference products are accurate to about eps^(2/3) of their scale.
_FD_RTOL = {"float64": 1e-6, "float32": 2e-2}


class Tolerance(NamedTuple):
    """``rtol``/``atol`` for ``numpy.testing.assert_allclose``.

    Unpacks as ``rtol, atol = tol``, reads as ``tol.rtol`` or ``tol["rtol"]``,
    and splats as ``**tol``.
    """

    rtol: float
    atol: float

    def keys(self) -> tuple[str, ...]:
        return self._fields

    def __getitem__(self, key):  # type: ignore[override]
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


def tolerance(dtype: str, scale: float = 1.0, finite_difference: bool = False) -> Tolerance:
    """Tolerance for comparing a product in ``dtype`` with a float64 oracle.

    Parameters
    ----------
    dtype : {"float64", "float32"}
    scale : float
        Magnitude of the matrix or vector compared (e.g. its largest absolute
        entry); ``atol`` is relative to it, so entries near zero are judged
        against the scale of the whole result, not their own.
    finite_difference : bool
        Looser tolerance for products by finite differences.
    """
    table = _FD_RTOL if finite_difference else _RTOL
    if dtype not in table:
        raise ValueError(f"no tolerance for dtype {dtype!r}; use one of {sorted(table)}")
    rtol = table[dtype]
    return Tolerance(rtol, rtol * max(float(scale), np.finfo(np.float64).tiny))


def assert_close(
    actual: np.ndarray,
    expected: np.ndarray,
    dtype: str,
    what: str = "",
    scale: float | None = None,
    finite_difference: bool = False,
) -> None:
    """Assert ``actual ≈ expected`` within :func:`tolerance` at the scale of ``expected``."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} differs from the oracle's {expected.shape}")
    scale = float(np.max(np.abs(expected))) if scale is None and expected.size else (scale or 1.0)
    tol = tolerance(dtype, scale, finite_difference)
    np.testing.assert_allclose(actual, expected, rtol=tol.rtol, atol=tol.atol, err_msg=what)


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max(max|a|, max|b|)`` (0 for two zero arrays)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    return 0.0 if scale == 0.0 else float(np.max(np.abs(a - b), initial=0.0)) / scale


# ----------------------------------------------------------------------
# Flat vectors and parameter orders
# ----------------------------------------------------------------------
def flat_indices(names: list[str], shapes: dict[str, tuple[int, ...]], order: list[str]) -> np.ndarray:
    """Positions, in a flat vector laid out by ``names``, of the entries of the parameters ``order``."""
    unknown = [n for n in order if n not in shapes]
    if unknown:
        raise ValueError(f"unknown parameter names {unknown}; the parameters are {names}")
    start, offsets = 0, {}
    for name in names:
        size = int(np.prod(shapes[name], dtype=np.int64))
        offsets[name] = np.arange(start, start + size)
        start += size
    return np.concatenate([offsets[n] for n in order]) if order else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------
# Problems as NumPy sees them
# ----------------------------------------------------------------------
@dataclass
class Reference:
    """A conformance problem in float64 NumPy: the ground truth for its oracles.

    Attributes
    ----------
    kind : {"linear", "tanh_mlp", "relu_mlp", "input_function"}
        The model: ``x @ W + b``, a two-layer MLP, or the scalar input function.
    params : dict of str to ndarray
        Parameters in canonical order (the order the problem defines them in).
    x, y : ndarray or None
        Inputs ``(N, d)`` and targets: floats ``(N, C)`` for ``"mse"``,
        integer labels ``(N,)`` for ``"cross_entropy"``.
    loss : {"mse", "cross_entropy"} or None
        PyTorch conventions, ``"mean"`` reduction.
    coupling : ndarray or None
        The constant vector ``a`` of the input function.
    """

    kind: str
    params: dict[str, np.ndarray]
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    loss: str | None = None
    coupling: np.ndarray | None = None
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: p.shape for n, p in self.params.items()}

    @property
    def theta(self) -> np.ndarray:
        """All parameters as one flat vector in canonical order."""
        return np.concatenate([p.ravel() for p in self.params.values()])

    def unflatten(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        out, start = {}, 0
        for name, p in self.params.items():
            out[name] = theta[start : start + p.size].reshape(p.shape)
            start += p.size
        return out

    def reorder(self, matrix: np.ndarray, rows: list[str], cols: list[str] | None = None) -> np.ndarray:
        """Rows (and columns, for a matrix) of a canonical-order array, taken in the orders given."""
        r = flat_indices(self.names, self.shapes, rows)
        if matrix.ndim == 1:
            return matrix[r]
        c = r if cols is None else flat_indices(self.names, self.shapes, cols)
        return matrix[np.ix_(r, c)]

    # ------------------------------------------------------------------ cached oracles
    def _cached(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def hessian(self) -> np.ndarray:
        """Dense Hessian in canonical order: closed form where one exists, else finite differences."""
        if self.kind in ("linear", "input_function"):
            return self._cached("hessian", lambda: closed_form_hessian(self))
        return self._cached("hessian", lambda: fd_hessian(self))

    def ggn(self) -> np.ndarray:
        return self._cached("ggn", lambda: ggn(self))

    def gradient(self) -> np.ndarray:
        return self._cached("gradient", lambda: gradient(self, self.theta))

    def sqrt_hz_jacobians(self) -> np.ndarray:
        return self._cached("sqrt", lambda: sqrt_hz_jacobians(self))


# ----------------------------------------------------------------------
# Forward passes and analytic Jacobians (hand-written backpropagation)
# ----------------------------------------------------------------------
def _activation(kind: str, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activation and its derivative."""
    if kind == "tanh_mlp":
        h = np.tanh(a)
        return h, 1.0 - h**2
    if kind == "relu_mlp":
        return np.maximum(a, 0.0), (a > 0).astype(np.float64)
    raise ValueError(f"no activation for model kind {kind!r}")


def forward(ref: Reference, params: dict[str, np.ndarray]) -> np.ndarray:
    """Network outputs ``z`` of shape ``(N, C)``."""
    if ref.kind == "linear":
        return ref.x @ params["layer1.weight"] + params["layer1.bias"]
    h, _ = _activation(ref.kind, ref.x @ params["layer1.weight"] + params["layer1.bias"])
    return h @ params["layer2.weight"] + params["layer2.bias"]


def jacobians(ref: Reference, params: dict[str, np.ndarray]) -> np.ndarray:
    """Per-sample Jacobians ``dz_n/dθ``: shape ``(N, C, n)``, columns in canonical order."""
    x = ref.x
    n_samples = x.shape[0]
    z = forward(ref, params)
    num_out = z.shape[1]
    eye = np.eye(num_out)
    blocks: dict[str, np.ndarray] = {}
    if ref.kind == "linear":
        # z_c = Σ_i x_i W[i, c] + b[c]
        blocks["layer1.weight"] = np.einsum("ni,cd->ncid", x, eye)
        blocks["layer1.bias"] = np.broadcast_to(eye, (n_samples, num_out, num_out))
    else:
        w1, b1, w2 = params["layer1.weight"], params["layer1.bias"], params["layer2.weight"]
        h, dh = _activation(ref.kind, x @ w1 + b1)
        # z_c = Σ_j h_j W2[j, c] + b2[c],  h_j = σ(Σ_i x_i W1[i, j] + b1[j])
        back = np.einsum("nj,jc->ncj", dh, w2)  # dz_c/da_j
        blocks["layer1.weight"] = np.einsum("ncj,ni->ncij", back, x)
        blocks["layer1.bias"] = back
        blocks["layer2.weight"] = np.einsum("nj,cd->ncjd", h, eye)
        blocks["layer2.bias"] = np.broadcast_to(eye, (n_samples, num_out, num_out))
    return np.concatenate([blocks[n].reshape(n_samples, num_out, -1) for n in ref.names], axis=2)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def loss_value(ref: Reference, theta: np.ndarray) -> float:
    """The loss (or the input function) at the flat canonical parameters ``theta``."""
    params = ref.unflatten(theta)
    if ref.kind == "input_function":
        u, v = params["u"], params["V"]
        return float(np.sum(u**4) / 4 + (ref.coupling @ u) * np.sum(v**2) / 2 + np.sum(v**3) / 6)
    z = forward(ref, params)
    if ref.loss == "mse":
        return float(np.mean((z - ref.y) ** 2))
    m = z.max(axis=1)
    log_norm = np.log(np.exp(z - m[:, None]).sum(axis=1)) + m
    return float(np.mean(log_norm - z[np.arange(len(z)), ref.y]))


def _output_gradient(ref: Reference, z: np.ndarray) -> np.ndarray:
    """``dℓ/dz`` of the mean-reduced loss, shape ``(N, C)``."""
    if ref.loss == "mse":
        return 2.0 * (z - ref.y) / z.size
    onehot = np.eye(z.shape[1])[ref.y]
    return (_softmax(z) - onehot) / z.shape[0]


def _output_sqrt_hessian(ref: Reference, z: np.ndarray) -> np.ndarray:
    """Per-sample square roots ``S_n`` of ``H_z`` (``H_z = S Sᵀ``): shape ``(N, C, C)``."""
    n_samples, num_out = z.shape
    if ref.loss == "mse":
        # Mean over all N·C elements: H_z = 2/(N C) I.
        return np.broadcast_to(np.sqrt(2.0 / z.size) * np.eye(num_out), (n_samples, num_out, num_out))
    p = _softmax(z)
    # S = (diag(√p) − p √pᵀ)/√N; column c is √p_c (e_c − p)/√N.
    eye = np.eye(num_out)
    cols = np.sqrt(p)[:, None, :] * (eye[None, :, :] - p[:, :, None])
    return cols / np.sqrt(n_samples)


def gradient(ref: Reference, theta: np.ndarray) -> np.ndarray:
    """Analytic gradient at ``theta`` (canonical order): ``Σ_n J_nᵀ dℓ/dz_n``, or the input function's."""
    params = ref.unflatten(theta)
    if ref.kind == "input_function":
        u, v = params["u"], params["V"]
        a = ref.coupling
        return np.concatenate([u**3 + a * np.sum(v**2) / 2, ((a @ u) * v + v**2 / 2).ravel()])
    z = forward(ref, params)
    return np.einsum("ncp,nc->p", jacobians(ref, params), _output_gradient(ref, z))


def sqrt_hz_jacobians(ref: Reference) -> np.ndarray:
    """``J_nᵀ S_n`` per sample: shape ``(N, C, n)``; ``G = Σ_n Σ_c`` of the outer products of its rows."""
    _require_loss(ref)
    params = ref.params
    z = forward(ref, params)
    jac = jacobians(ref, params)
    root = _output_sqrt_hessian(ref, z)  # (N, C_out, C_cols)
    return np.einsum("nop,noc->ncp", jac, root)


def ggn(ref: Reference) -> np.ndarray:
    """``G = Σ_n J_nᵀ H_z,n J_n`` in canonical order."""
    rows = sqrt_hz_jacobians(ref)
    return np.einsum("ncp,ncq->pq", rows, rows)


def _require_loss(ref: Reference) -> None:
    if ref.loss is None:
        raise ValueError("the input function has no model outputs and no loss, hence no GGN")


# ----------------------------------------------------------------------
# Hessians
# ----------------------------------------------------------------------
def closed_form_hessian(ref: Reference) -> np.ndarray:
    """Closed-form Hessian (canonical order) of linear regression, softmax regression or the input function."""
    if ref.kind == "input_function":
        u, v = ref.params["u"], ref.params["V"]
        a = ref.coupling
        h_uu = np.diag(3.0 * u**2)
        h_uv = np.outer(a, v.ravel())
        h_vv = (a @ u) * np.eye(v.size) + np.diag(v.ravel())
        return np.block([[h_uu, h_uv], [h_uv.T, h_vv]])
    if ref.kind != "linear":
        raise ValueError(f"no closed-form Hessian for {ref.kind!r}")
    if ref.names != ["layer1.weight", "layer1.bias"]:
        raise ValueError("the closed forms assume the order [weight, bias]")
    x1 = np.concatenate([ref.x, np.ones((ref.x.shape[0], 1))], axis=1)  # x̃ = [x, 1]: bias as a last weight row
    z = forward(ref, ref.params)
    n_samples, num_out = z.shape
    if ref.loss == "mse":
        # ℓ = 1/(N C) Σ (x̃ Θ − y)²  ⇒  H = 2/(N C) · X̃ᵀX̃ ⊗ I_C  (Θ raveled row-major = [W.ravel(), b]).
        return 2.0 / (n_samples * num_out) * np.kron(x1.T @ x1, np.eye(num_out))
    # Softmax regression: H = 1/N Σ_n x̃x̃ᵀ ⊗ (diag(p) − p pᵀ).
    p = _softmax(z)
    out = np.zeros((x1.shape[1] * num_out,) * 2)
    for xn, pn in zip(x1, p):
        out += np.kron(np.outer(xn, xn), np.diag(pn) - np.outer(pn, pn))
    return out / n_samples


def fd_jacobian(fn: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, step: float = 3e-4) -> np.ndarray:
    """Jacobian of ``fn`` by central differences with one Richardson extrapolation.

    ``(4 D(h) − D(2h)) / 3`` cancels the ``h²`` error of central differences:
    exact up to rounding for cubic ``fn`` (the gradient of a ReLU MLP with
    MSE inside one linear region), ``O(h⁴)`` otherwise.
    """
    cols = []
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = step

        def central(k: float, e: np.ndarray = e) -> np.ndarray:
            return (fn(theta + k * e) - fn(theta - k * e)) / (2 * k * step)

        cols.append((4 * central(1.0) - central(2.0)) / 3)
    return np.stack(cols, axis=1)


def fd_hessian(ref: Reference, step: float = 3e-4) -> np.ndarray:
    """Hessian (canonical order) by finite differences of the analytic gradient, symmetrized."""
    if ref.kind == "relu_mlp":
        _check_kink_margin(ref, 2 * step)
    hess = fd_jacobian(lambda t: gradient(ref, t), ref.theta, step)
    return (hess + hess.T) / 2


def _check_kink_margin(ref: Reference, step: float) -> None:
    """The differences must stay inside one linear region of the ReLU network."""
    pre = ref.x @ ref.params["layer1.weight"] + ref.params["layer1.bias"]
    reach = step * (np.max(np.abs(ref.x)) + 1.0)
    if np.min(np.abs(pre)) <= 2 * reach:
        raise ValueError(
            f"a ReLU pre-activation ({np.min(np.abs(pre)):.2e}) lies within the finite-difference reach "
            f"({reach:.2e}) of its kink; draw other weights"
        )
