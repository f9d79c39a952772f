"""Exact GGN diagonals and traces of Keras models against per-sample Jacobians from plain ``tf.GradientTape``.

The TensorFlow backend takes a structured route for parameters read once by
a recognized op of the traced graph (matrix products, batched ones included,
convolutions, embedding lookups, broadcast biases and scales), directly or
through ops on parameters alone (inference batch norm's folding), and the
generic per-sample route for every other entry; these models mix both.  The oracle knows neither: it takes the
Jacobian of each sample's outputs evaluated alone through the model's own
variables (``tape.jacobian``) and the closed-form square root of the loss's
output Hessian, ``diag(G) = Σ_n Σ_c (J_nᵀ S_n[:, c])²``.

Tolerances: in float64 the two sides differ by rounding in sums of a few
hundred terms (≲ 1e-13 relative); ``rtol=1e-9`` leaves room for that and
still fails on any wrong formula, which is off by O(1).  ``atol`` is set
relative to the largest entry for entries that vanish (dead ReLUs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from keras_float64 import float64_layers  # noqa: E402

import multihess as mh  # noqa: E402
from multihess._per_sample import generic_squares  # noqa: E402
from multihess.backends import tensorflow_per_sample  # noqa: E402
from multihess.backends.tensorflow_backend import TensorFlowBackend  # noqa: E402

L = keras.layers
N = 6


class Recorded(TensorFlowBackend):
    """The TensorFlow backend, keeping every squares function it hands out (to see which route each entry took)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[Any] = []

    def per_sample_squares(self, f: Callable, per_cotangent: bool = False) -> Any:
        squares = super().per_sample_squares(f, per_cotangent)
        self.made.append(squares)
        return squares


class GenericOnly(TensorFlowBackend):
    """The TensorFlow backend with the generic per-sample route for every entry."""

    def per_sample_squares(self, f: Callable, per_cotangent: bool = False) -> Any:
        return generic_squares(self, f, per_cotangent, vjps=self.per_sample_vjp)


# ----------------------------------------------------------------------------- models
class SquaredKernelDense(L.Dense):
    """A ``Dense`` whose ``call`` squares its kernel first (``x @ (K ⊙ K)``): a parameter-only op, then one read."""

    def call(self, inputs: Any) -> Any:
        return keras.ops.tanh(keras.ops.matmul(inputs, self.kernel * self.kernel) + self.bias)


class TiedKernelDense(L.Dense):
    """A ``Dense`` whose ``call`` reads its kernel in three products (``x K Kᵀ K``): no single read to recognize."""

    def call(self, inputs: Any) -> Any:
        h = keras.ops.matmul(keras.ops.matmul(inputs, self.kernel), keras.ops.transpose(self.kernel))
        return keras.ops.tanh(keras.ops.matmul(h, self.kernel) + self.bias)


class ScaledDense(L.Dense):
    """A ``Dense`` whose ``call`` differs from the parent's (``2 (x @ K) + b``), each weight still read once."""

    def call(self, inputs: Any) -> Any:
        return 2.0 * keras.ops.matmul(inputs, self.kernel) + self.bias


def mlp() -> keras.Model:
    return keras.Sequential([keras.Input((5,)), L.Dense(6, activation="tanh"), L.Dense(3)])


