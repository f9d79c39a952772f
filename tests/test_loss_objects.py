"""PyTorch loss modules and Keras loss objects: mapped to built-in losses where they equal one, else called right.

Every Hessian is checked against the framework's own autodiff applied to the
framework's own loss object: ``torch.autograd.functional.hessian`` and nested
``tf.GradientTape``s, on tiny float64 models.  A Keras loss takes
``(y_true, y_pred)``; called the other way round it gave ``H = 0``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import multihess as mh  # noqa: E402
from multihess._losses import (  # noqa: E402
    BCEWithLogitsLoss,
    CallableLoss,
    CrossEntropyLoss,
    MSELoss,
    PoissonNLLLoss,
    make_loss,
)

N, D, HID, C = 5, 3, 4, 3
RNG = np.random.default_rng(0)
X = RNG.standard_normal((N, D))
LABELS = np.array([0, 2, 1, 2, 0])
PROBS = RNG.dirichlet(np.ones(C), N)
COUNTS = RNG.poisson(2.0, (N, C)).astype(np.float64)
BITS = (RNG.random((N, C)) < 0.5).astype(np.float64)
PARAMS = {
    "W1": 0.7 * RNG.standard_normal((D, HID)),
    "b1": 0.1 * RNG.standard_normal(HID),
    "W2": 0.7 * RNG.standard_normal((HID, C)),
    "b2": 0.1 * RNG.standard_normal(C),
}


# ----------------------------------------------------------------------------- PyTorch
def _torch_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(D, HID), nn.Tanh(), nn.Linear(HID, C)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(PARAMS["W1"].T))
        model[0].bias.copy_(torch.tensor(PARAMS["b1"]))
        model[2].weight.copy_(torch.tensor(PARAMS["W2"].T))
        model[2].bias.copy_(torch.tensor(PARAMS["b2"]))
    return model


def _torch_oracle(model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The Hessian of ``loss(model(x), y)`` in the flat parameters, by ``torch.autograd.functional.hessian``."""
    named = list(model.named_parameters())
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def total(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        params = {n: t.view(p.shape) for (n, p), t in zip(named, parts)}
        return loss(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(total, w0).numpy()


TORCH_CASES = {
    "ce labels": (lambda: nn.CrossEntropyLoss(), LABELS, CrossEntropyLoss),
    "ce probabilities, sum": (lambda: nn.CrossEntropyLoss(reduction="sum"), PROBS, CrossEntropyLoss),
    "mse": (lambda: nn.MSELoss(), PROBS, MSELoss),
    "mse sum": (lambda: nn.MSELoss(reduction="sum"), PROBS, MSELoss),
    "bce": (lambda: nn.BCEWithLogitsLoss(), BITS, BCEWithLogitsLoss),
    "poisson": (lambda: nn.PoissonNLLLoss(log_input=True, full=False), COUNTS, PoissonNLLLoss),
    # Settings no built-in loss has: called as the module, through autodiff.
    "ce label smoothing": (lambda: nn.CrossEntropyLoss(label_smoothing=0.1), LABELS, CallableLoss),
    "ce class weights": (lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]).double()), LABELS, None),
    "ce ignore_index": (lambda: nn.CrossEntropyLoss(ignore_index=2), LABELS, CallableLoss),
    "bce pos_weight": (lambda: nn.BCEWithLogitsLoss(pos_weight=torch.full((C,), 3.0).double()), BITS, None),
    "poisson full": (lambda: nn.PoissonNLLLoss(full=True), COUNTS, CallableLoss),
    "poisson rates": (lambda: nn.PoissonNLLLoss(log_input=False), COUNTS, CallableLoss),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_loss_modules(case: str) -> None:
    make, targets, kind = TORCH_CASES[case]
    loss = make()
    assert isinstance(make_loss(loss), kind or CallableLoss)
    model, x = _torch_model(), torch.tensor(X)
    y = torch.tensor(targets)
    H = mh.hessian(model, data=(x, y), loss=loss).dense().numpy()
    np.testing.assert_allclose(H, _torch_oracle(model, loss, x, y), rtol=1e-10, atol=1e-13)


