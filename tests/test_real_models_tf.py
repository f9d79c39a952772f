"""Real Keras 3 models on TensorFlow: products checked against TensorFlow's own autodiff.

A LeNet-5, a small ResNet (BatchNormalization in inference mode, skip
connections) and a 2-layer transformer on ``keras.layers.MultiHeadAttention``,
built here at toy sizes (a few hundred parameters) in float64.  The oracles
are written with plain TensorFlow: central differences of ``GradientTape``
gradients taken with the values assigned to the model's own variables, the
dense Hessian from nested tapes (``jacobian`` of the gradient), and
``Jᵀ H_z J`` from the tape's Jacobian of the logits.  Nothing here compares
multihess against itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import functools  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras_float64 import float64_layers  # noqa: E402

import multihess as mh  # noqa: E402

N, VOCAB, SEQ, DIM = 6, 7, 5, 4  # batch, vocabulary, sequence length, model width


# ----------------------------------------------------------------------------- models
def lenet() -> keras.Model:
    """LeNet-5 in miniature: two tanh convolutions with average pooling, three dense layers."""
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(2, 3, activation="tanh"),  # -> 6x6x2
            L.AveragePooling2D(2),  # -> 3x3x2
            L.Conv2D(4, 2, activation="tanh"),  # -> 2x2x4
            L.Flatten(),
            L.Dense(8, activation="tanh"),
            L.Dense(6, activation="tanh"),
            L.Dense(4),
        ]
    )


def resnet() -> keras.Model:
    """Conv-BN-ReLU stem and one residual block (conv-BN-ReLU-conv-BN + skip), global pooling, linear head."""
    L = keras.layers
    conv = functools.partial(L.Conv2D, 4, 3, padding="same", use_bias=False)
    x = keras.Input((8, 8, 2))
    h = L.ReLU()(L.BatchNormalization()(conv()(x)))
    r = L.BatchNormalization()(conv()(L.ReLU()(L.BatchNormalization()(conv()(h)))))
    h = L.ReLU()(L.Add()([h, r]))
    return keras.Model(x, L.Dense(3)(L.GlobalAveragePooling2D()(h)))


class PositionEmbedding(keras.layers.Layer):
    """A learned position embedding added to the token embeddings."""

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.table = self.add_weight(shape=tuple(input_shape[1:]), initializer=keras.initializers.RandomNormal(0, 0.5))

    def call(self, h: Any) -> Any:
        return h + self.table


class LayerNorm(keras.layers.Layer):
    """Layer normalization written out with ``keras.ops``.

    ``keras.layers.LayerNormalization`` on TensorFlow takes its variance
    from ``tf.nn.moments``, which subtracts ``stop_gradient(mean)``: first
    derivatives are right, second derivatives are not (see
    ``test_keras_layer_normalization_second_derivative``).
    """

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones")
        self.beta = self.add_weight(shape=(input_shape[-1],), initializer="zeros")

    def call(self, h: Any) -> Any:
        centered = h - keras.ops.mean(h, axis=-1, keepdims=True)
        variance = keras.ops.mean(keras.ops.square(centered), axis=-1, keepdims=True)
        return centered * keras.ops.rsqrt(variance + 1e-3) * self.gamma + self.beta


def transformer() -> keras.Model:
    """Two post-norm encoder layers (MultiHeadAttention, GELU feed-forward) over token embeddings."""
    L = keras.layers
    tokens = keras.Input((SEQ,), dtype="int32")
    h = PositionEmbedding()(L.Embedding(VOCAB, DIM)(tokens))
    for _ in range(2):
        h = LayerNorm()(h + L.MultiHeadAttention(num_heads=2, key_dim=DIM // 2)(h, h))
        h = LayerNorm()(h + L.Dense(DIM)(L.Dense(2 * DIM, activation="gelu")(h)))
    return keras.Model(tokens, L.Dense(3)(L.GlobalAveragePooling1D()(h)))


@dataclasses.dataclass
class Case:
    model: keras.Model
    x: tf.Tensor
    y: tf.Tensor

    @property
    def variables(self) -> list[Any]:
        return self.model.trainable_variables

    @property
    def w0(self) -> tf.Tensor:
        return tf.concat([tf.reshape(v, [-1]) for v in self.variables], axis=0)

    def split(self, w: tf.Tensor) -> list[tf.Tensor]:
        """Flat -> one tensor per trainable variable, in trainable_variables order (multihess's flat order)."""
        parts = tf.split(w, [int(np.prod(v.shape)) for v in self.variables])
        return [tf.reshape(p, v.shape) for p, v in zip(parts, self.variables)]

    def outputs(self, w: tf.Tensor) -> tf.Tensor:
        """Logits with the trainable variables replaced by ``w`` (Keras's functional call, inference mode)."""
        out, _ = self.model.stateless_call(self.split(w), self.model.non_trainable_variables, self.x, training=False)
        return out

    def loss_of(self, w: tf.Tensor) -> tf.Tensor:
        return cross_entropy(self.outputs(w), self.y)

    def stats(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.model.non_trainable_variables]


def cross_entropy(z: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z))


