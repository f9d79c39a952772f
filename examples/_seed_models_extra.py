"""A small ResNet and a small transformer for the 8×8×1 digits, one set of NumPy weights for all three frameworks.

As in :mod:`_seed_models`, the weights are in TensorFlow's layout
(convolution kernels ``(kh, kw, c_in, c_out)``, dense kernels ``(in, out)``,
images NHWC) and keyed by layer: ``{layer: {"kernel", "bias"}}``, layer norms
``{"gamma", "beta"}``, the learned positions ``{"embedding"}``.  They are
drawn from PyTorch's default initialization (kernels and biases from
``U(±1/√fan_in)``, layer norms at 1 and 0, positions ``0.02·N(0, 1)``) with a
NumPy generator, so an initialization is one seed in every framework.  The
PyTorch modules transpose the kernels; the Keras models and the JAX functions
use them as they are; :func:`_seed_models.load_torch` and
:func:`_seed_models.load_keras` copy them into a model built once.
"""

from __future__ import annotations

import numpy as np

RESNET_LAYERS = ("stem", "block1.conv_a", "block1.conv_b", "block2.conv_a", "block2.conv_b", "head")
"""Kernels of the small ResNet, in order (a Keras layer's name has ``_`` for ``.``)."""

TRANSFORMER_LAYERS = ("embed", "query", "key", "value", "attn_out", "mlp1", "mlp2", "head")
"""Weight matrices of the small transformer, in order."""

WIDTH = 8  # channels of the ResNet
D_MODEL = 16  # width of the transformer
TOKENS = 8  # one token per image row


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """PyTorch's default draw for ``nn.Linear`` / ``nn.Conv2d`` weights and biases: ``U(±1/√fan_in)``."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape)


def _dense(rng: np.random.Generator, n_in: int, n_out: int, dtype: str) -> dict:
    return {
        "kernel": _uniform(rng, (n_in, n_out), n_in).astype(dtype),
        "bias": _uniform(rng, (n_out,), n_in).astype(dtype),
    }


def _conv(rng: np.random.Generator, c_in: int, c_out: int, dtype: str) -> dict:
    fan_in = 9 * c_in
    return {
        "kernel": _uniform(rng, (3, 3, c_in, c_out), fan_in).astype(dtype),
        "bias": _uniform(rng, (c_out,), fan_in).astype(dtype),
    }


# ----------------------------------------------------------------------
# Small ResNet: stem conv 8@3×3, two residual blocks (conv–ReLU–conv + skip, ReLU), average pool, dense 10
# ----------------------------------------------------------------------
def resnet_weights(seed: int, dtype: str = "float32") -> dict:
    """``{layer: {"kernel", "bias"}}`` for the layers of :data:`RESNET_LAYERS`."""
    rng = np.random.default_rng(seed)
    out = {"stem": _conv(rng, 1, WIDTH, dtype)}
    for name in RESNET_LAYERS[1:-1]:
        out[name] = _conv(rng, WIDTH, WIDTH, dtype)
    out["head"] = _dense(rng, WIDTH, 10, dtype)
    return out


def resnet_torch():
    """The small ResNet as a ``torch.nn.Module`` (NHWC input)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_a = torch.nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
            self.conv_b = torch.nn.Conv2d(WIDTH, WIDTH, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.conv_b(torch.relu(self.conv_a(x))))

    class ResNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(1, WIDTH, 3, padding=1)
            self.block1, self.block2 = Block(), Block()
            self.head = torch.nn.Linear(WIDTH, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.stem(x.permute(0, 3, 1, 2)))
            x = self.block2(self.block1(x))
            return self.head(x.mean(dim=(2, 3)))

    return ResNet()


def resnet_keras():
    """The small ResNet as a functional Keras model."""
    import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 1))
    h = layers.Conv2D(WIDTH, 3, padding="same", activation="relu", name="stem")(inputs)
    for block in ("block1", "block2"):
        a = layers.Conv2D(WIDTH, 3, padding="same", activation="relu", name=f"{block}_conv_a")(h)
        b = layers.Conv2D(WIDTH, 3, padding="same", name=f"{block}_conv_b")(a)
        h = layers.ReLU()(layers.Add()([h, b]))
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(10, name="head")(h), name="resnet")


def resnet_jax():
    """``apply_fn(params, x)`` of the small ResNet in JAX, for ``params`` shaped like :func:`resnet_weights`."""
    import jax

    def conv(x, layer):
        y = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + layer["bias"]

    def apply_fn(params, x):
        h = jax.nn.relu(conv(x, params["stem"]))
        for block in ("block1", "block2"):
            a = jax.nn.relu(conv(h, params[f"{block}.conv_a"]))
            h = jax.nn.relu(h + conv(a, params[f"{block}.conv_b"]))
        h = h.mean(axis=(1, 2))
        return h @ params["head"]["kernel"] + params["head"]["bias"]

    return apply_fn