def lenet() -> keras.Model:
    """Convolutions and pooling, channels last; the second convolution's windows (72 entries) are gathered by slices."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            L.Conv2D(8, 3, padding="same", activation="tanh"),
            L.AveragePooling2D(2),
            L.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
            L.Flatten(),
            L.Dense(5, activation="tanh"),
            L.Dense(3),
        ]
    )


def resnet() -> keras.Model:
    """Convolutions without bias, inference-mode batch norms and a skip connection (functional API)."""
    inp = keras.Input((6, 6, 2))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(3, 3, padding="same", use_bias=False)(inp)))
    branch = L.BatchNormalization()(L.Conv2D(3, 3, padding="same", use_bias=False)(h))
    h = L.ReLU()(L.Add()([h, branch]))
    return keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(h)))


def transformer() -> keras.Model:
    """Embedding, multi-head attention (EinsumDense), layer norms and a feed-forward block."""
    tokens = keras.Input((4,), dtype="int32")
    x = L.Embedding(9, 8)(tokens)
    x = L.LayerNormalization()(L.Add()([x, L.MultiHeadAttention(2, 4)(x, x)]))
    x = L.LayerNormalization()(L.Add()([x, L.Dense(8)(L.Dense(12, activation="relu")(x))]))
    return keras.Model(tokens, L.Dense(3)(L.GlobalAveragePooling1D()(x)))


def subclassed() -> keras.Model:
    return keras.Sequential([keras.Input((5,)), SquaredKernelDense(4), TiedKernelDense(4), ScaledDense(3)])


MODELS = {"mlp": mlp, "lenet": lenet, "resnet": resnet, "transformer": transformer, "subclassed": subclassed}


def build(name: str, seed: int = 0) -> tuple[keras.Model, tf.Tensor]:
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    with float64_layers():
        model = MODELS[name]()
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            # Moving statistics far from (0, 1), so that a product using batch statistics would show.
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=layer.moving_variance.shape))
    shape = tuple(model.inputs[0].shape[1:])
    if name == "transformer":
        tokens = rng.integers(0, 9, size=(N,) + shape)
        tokens[0, :3] = 5  # one token three times in a sample: its embedding row sums three cotangents
        x = tf.constant(tokens, tf.int32)
    else:
        x = tf.constant(rng.standard_normal((N,) + shape))
    assert all(v.dtype == "float64" for v in model.weights)
    return model, x


# ----------------------------------------------------------------------------- the oracle
def oracle_diagonal(model: keras.Model, x: tf.Tensor, y: tf.Tensor, loss: str) -> np.ndarray:
    """``Σ_n Σ_c (J_nᵀ S_n[:, c])²`` from per-sample Jacobians of the model's own variables (float64 NumPy)."""
    variables = model.trainable_variables
    z = model(x, training=False).numpy()
    num, classes = z.shape
    total = np.zeros(sum(int(np.prod(v.shape)) for v in variables))
    for n in range(num):
        with tf.GradientTape(persistent=True) as tape:
            out = model(x[n : n + 1], training=False)[0]
        # A loop over the outputs (no pfor): vectorized gradients of attention's einsums are not trusted here.
        jac = tape.jacobian(out, variables, experimental_use_pfor=False)
        J = np.concatenate([np.reshape(j.numpy(), (classes, -1)) for j in jac], axis=1)
        if loss == "cross_entropy":  # mean over samples: H_z = (diag(p) − p pᵀ) / N, S = (diag(√p) − p √pᵀ) / √N
            p = np.exp(z[n] - z[n].max())
            p /= p.sum()
            S = (np.diag(np.sqrt(p)) - np.outer(p, np.sqrt(p))) / np.sqrt(num)
        else:  # sum of squares averaged over every entry: H_z = 2 I / (N C)
            S = np.sqrt(2.0 / z.size) * np.eye(classes)
        total += np.sum((S.T @ J) ** 2, axis=0)
    return total


def targets(loss: str, seed: int = 1) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    if loss == "cross_entropy":
        return tf.constant(rng.integers(0, 3, size=N))
    return tf.constant(rng.standard_normal((N, 3)))


def assert_matches(got: Any, expected: np.ndarray) -> None:
    got = np.asarray(got, dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(expected))))


def structured_entries(backend: Recorded) -> int:
    return sum(s.structured_entries() for s in backend.made if isinstance(s, tensorflow_per_sample.StructuredSquares))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet", "transformer"])
def test_exact_diagonal_and_trace_match_the_per_sample_jacobian_oracle(name: str, loss: str) -> None:
    model, x = build(name)
    y = targets(loss)
    expected = oracle_diagonal(model, x, y, loss)
    backend = Recorded()
    G = mh.ggn(model, data=(x, y), loss=loss, backend=backend)
    assert_matches(mh.diagonal(G, method="exact").value.numpy(), expected)
    np.testing.assert_allclose(float(mh.trace(G, method="exact")), expected.sum(), rtol=1e-9)
    assert structured_entries(backend) > 0  # every model here has some entries on the structured route


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet", "transformer"])
def test_the_structured_route_covers_every_entry(name: str) -> None:
    """Dense, convolution, embedding and attention weights and biases, and batch norms, take the structured route.

    A batch norm's scale and shift reach the samples folded with the moving
    statistics (``x · γ/√(var + ε) + (β − mean · γ/√(var + ε))``), and are
    pulled back through the folding's Jacobian.  The attention's key bias, whose
    products cancel to rounding (softmax ignores a shift shared by a
    query's scores), is accepted too.
    """
    model, x = build(name)
    y = targets("mse")
    backend = Recorded()
    mh.diagonal(mh.ggn(model, data=(x, y), loss="mse", backend=backend), method="exact")
    (squares,) = backend.made
    P = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert squares.structured_entries() == P


