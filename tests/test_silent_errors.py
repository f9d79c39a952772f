"""Inputs that used to give wrong numbers without a word: each now raises or warns, checked in every framework.

Oracles are written by hand: PyTorch autograd Hessians of the loss, closed
forms of ``H_z``, and NumPy float64.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
from multihess._finite_difference import FiniteDifferenceHessian  # noqa: E402
from multihess._losses import CrossEntropyLoss  # noqa: E402
from multihess.backends.torch_backend import TorchBackend  # noqa: E402

N, D, C = 6, 3, 4
RNG = np.random.default_rng(0)
X = RNG.standard_normal((N, D))
W = 0.5 * RNG.standard_normal((D, C))


def _user_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)]


# ----------------------------------------------------------------------------- labels outside [0, C)
def _linear_problem(framework: str, labels: np.ndarray) -> tuple[tuple, dict]:
    """Softmax regression ``x @ W`` with the given labels, in one framework."""
    if framework == "torch":
        model = nn.Linear(D, C, bias=False).double()
        return (model,), {"data": (torch.tensor(X), torch.tensor(labels))}
    if framework == "jax":
        return (lambda w, x: x @ w, jnp.asarray(W)), {"data": (jnp.asarray(X), jnp.asarray(labels))}
    return (lambda w, x: x @ w, tf.constant(W)), {"data": (tf.constant(X), tf.constant(labels))}


@pytest.mark.parametrize("framework", ["torch", "jax", "tensorflow"])
@pytest.mark.parametrize("bad", [C, -1])
def test_labels_outside_the_classes_are_refused(framework: str, bad: int) -> None:
    labels = np.array([0, 1, 2, 3, bad, 1])
    args, kwargs = _linear_problem(framework, labels)
    low, high = min(labels), max(labels)
    message = rf"labels must lie in \[0, {C - 1}\] for {C} classes.*range over \[{low}, {high}\]"
    for make in (mh.hessian, mh.ggn):
        with pytest.raises(ValueError, match=message):
            make(*args, **kwargs, loss="cross_entropy")


def test_pytorch_ignore_index_is_named_in_the_error() -> None:
    args, kwargs = _linear_problem("torch", np.array([0, 1, -100, 3, 2, 1]))
    with pytest.raises(ValueError, match="-100 is PyTorch's default ignore_index"):
        mh.hessian(*args, **kwargs, loss=nn.CrossEntropyLoss())


def test_labels_in_range_still_give_the_closed_form() -> None:
    # The check must not change valid problems: softmax regression's Hessian is Σ_n (diag p − p pᵀ) ⊗ x xᵀ / N.
    labels = np.array([0, 1, 2, 3, 3, 1])
    args, kwargs = _linear_problem("jax", labels)
    H = np.asarray(mh.hessian(*args, **kwargs, loss="cross_entropy").dense())
    z = X @ W
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = sum(np.kron(np.outer(X[n], X[n]), np.diag(p[n]) - np.outer(p[n], p[n])) for n in range(N)) / N
    np.testing.assert_allclose(H, expected, rtol=1e-10, atol=1e-13)


def test_later_batches_are_checked_by_check_targets() -> None:
    # What each batch after the first goes through: only the targets and one sample's output shape.
    backend, loss = TorchBackend(), CrossEntropyLoss()
    loss.check_targets(backend, torch.tensor([0, 3, 2]), (C,))
    with pytest.raises(ValueError, match=r"range over \[0, 9\]"):
        loss.check_targets(backend, torch.tensor([0, 9, 2]), (C,))
    with pytest.raises(ValueError, match=r"range over \[0, 4\]"):  # class axis last (Keras)
        CrossEntropyLoss(class_axis=-1).check_targets(backend, torch.tensor([[0, 4]]), (2, C))
    with pytest.raises(ValueError, match="whole numbers"):
        CrossEntropyLoss(targets="labels").check_targets(backend, torch.tensor([0.0, 1.5]), (C,))
    loss.check_targets(backend, torch.rand(3, C, dtype=torch.float64), (C,))  # probabilities: nothing to check


# ----------------------------------------------------------------------------- probability targets with negative mass
def _ggn_diagonal_oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``diag(Jᵀ H_z J)`` with ``H_z`` the autograd Hessian of PyTorch's own cross-entropy in the outputs."""
    named = list(model.named_parameters())
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        return torch.func.functional_call(model, {n: t.view(p.shape) for (n, p), t in zip(named, parts)}, (x,))

    z0 = outputs(w0).detach()
    J = torch.autograd.functional.jacobian(outputs, w0).reshape(z0.numel(), -1)
    Hz = torch.autograd.functional.hessian(lambda z: nn.functional.cross_entropy(z.view_as(z0), y), z0.reshape(-1))
    return torch.diagonal(J.T @ Hz @ J).numpy()


