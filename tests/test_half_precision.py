"""float16 and bfloat16 models in PyTorch, JAX and TensorFlow: products in the model's dtype, sums in float32 or wider.

The oracle is a float64 Hessian of the same network (weights and inputs
rounded to the half-precision dtype first), written by hand with PyTorch
autograd, or a closed form in NumPy; the probes of the trace oracle are the same draws
from the same seed.  Tolerances are a few machine epsilons of the dtype:
what rounding the products to 8 or 11 bits costs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import functools  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # before any array exists: float64 oracles need float64 models

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import multihess as mh  # noqa: E402
from multihess._probes import draw_probes, probe_order  # noqa: E402

N, D, HID, C = 16, 4, 6, 3
RNG = np.random.default_rng(0)
X = RNG.standard_normal((N, D))
LABELS = RNG.integers(0, C, N)
# Sorted names: every framework flattens this dict in the same order.
PARAMS = {
    "W1": RNG.standard_normal((D, HID)) / np.sqrt(D),
    "W2": RNG.standard_normal((HID, C)) / np.sqrt(HID),
    "b1": 0.1 * RNG.standard_normal(HID),
    "b2": 0.1 * RNG.standard_normal(C),
}
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
FRAMEWORKS = ["torch", "jax", "tensorflow"]


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` and back to float64."""
    return np.asarray(jnp.asarray(a, dtype=dtype).astype(jnp.float64))


def framework_array(framework: str, a: np.ndarray, dtype: str) -> object:
    if framework == "torch":
        return torch.tensor(a).to(getattr(torch, dtype)) if a.dtype.kind == "f" else torch.tensor(a)
    if framework == "jax":
        return jnp.asarray(a, dtype=dtype) if a.dtype.kind == "f" else jnp.asarray(a)
    return tf.cast(tf.constant(a), dtype) if a.dtype.kind == "f" else tf.constant(a)


def mlp(framework: str):  # noqa: ANN201 - a function of the framework's arrays
    tanh = {"torch": torch.tanh, "jax": jnp.tanh, "tensorflow": tf.tanh}[framework]
    return lambda p, x: tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


@functools.cache
def oracle_hessian(dtype: str) -> np.ndarray:
    """float64 Hessian of the mean cross-entropy of the MLP at the weights and inputs rounded to ``dtype``.

    Plain PyTorch autograd on a hand-written network and loss.
    """
    names = sorted(PARAMS)
    sizes = [PARAMS[k].size for k in names]
    w0 = torch.cat([torch.tensor(rounded(PARAMS[k], dtype)).reshape(-1) for k in names])
    x, y = torch.tensor(rounded(X, dtype)), torch.tensor(LABELS)

    def loss(w: torch.Tensor) -> torch.Tensor:
        p = {k: t.reshape(PARAMS[k].shape) for k, t in zip(names, torch.split(w, sizes))}
        z = torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]
        return -torch.mean(torch.log_softmax(z, dim=1)[torch.arange(N), y])

    return torch.autograd.functional.hessian(loss, w0).numpy()


def half_hessian(framework: str, dtype: str) -> mh.CurvatureOperator:
    params = {k: framework_array(framework, v, dtype) for k, v in PARAMS.items()}
    data = (framework_array(framework, X, dtype), framework_array(framework, LABELS, dtype))
    return mh.hessian(mlp(framework), params, data=data, loss="cross_entropy")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_products_trace_and_top_eigenvalue_against_float64(framework: str, dtype: str) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        H = half_hessian(framework, dtype)
        b = H.backend
        v = rounded(np.cos(np.arange(H.shape[1])), dtype)
        hv = H @ b.asarray(v, H.cols.w)
        assert dtype in str(hv.dtype)  # products in the model's dtype
        trace = mh.trace(H, 40, seed=3)
        mh.trace(H, 40, seed=4)
        top = mh.eigvalsh(H, k=1)
    H64 = oracle_hessian(dtype)
    eps = EPS[dtype]

    hv = np.asarray(b.to_numpy(hv), dtype=np.float64)
    assert np.linalg.norm(hv - H64 @ v) <= 4 * eps * np.linalg.norm(H64 @ v)

    Z = draw_probes(np.random.default_rng(3), 40, H.shape[1], "rademacher", probe_order(H))
    expected = float(np.mean(np.einsum("ki,ij,kj->k", Z, H64, Z)))
    assert isinstance(trace.value, float)
    assert abs(trace.value - expected) <= 4 * eps * abs(expected)

    assert top.dtype == np.float64
    largest = np.linalg.eigvalsh(H64)[-1]
    assert abs(top[0] - largest) <= 4 * eps * largest

    # One warning about the products' precision per operator, however many estimates use it.
    precision = [str(w.message) for w in record if f"run in {dtype}" in str(w.message)]
    assert len(precision) == 1, precision