def test_a_subclassed_dense_reading_its_kernel_thrice_takes_the_generic_route() -> None:
    model, x = build("subclassed")
    y = targets("cross_entropy")
    backend = Recorded()
    got = mh.diagonal(mh.ggn(model, data=(x, y), loss="cross_entropy", backend=backend), method="exact")
    assert_matches(got.value.numpy(), oracle_diagonal(model, x, y, "cross_entropy"))
    # The tied kernel (4 × 4 entries) goes the generic route; its bias, the squared kernel (through the
    # square's Jacobian) and the scaled layer are recognized.
    P = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert backend.made[0].structured_entries() == P - 16


# A doubled broadcast product breaks the first-moment check (its ``total`` comes from the products); a doubled
# embedding or batch norm product only the check of samples alone can see (their ``total`` has a formula of its
# own).
@pytest.mark.parametrize(
    ("use", "name", "rejected"),
    # the biases; the embedding table; the batch norms' scales and shifts
    [("_Broadcast", "mlp", 6 + 3), ("_Gather", "transformer", 9 * 8), ("_Derived", "resnet", 2 * (3 + 3))],
)
def test_a_wrong_structured_formula_is_caught_and_its_entries_go_the_generic_route(
    monkeypatch, use: str, name: str, rejected: int
) -> None:
    """The guards compare with ordinary and per-sample gradients: a broken rule costs time, never correctness."""
    kind = getattr(tensorflow_per_sample, use)
    original = kind.products

    def doubled(self: Any, deltas: Any, n0: int, n1: int) -> Any:
        return 2.0 * original(self, deltas, n0, n1)

    monkeypatch.setattr(kind, "products", doubled)
    model, x = build(name)
    y = targets("cross_entropy")
    backend = Recorded()
    got = mh.diagonal(mh.ggn(model, data=(x, y), loss="cross_entropy", backend=backend), method="exact")
    assert_matches(got.value.numpy(), oracle_diagonal(model, x, y, "cross_entropy"))
    P = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert backend.made[0].structured_entries() == P - rejected


@pytest.mark.parametrize("name", ["lenet", "transformer"])
def test_monte_carlo_squares_in_small_chunks_match_the_generic_route(name: str) -> None:
    """Per-cotangent squares, with a memory budget that splits the cotangents and the samples into chunks."""
    model, x = build(name)
    y = targets("cross_entropy")
    kwargs = {"method": "mc", "num_samples": 3, "seed": 4, "memory_budget": 4096}
    got = mh.diagonal(mh.ggn(model, data=(x, y), loss="cross_entropy", backend=Recorded()), **kwargs)
    expected = mh.diagonal(mh.ggn(model, data=(x, y), loss="cross_entropy", backend=GenericOnly()), **kwargs)
    assert_matches(got.value.numpy(), expected.value.numpy())


def test_the_compiled_route_is_reused_between_calls() -> None:
    """One plan per input signature: a second diagonal on the same operator neither checks nor traces again."""
    model, x = build("mlp")
    y = targets("cross_entropy")
    backend = Recorded()
    G = mh.ggn(model, data=(x, y), loss="cross_entropy", backend=backend)
    first = mh.diagonal(G, method="exact").value.numpy()
    (squares,) = backend.made
    (plan,) = squares.plans.values()
    traces = plan.run.experimental_get_tracing_count()
    second = mh.diagonal(G, method="exact").value.numpy()
    assert len(backend.made) == 1 and list(squares.plans.values()) == [plan]
    assert plan.run.experimental_get_tracing_count() == traces == 1
    np.testing.assert_array_equal(first, second)