def _soft_targets(masses: list[float]) -> torch.Tensor:
    # Rows with one negative entry each and the given totals.
    rows = torch.tensor(RNG.uniform(0.1, 1.0, (N, C)))
    rows[:, 0] = -0.05
    return rows / rows.sum(1, keepdim=True) * torch.tensor(masses, dtype=torch.float64)[:, None]


def test_negative_target_mass_is_refused_by_exact_and_sampled_diagonals() -> None:
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    y = _soft_targets([1.0, 1.0, -0.5, 1.0, 2.0, 1.0])
    G = mh.ggn(model, data=(torch.tensor(X), y), loss="cross_entropy")
    for method in ("exact", "mc"):
        with pytest.raises(ValueError, match=r"1 sample\(s\).*negative total mass \(as low as -0.5\)"):
            mh.diagonal(G, method=method)
    with pytest.raises(ValueError, match="negative total mass"):
        mh.trace(G, method="exact")


def test_negative_entries_with_non_negative_mass_are_fine() -> None:
    # Only the mass t enters H_z = t (diag p − p pᵀ); negative entries keep it positive semi-definite.
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    x, y = torch.tensor(X), _soft_targets([1.0, 0.5, 0.0, 1.0, 2.0, 1.0])
    G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    d = mh.diagonal(G, method="exact").value.numpy()
    np.testing.assert_allclose(d, _ggn_diagonal_oracle(model, x, y), rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- finite differences
def _mlp(activation: type[nn.Module], dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), activation(), nn.Linear(32, 32), activation(), nn.Linear(32, 3))
    x = torch.randn(64, 10)
    return model.to(dtype), x.to(dtype), torch.randint(0, 3, (64,))


def _exact_hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Double-backward Hessian-vector product written with plain autograd (float64)."""
    named = list(model.named_parameters())
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named]).double()
    model64 = model.double() if next(model.parameters()).dtype != torch.float64 else model

    def loss(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        params = {n: t.view(p.shape) for (n, p), t in zip(named, parts)}
        return nn.functional.cross_entropy(torch.func.functional_call(model64, params, (x.double(),)), y)

    return torch.autograd.functional.hvp(loss, w0, v.double())[1]


def test_finite_differences_warn_on_a_float32_relu_network() -> None:
    model, x, y = _mlp(nn.ReLU, torch.float32)
    F = mh.finite_difference_hessian(model, data=(x, y), loss="cross_entropy")
    v = torch.randn(F.shape[1], generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fd = F @ v
        F @ v  # checked once per operator
    messages = _user_warnings(record)
    assert len(messages) == 1 and "disagree" in messages[0] and "step=" in messages[0], messages
    exact = _exact_hvp(model, x, y, v)
    # The warning is warranted: the differences are nowhere near the Hessian.
    assert float((fd.double() - exact).norm() / exact.norm()) > 0.1


@pytest.mark.parametrize(("activation", "dtype"), [(nn.Tanh, torch.float32), (nn.Tanh, torch.float64)])
def test_finite_differences_stay_quiet_on_smooth_networks(activation: type[nn.Module], dtype: torch.dtype) -> None:
    model, x, y = _mlp(activation, dtype)
    F = mh.finite_difference_hessian(model, data=(x, y), loss="cross_entropy")
    v = torch.randn(F.shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fd = F @ v
    assert _user_warnings(record) == []
    exact = _exact_hvp(model, x, y, v)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-8
    assert float((fd.double() - exact).norm() / exact.norm()) < tolerance


def test_finite_difference_step_check_can_be_switched_off() -> None:
    model, x, y = _mlp(nn.ReLU, torch.float32)
    problem = mh.finite_difference_hessian(model, data=(x, y), loss="cross_entropy").problem
    F = FiniteDifferenceHessian(problem, check_step=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        F @ torch.ones(F.shape[1])
    assert _user_warnings(record) == []


# ----------------------------------------------------------------------------- clear errors
def test_a_model_on_the_meta_device_is_refused_with_the_fix() -> None:
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match=r"\['weight', 'bias'\] are on torch's 'meta' device.*to_empty"):
        mh.hessian(model, data=(x, y), loss="cross_entropy")
    real = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"\(4, 3\) tensor is on torch's 'meta' device"):
        mh.hessian(real, data=(x.to("meta"), y), loss="cross_entropy")


@pytest.mark.parametrize("framework", ["jax", "tensorflow"])
def test_a_function_without_its_parameters_says_to_pass_them(framework: str) -> None:
    if framework == "jax":
        x, y = jnp.ones((4, 3)), jnp.zeros(4, dtype=jnp.int32)

        def apply(params, inputs):
            return inputs @ params["w"]
    else:
        x, y = tf.ones((4, 3)), tf.zeros(4, dtype=tf.int32)

        def apply(params, inputs):
            return tf.matmul(inputs, params["w"])

    with pytest.raises(
        TypeError, match=r"'apply' is a function and no parameters were given.*mh.hessian\(apply_fn, params"
    ):
        mh.hessian(apply, data=(x, y), loss="cross_entropy")