def test_torch_mapped_losses_give_exact_ggn_diagonals() -> None:
    # The mapped loss brings its analytic H_z: the exact diagonal works and equals diag(Jᵀ H_z J) by autograd.
    model, x, y = _torch_model(), torch.tensor(X), torch.tensor(LABELS)
    loss = nn.CrossEntropyLoss()
    named = list(model.named_parameters())
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        return torch.func.functional_call(model, {n: t.view(p.shape) for (n, p), t in zip(named, parts)}, (x,))

    z0 = outputs(w0).detach()
    J = torch.autograd.functional.jacobian(outputs, w0).reshape(z0.numel(), -1)
    Hz = torch.autograd.functional.hessian(lambda z: loss(z.view_as(z0), y), z0.reshape(-1))
    d = mh.diagonal(mh.ggn(model, data=(x, y), loss=loss), method="exact").value.numpy()
    np.testing.assert_allclose(d, torch.diagonal(J.T @ Hz @ J).numpy(), rtol=1e-10, atol=1e-14)


def test_loss_object_reduction_conflicts_and_none() -> None:
    with pytest.raises(ValueError, match="reduction 'none'.*reduction='mean'"):
        make_loss(nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="contradicts the loss object MSELoss"):
        make_loss(nn.MSELoss(), reduction="sum")
    assert make_loss(nn.MSELoss(reduction="sum"), reduction="sum").reduction == "sum"
    with pytest.raises(ValueError, match="reduction 'none'"):
        make_loss(keras.losses.MeanSquaredError(reduction=None))
    for cls in (nn.MSELoss, keras.losses.MeanSquaredError):
        with pytest.raises(TypeError, match=f"pass an instance, such as loss={cls.__name__}"):
            make_loss(cls)