@functools.cache
def case(name: str) -> Case:
    """Each model is built once and shared by the tests."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    with float64_layers():
        model = {"lenet": lenet, "resnet": resnet, "transformer": transformer}[name]()
    if name == "transformer":
        x = tf.constant(rng.integers(0, VOCAB, size=(N, SEQ)), dtype=tf.int32)
    else:
        x = tf.constant(rng.standard_normal((N, 8, 8, 1 if name == "lenet" else 2)))
    y = tf.constant(rng.integers(0, 4 if name == "lenet" else 3, size=N))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # Moving statistics far from (0, 1), so that a product using batch statistics would show.
            layer.moving_mean.assign(rng.normal(size=4))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=4))
    assert all(v.dtype == "float64" for v in model.weights)
    return Case(model, x, y)


# ----------------------------------------------------------------------------- oracles (plain TensorFlow)
def rel_err(got: Any, expected: Any) -> float:
    got, expected = np.asarray(got), np.asarray(expected)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def tape_gradient(c: Case, w: tf.Tensor) -> tf.Tensor:
    """The gradient at ``w`` through the model's own variables: values assigned, ``model(x, training=False)``."""
    saved = [tf.identity(v) for v in c.variables]
    try:
        for v, part in zip(c.variables, c.split(w)):
            v.assign(part)
        with tf.GradientTape() as tape:
            loss = cross_entropy(c.model(c.x, training=False), c.y)
        return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, c.variables)], axis=0)
    finally:
        for v, s in zip(c.variables, saved):
            v.assign(s)


def fd_hvp(c: Case, v: tf.Tensor) -> np.ndarray:
    """Central differences of tape gradients: O(eps²) truncation + O(1e-16/eps) round-off, ≈ 1e-9 relative."""
    w = c.w0
    eps = 1e-5 * max(1.0, float(tf.norm(w))) / float(tf.norm(v))
    return ((tape_gradient(c, w + eps * v) - tape_gradient(c, w - eps * v)) / (2 * eps)).numpy()


def tape_hessian(c: Case) -> np.ndarray:
    """Nested tapes: the Jacobian of the gradient of the flat-parameter loss."""
    w = c.w0
    with tf.GradientTape() as outer:
        outer.watch(w)
        with tf.GradientTape() as inner:
            inner.watch(w)
            loss = c.loss_of(w)
        g = inner.gradient(loss, w)
    return outer.jacobian(g, w).numpy()


def ggn_oracle(c: Case) -> np.ndarray:
    """``Σ_i J_iᵀ H_z,i J_i / N`` with ``J`` from the tape and the softmax ``H_z`` in closed form (NumPy)."""
    w = c.w0
    with tf.GradientTape() as tape:
        tape.watch(w)
        z = c.outputs(w)
    J = tape.jacobian(z, w).numpy()  # (N, C, P)
    p = tf.nn.softmax(z, axis=1).numpy()
    Hz = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    return np.einsum("ncp,ncd,ndq->pq", J, Hz, J) / len(p)


# ----------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("name", ["lenet", "resnet", "transformer"])
def test_hessian_matches_tensorflow_autodiff(name: str) -> None:
    c = case(name)
    before = c.stats()
    n = int(c.w0.shape[0])
    H = mh.hessian(c.model, data=(c.x, c.y), loss="cross_entropy")
    assert H.backend.name == "tensorflow" and H.shape == (n, n) and H.dtype == tf.float64
    v = tf.constant(np.random.default_rng(1).standard_normal(n))
    out = H @ c.split(v)  # a list in trainable_variables order in, the same out
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [tuple(p.shape) for p in c.variables]
    got = tf.concat([tf.reshape(o, [-1]) for o in out], axis=0).numpy()
    assert rel_err(got, fd_hvp(c, v)) <= 1e-6  # finite differences: ≈ 1e-9, with room
    # Nested tapes: exact float64 second derivatives in another evaluation order, so round-off only.
    assert n <= 600
    expected = tape_hessian(c)
    assert rel_err(got, expected @ v.numpy()) <= 1e-10
    assert rel_err(H @ v, expected @ v.numpy()) <= 1e-10  # flat in, flat out
    assert rel_err(H.dense(), expected) <= 1e-10
    # Inference-mode BatchNormalization: products read the moving statistics and never write them.
    after = c.stats()
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_ggn_matches_jacobian_oracle(name: str) -> None:
    c = case(name)
    before = c.stats()
    expected = ggn_oracle(c)
    dense = mh.ggn(c.model, data=(c.x, c.y), loss="cross_entropy").dense().numpy()
    assert rel_err(dense, expected) <= 1e-10  # exact in both: round-off only
    # Cross-entropy is convex in the logits, so G is PSD (up to round-off).
    assert np.linalg.eigvalsh(dense).min() >= -1e-12 * np.abs(dense).max()
    after = c.stats()
    assert all(np.array_equal(a, b) for a, b in zip(after, before))


def test_keras_layer_normalization_second_derivative() -> None:
    """Keras's own LayerNormalization, whose tf.nn.moments stops the gradient through the mean, against FD."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    with float64_layers():
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(4), keras.layers.LayerNormalization(), keras.layers.Dense(3)]
        )
    c = Case(model, tf.constant(rng.standard_normal((N, 4))), tf.constant(rng.integers(0, 3, size=N)))
    v = tf.constant(rng.standard_normal(int(c.w0.shape[0])))
    H = mh.hessian(model, data=(c.x, c.y), loss="cross_entropy")
    assert rel_err(H @ v, fd_hvp(c, v)) <= 1e-6  # 0.18 with TensorFlow's own tf.nn.moments