def _scaled_identity_problem(framework: str, dtype: str) -> mh.CurvatureOperator:
    """Linear least squares, sum of squares, ``x = 32 I``: ``H = 2 · 32² · I = 2048 I`` exactly, 64 × 64."""
    n = 64
    x = 32.0 * np.eye(n)
    weights = framework_array(framework, np.zeros((n, 1)), dtype)
    data = (framework_array(framework, x, dtype), framework_array(framework, np.zeros((n, 1)), dtype))
    return mh.hessian(lambda w, x: x @ w, weights, data=data, loss="mse", reduction="sum")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_float16_sums_do_not_overflow(framework: str) -> None:
    # tr H = 131072 and ‖H z‖² = 2.7e8 exceed float16's 65504, while every entry of H z is 2048 z_i.
    H = _scaled_identity_problem(framework, "float16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert mh.trace(H, 8).value == 2048.0 * 64
        assert mh.frobenius_norm(H, 8).value == 2048.0 * 8
        diagonal = mh.diagonal(H, 8).value
    assert np.all(np.asarray(H.backend.to_numpy(diagonal)) == 2048.0)
    assert "float16" in str(diagonal.dtype)  # estimates indexed by parameters come back in the model's dtype


def test_torch_autocast() -> None:
    # A float32 model under autocast: bfloat16 kernels inside, float32 parameters and products outside.
    params = {k: torch.tensor(v, dtype=torch.float32) for k, v in PARAMS.items()}
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(LABELS)
    v = np.cos(np.arange(sum(p.numel() for p in params.values())))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        H = mh.hessian(mlp("torch"), params, data=(x, y), loss="cross_entropy")
        hv = H @ torch.tensor(v, dtype=torch.float32)
    assert hv.dtype == torch.float32
    H64 = oracle_hessian("float32")
    error = np.linalg.norm(hv.double().numpy() - H64 @ v) / np.linalg.norm(H64 @ v)
    assert 1e-5 < error <= 4 * EPS["bfloat16"]  # bfloat16 arithmetic inside, and its rounding shows


def test_float16_exact_ggn_diagonal_sums_in_float32() -> None:
    # Softmax regression on many small inputs: each squared per-sample product (~x² p / N, here ~1e-9) is
    # below float16's smallest normal number 6e-5, while the diagonal Σ_n x_nj² p_nc (1 − p_nc) / N is not.
    n, scale = 32768, 0.05
    rng = np.random.default_rng(1)
    x = torch.tensor(scale * rng.standard_normal((n, D)), dtype=torch.float16)
    y = torch.tensor(rng.integers(0, C, n))
    torch.manual_seed(0)
    model = nn.Linear(D, C, bias=False).half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        d = mh.diagonal(mh.ggn(model, data=(x, y), loss="cross_entropy"), method="exact").value
    xd, w = x.double().numpy(), model.weight.detach().double().numpy()
    z = xd @ w.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = ((p * (1 - p)).T @ xd**2 / n).ravel()  # (C, D) row-major, as the weight
    assert d.dtype == torch.float16
    assert np.abs(d.double().numpy() - expected).max() <= 1.2e-3 * expected.max()