# ----------------------------------------------------------------------------- Keras
def _tf_apply(p: dict[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    return tf.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def _keras_oracle(loss: keras.losses.Loss, y: tf.Tensor, out: callable = _tf_apply) -> np.ndarray:
    """Hessian of ``loss(y, out(params, x))`` in the flat parameters (keys sorted, as tf.nest), by nested tapes."""
    names = sorted(PARAMS)
    w = tf.Variable(np.concatenate([PARAMS[k].ravel() for k in names]))
    sizes = [PARAMS[k].size for k in names]
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            parts = tf.split(w, sizes)
            p = {k: tf.reshape(t, PARAMS[k].shape) for k, t in zip(names, parts)}
            value = loss(y, out(p, tf.constant(X)))
        g = inner.gradient(value, w)
    return outer.jacobian(g, w).numpy()


def _keras_dtype(loss_class: type, **kwargs: object) -> keras.losses.Loss:
    # Keras losses compute in their own dtype (float32 by default); the oracle is float64.
    return loss_class(**kwargs, dtype="float64")


KERAS_CASES = {
    "categorical ce": (
        lambda: _keras_dtype(keras.losses.CategoricalCrossentropy, from_logits=True),
        PROBS,
        CrossEntropyLoss,
    ),
    "categorical ce, sum": (
        lambda: _keras_dtype(keras.losses.CategoricalCrossentropy, from_logits=True, reduction="sum"),
        PROBS,
        CrossEntropyLoss,
    ),
    "sparse ce": (
        lambda: _keras_dtype(keras.losses.SparseCategoricalCrossentropy, from_logits=True),
        LABELS,
        CrossEntropyLoss,
    ),
    "sparse ce, labels (N, 1)": (
        lambda: _keras_dtype(keras.losses.SparseCategoricalCrossentropy, from_logits=True),
        LABELS[:, None],
        CrossEntropyLoss,
    ),
    "mse": (lambda: _keras_dtype(keras.losses.MeanSquaredError), PROBS, MSELoss),
    "bce": (lambda: _keras_dtype(keras.losses.BinaryCrossentropy, from_logits=True), BITS, BCEWithLogitsLoss),
    # Not equal to a built-in loss: called as Keras calls it, (y_true, y_pred).
    "ce label smoothing": (
        lambda: _keras_dtype(keras.losses.CategoricalCrossentropy, from_logits=True, label_smoothing=0.2),
        PROBS,
        CallableLoss,
    ),
    "mse sum": (lambda: _keras_dtype(keras.losses.MeanSquaredError, reduction="sum"), PROBS, CallableLoss),
    "huber": (lambda: _keras_dtype(keras.losses.Huber, delta=0.3), PROBS, CallableLoss),
}


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_keras_loss_objects(case: str) -> None:
    make, targets, kind = KERAS_CASES[case]
    loss = make()
    assert isinstance(make_loss(loss), kind)
    y = tf.constant(targets)
    params = {k: tf.constant(v) for k, v in PARAMS.items()}
    H = mh.hessian(_tf_apply, params, data=(tf.constant(X), y), loss=loss).dense().numpy()
    expected = _keras_oracle(loss, y)
    assert np.abs(expected).max() > 1e-3  # a Hessian that was 0 called the wrong way round
    np.testing.assert_allclose(H, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["poisson", "probabilities"])
def test_keras_losses_on_rates_and_probabilities_are_called_the_keras_way(kind: str) -> None:
    # keras.losses.Poisson takes rates and from_logits=False takes probabilities: no built-in loss equals them.
    def positive(p: dict[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        z = _tf_apply(p, x)
        return tf.exp(z) if kind == "poisson" else tf.nn.softmax(z)

    if kind == "poisson":
        loss, y = _keras_dtype(keras.losses.Poisson), tf.constant(COUNTS)
    else:
        loss, y = _keras_dtype(keras.losses.CategoricalCrossentropy, from_logits=False), tf.constant(PROBS)
    assert isinstance(make_loss(loss), CallableLoss)
    params = {k: tf.constant(v) for k, v in PARAMS.items()}
    H = mh.hessian(positive, params, data=(tf.constant(X), y), loss=loss).dense().numpy()
    np.testing.assert_allclose(H, _keras_oracle(loss, y, positive), rtol=1e-9, atol=1e-12)


def test_keras_loss_functions_are_called_targets_first() -> None:
    def summed(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(keras.losses.categorical_crossentropy(y_true, y_pred, from_logits=True))

    summed.__module__ = "keras.src.losses.losses"  # what a function of keras.losses reports
    assert make_loss(keras.losses.categorical_crossentropy).targets_first
    assert make_loss(summed).targets_first
    y = tf.constant(PROBS)
    params = {k: tf.constant(v) for k, v in PARAMS.items()}
    H = mh.hessian(_tf_apply, params, data=(tf.constant(X), y), loss=summed).dense().numpy()
    np.testing.assert_allclose(H, _keras_oracle(summed, y), rtol=1e-9, atol=1e-12)


def test_keras_cross_entropy_with_class_axis_last_on_a_torch_model() -> None:
    # A mapped Keras loss is the built-in loss, so it runs on any framework's arrays.  Outputs (N, T, C) have
    # the classes last, as in Keras.  The Hessian is checked against torch autograd on a hand-written loss; the
    # exact GGN diagonal, which splits the square root's columns per position on the last axis, against
    # diag(Jᵀ H_z J) with J and H_z from torch autograd; the sampled diagonal against it within its error.
    T = 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, T * C), nn.Tanh(), nn.Unflatten(1, (T, C))).double()
    x, labels = torch.tensor(X), torch.tensor(RNG.integers(0, C, (N, T)))

    def keras_ce(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(z.reshape(N, T, C).movedim(-1, 1), labels)

    named = list(model.named_parameters())
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        return torch.func.functional_call(model, {n: t.view(p.shape) for (n, p), t in zip(named, parts)}, (x,))

    z0 = outputs(w0).detach()
    J = torch.autograd.functional.jacobian(outputs, w0).reshape(z0.numel(), -1)
    Hz = torch.autograd.functional.hessian(keras_ce, z0.reshape(-1))
    expected = torch.diagonal(J.T @ Hz @ J).numpy()

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    H = mh.hessian(model, data=(x, labels), loss=loss).dense().numpy()
    np.testing.assert_allclose(
        H, torch.autograd.functional.hessian(lambda w: keras_ce(outputs(w)), w0).numpy(), rtol=1e-10, atol=1e-13
    )
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] for 3 classes"):
        mh.hessian(model, data=(x, labels + 1), loss=loss)

    G = mh.ggn(model, data=(x, labels), loss=loss)
    np.testing.assert_allclose(mh.diagonal(G, method="exact").value.numpy(), expected, rtol=1e-10, atol=1e-14)
    mc = mh.diagonal(G, method="mc", num_samples=3000, seed=0)
    z_scores = (mc.value.numpy() - expected) / mc.std_error.numpy()
    assert np.abs(z_scores).max() < 5.0, z_scores