# ----------------------------------------------------------------------
# Small transformer: each image row a token; embedding + positions, one pre-norm encoder layer
# (single-head softmax attention, GELU MLP 16-32-16), mean over tokens, dense 10
# ----------------------------------------------------------------------
def transformer_weights(seed: int, dtype: str = "float32") -> dict:
    """Dense layers of :data:`TRANSFORMER_LAYERS`, ``"position"`` and the layer norms ``"norm1"``, ``"norm2"``."""
    rng = np.random.default_rng(seed)
    d = D_MODEL
    out = {"embed": _dense(rng, 8, d, dtype)}
    out["position"] = {"embedding": (0.02 * rng.standard_normal((TOKENS, d))).astype(dtype)}
    for name in ("norm1", "norm2"):
        out[name] = {"gamma": np.ones(d, dtype=dtype), "beta": np.zeros(d, dtype=dtype)}
    for name in ("query", "key", "value", "attn_out"):
        out[name] = _dense(rng, d, d, dtype)
    out["mlp1"], out["mlp2"] = _dense(rng, d, 2 * d, dtype), _dense(rng, 2 * d, d, dtype)
    out["head"] = _dense(rng, d, 10, dtype)
    return out


def transformer_torch():
    """The small transformer as a ``torch.nn.Module`` (NHWC input, exact GELU, layer-norm ε = 1e-5)."""
    import torch

    d = D_MODEL

    class Transformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(8, d)
            self.position = torch.nn.Parameter(torch.zeros(TOKENS, d))
            self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.query, self.key, self.value = (torch.nn.Linear(d, d) for _ in range(3))
            self.attn_out = torch.nn.Linear(d, d)
            self.mlp1, self.mlp2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
            self.head = torch.nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x[..., 0]) + self.position  # (batch, 8 rows, d)
            a = self.norm1(h)
            scores = self.query(a) @ self.key(a).transpose(1, 2) / d**0.5
            h = h + self.attn_out(torch.softmax(scores, dim=-1) @ self.value(a))
            h = h + self.mlp2(torch.nn.functional.gelu(self.mlp1(self.norm2(h))))
            return self.head(h.mean(dim=1))

    return Transformer()


def transformer_keras(keras_layer_norm: bool = False):
    """The small transformer as a subclassed Keras model (exact GELU, layer-norm ε = 1e-5, as PyTorch's).

    The layer norms compute ``(x − mean) / √(mean((x − mean)²) + ε) · γ + β``
    with ``keras.ops``.  ``keras_layer_norm=True`` uses
    ``keras.layers.LayerNormalization`` instead, which on TensorFlow takes the
    variance from ``tf.nn.moments``: that stops the gradient through the mean
    inside the variance, which leaves first derivatives unchanged but not
    second ones; multihess's TensorFlow products differentiate it through the
    mean, so both models give the same Hessian.
    """
    import keras
    from keras import ops

    d = D_MODEL
    layers = keras.layers

    class LayerNorm(layers.Layer):
        def build(self, input_shape):
            self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gamma")
            self.beta = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="beta")

        def call(self, x):
            centered = x - ops.mean(x, axis=-1, keepdims=True)
            variance = ops.mean(ops.square(centered), axis=-1, keepdims=True)
            return centered * ops.rsqrt(variance + 1e-5) * self.gamma + self.beta

    def norm(name: str):
        return layers.LayerNormalization(epsilon=1e-5, name=name) if keras_layer_norm else LayerNorm(name=name)

    class Transformer(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="transformer")
            self.embed = layers.Dense(d, name="embed")
            self.norm1, self.norm2 = norm("norm1"), norm("norm2")
            self.query, self.key = layers.Dense(d, name="query"), layers.Dense(d, name="key")
            self.value, self.attn_out = layers.Dense(d, name="value"), layers.Dense(d, name="attn_out")
            self.mlp1, self.mlp2 = layers.Dense(2 * d, name="mlp1"), layers.Dense(d, name="mlp2")
            self.head = layers.Dense(10, name="head")
            self.position = self.add_weight(shape=(TOKENS, d), initializer="zeros", name="position")

        def call(self, x, training=None):  # multihess evaluates Keras models with training=False
            h = self.embed(x[..., 0]) + self.position
            a = self.norm1(h)
            scores = ops.matmul(self.query(a), ops.transpose(self.key(a), (0, 2, 1))) / d**0.5
            h = h + self.attn_out(ops.matmul(ops.softmax(scores, axis=-1), self.value(a)))
            h = h + self.mlp2(ops.gelu(self.mlp1(self.norm2(h)), approximate=False))
            return self.head(ops.mean(h, axis=1))

    model = Transformer()
    model(np.zeros((1, 8, 8, 1), dtype="float32"))  # build the variables
    return model


def transformer_jax():
    """``apply_fn(params, x)`` of the small transformer in JAX (``params`` as from :func:`transformer_weights`)."""
    import jax
    import jax.numpy as jnp

    def dense(x, layer):
        return x @ layer["kernel"] + layer["bias"]

    def norm(x, layer):
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * layer["gamma"] + layer["beta"]

    def apply_fn(params, x):
        h = dense(x[..., 0], params["embed"]) + params["position"]["embedding"]
        a = norm(h, params["norm1"])
        scores = dense(a, params["query"]) @ jnp.swapaxes(dense(a, params["key"]), 1, 2) / D_MODEL**0.5
        h = h + dense(jax.nn.softmax(scores, axis=-1) @ dense(a, params["value"]), params["attn_out"])
        h = h + dense(jax.nn.gelu(dense(norm(h, params["norm2"]), params["mlp1"]), approximate=False), params["mlp2"])
        return dense(h.mean(axis=1), params["head"])

    return apply_fn
