"""Benchmark models in PyTorch, JAX and TensorFlow/Keras, with matching shapes.

Four models per framework: an MLP (784-256-10, tanh), LeNet-5, a small
ResNet (BatchNorm in inference mode) and a small transformer encoder
(post-norm, ReLU feed-forward, mean-pooled, a linear head).  The three
frameworks build the same architectures at the same shapes; their weights are
each framework's own random initialisation.

Scales: ``"tiny"`` (``--quick``: a few seconds for all rows), ``"small"``
(the default CPU run) and ``"full"``: LeNet-5 on batch 256, ResNet-18 on CIFAR
shapes (batch 128), a 4-layer transformer of width 512 (batch 128, 64 tokens).

Every builder returns ``name -> Model``; ``Model.head`` names the last
layer's parameters (the block of the dense-Hessian rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NAMES = ("mlp", "lenet5", "resnet", "transformer")


@dataclass(frozen=True)
class Shapes:
    mlp: tuple[int, int, int]  # in, hidden, batch
    lenet_batch: int
    resnet_widths: tuple[int, ...]
    resnet_blocks: int
    resnet_batch: int
    vocab: int
    dim: int
    heads: int
    layers: int
    tokens: int
    seq_batch: int


SCALES = {
    "tiny": Shapes((64, 32, 16), 8, (4, 8), 1, 4, 100, 16, 2, 1, 8, 8),
    "small": Shapes((784, 256, 128), 64, (8, 16), 1, 32, 1000, 32, 4, 4, 16, 32),
    "full": Shapes((784, 256, 128), 256, (64, 128, 256, 512), 2, 128, 1000, 512, 8, 4, 64, 128),
}
CLASSES = 10


@dataclass
class Model:
    model: Any  # nn.Module, Keras model, or JAX apply_fn(params, x)
    x: Any
    y: Any
    head: Any  # torch: parameter names; JAX: the params key; Keras: the last layer
    params: Any = None  # JAX parameters


def _data(shapes: Shapes, name: str, seed: int, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "mlp":
        n, d = shapes.mlp[2], shapes.mlp[0]
        x = rng.standard_normal((n, d))
    elif name == "lenet5":
        n = shapes.lenet_batch
        x = rng.standard_normal((n, 28, 28, 1) if channels_last else (n, 1, 28, 28))
    elif name == "resnet":
        n = shapes.resnet_batch
        x = rng.standard_normal((n, 32, 32, 3) if channels_last else (n, 3, 32, 32))
    else:
        n = shapes.seq_batch
        x = rng.integers(0, shapes.vocab, (n, shapes.tokens))
    return x, rng.integers(0, CLASSES, n)


# ----------------------------------------------------------------------------- PyTorch


def torch_models(scale: str, device: str) -> dict[str, Model]:
    """``name -> Model`` for PyTorch, on ``device``, in float32, in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    s = SCALES[scale]

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.skip = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(h)) + self.skip(x))

    class ResNet(nn.Module):
        def __init__(self, widths: tuple[int, ...], blocks: int) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
            )
            layers, cin = [], widths[0]
            for i, w in enumerate(widths):
                for j in range(blocks):
                    layers.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                    cin = w
            self.layers = nn.Sequential(*layers)
            self.head = nn.Linear(cin, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))

    class Transformer(nn.Module):
        """PyTorch's own encoder layers: default (fused) attention."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(s.vocab, s.dim)
            layer = nn.TransformerEncoderLayer(s.dim, s.heads, 4 * s.dim, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, s.layers, enable_nested_tensor=False)
            self.head = nn.Linear(s.dim, CLASSES)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(tokens)).mean(dim=1))

    d, h, _ = s.mlp
    mlp = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, CLASSES))
    # Standard modules only, so that BackPACK can extend it.
    lenet = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, CLASSES),
    )
    modules = {
        "mlp": (mlp, ["2.weight", "2.bias"]),
        "lenet5": (lenet, ["11.weight", "11.bias"]),
        "resnet": (ResNet(s.resnet_widths, s.resnet_blocks), ["head.weight", "head.bias"]),
        "transformer": (Transformer(), ["head.weight", "head.bias"]),
    }
    out = {}
    for name, (module, head) in modules.items():
        x, y = _data(s, name, 1, channels_last=False)
        xt = torch.as_tensor(x, dtype=torch.long if name == "transformer" else torch.float32)
        out[name] = Model(module.eval().to(device), xt.to(device), torch.as_tensor(y).to(device), head)
    return out


# ----------------------------------------------------------------------------- JAX


def jax_models(scale: str) -> dict[str, Model]:
    """``name -> Model`` for JAX: ``apply_fn(params, x)`` on dict parameters, NHWC images."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    s = SCALES[scale]
    rng = np.random.default_rng(0)

    def dense(fan_in: int, fan_out: int) -> dict:
        bound = 1 / np.sqrt(fan_in)
        return {
            "w": jnp.asarray(rng.uniform(-bound, bound, (fan_in, fan_out)), jnp.float32),
            "b": jnp.asarray(rng.uniform(-bound, bound, fan_out), jnp.float32),
        }

    def conv(k: int, cin: int, cout: int, bias: bool = True) -> dict:
        bound = 1 / np.sqrt(k * k * cin)
        p = {"w": jnp.asarray(rng.uniform(-bound, bound, (k, k, cin, cout)), jnp.float32)}
        if bias:
            p["b"] = jnp.asarray(rng.uniform(-bound, bound, cout), jnp.float32)
        return p

    def norm(c: int) -> dict:
        return {"scale": jnp.ones(c, jnp.float32), "shift": jnp.zeros(c, jnp.float32)}

    def conv_apply(p: dict, x: jax.Array, stride: int = 1, padding: Any = "SAME") -> jax.Array:
        out = lax.conv_general_dilated(x, p["w"], (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out + p["b"] if "b" in p else out

    def bn_apply(p: dict, x: jax.Array) -> jax.Array:
        # Inference mode with running mean 0 and variance 1, as a fresh nn.BatchNorm2d.
        return x * (p["scale"] / jnp.sqrt(1.0 + 1e-5)) + p["shift"]

    def max_pool(x: jax.Array) -> jax.Array:
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def linear(p: dict, x: jax.Array) -> jax.Array:
        return x @ p["w"] + p["b"]

    def layer_norm(p: dict, x: jax.Array) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["shift"]

    out: dict[str, Model] = {}
    d, h, _ = s.mlp

    def mlp_apply(p: dict, x: jax.Array) -> jax.Array:
        return linear(p["head"], jnp.tanh(linear(p["fc1"], x)))

    params = {"fc1": dense(d, h), "head": dense(h, CLASSES)}
    out["mlp"] = _jax_model(s, "mlp", mlp_apply, params)

    def lenet_apply(p: dict, x: jax.Array) -> jax.Array:
        x = max_pool(jax.nn.relu(conv_apply(p["conv1"], x)))
        x = max_pool(jax.nn.relu(conv_apply(p["conv2"], x, padding="VALID")))
        x = x.reshape(x.shape[0], -1)
        return linear(p["head"], jax.nn.relu(linear(p["fc2"], jax.nn.relu(linear(p["fc1"], x)))))

    params = {
        "conv1": conv(5, 1, 6),
        "conv2": conv(5, 6, 16),
        "fc1": dense(400, 120),
        "fc2": dense(120, 84),
        "head": dense(84, CLASSES),
    }
    out["lenet5"] = _jax_model(s, "lenet5", lenet_apply, params)

    blocks, cin = [], s.resnet_widths[0]
    for i, w in enumerate(s.resnet_widths):
        for j in range(s.resnet_blocks):
            stride = 2 if (i > 0 and j == 0) else 1
            b = {"c1": conv(3, cin, w, False), "b1": norm(w), "c2": conv(3, w, w, False), "b2": norm(w)}
            if stride != 1 or cin != w:
                b["skip"], b["bskip"] = conv(1, cin, w, False), norm(w)
            blocks.append((b, stride))
            cin = w
    strides = [st for _, st in blocks]
    params = {
        "stem": conv(3, 3, s.resnet_widths[0], False),
        "bstem": norm(s.resnet_widths[0]),
        "blocks": [b for b, _ in blocks],
        "head": dense(cin, CLASSES),
    }

    def resnet_apply(p: dict, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(bn_apply(p["bstem"], conv_apply(p["stem"], x)))
        for b, stride in zip(p["blocks"], strides):
            hid = jax.nn.relu(bn_apply(b["b1"], conv_apply(b["c1"], x, stride, ((1, 1), (1, 1)))))
            hid = bn_apply(b["b2"], conv_apply(b["c2"], hid))
            skip = bn_apply(b["bskip"], conv_apply(b["skip"], x, stride, "VALID")) if "skip" in b else x
            x = jax.nn.relu(hid + skip)
        return linear(p["head"], x.mean(axis=(1, 2)))

    out["resnet"] = _jax_model(s, "resnet", resnet_apply, params)

    dim, heads = s.dim, s.heads
    layers = [
        {
            "qkv": dense(dim, 3 * dim),
            "out": dense(dim, dim),
            "ln1": norm(dim),
            "ff1": dense(dim, 4 * dim),
            "ff2": dense(4 * dim, dim),
            "ln2": norm(dim),
        }
        for _ in range(s.layers)
    ]
    params = {
        "embed": jnp.asarray(rng.standard_normal((s.vocab, dim)), jnp.float32),
        "layers": layers,
        "head": dense(dim, CLASSES),
    }

    def attention(p: dict, x: jax.Array) -> jax.Array:
        n, t, _ = x.shape
        q, k, v = jnp.split(linear(p["qkv"], x).reshape(n, t, 3 * heads, dim // heads).transpose(0, 2, 1, 3), 3, 1)
        weights = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim // heads), axis=-1)
        return linear(p["out"], (weights @ v).transpose(0, 2, 1, 3).reshape(n, t, dim))

    def transformer_apply(p: dict, tokens: jax.Array) -> jax.Array:
        x = p["embed"][tokens]
        for lp in p["layers"]:
            x = layer_norm(lp["ln1"], x + attention(lp, x))
            x = layer_norm(lp["ln2"], x + linear(lp["ff2"], jax.nn.relu(linear(lp["ff1"], x))))
        return linear(p["head"], x.mean(axis=1))

    out["transformer"] = _jax_model(s, "transformer", transformer_apply, params)
    return out


def _jax_model(s: Shapes, name: str, apply_fn: Any, params: dict) -> Model:
    import jax.numpy as jnp

    x, y = _data(s, name, 1, channels_last=True)
    xj = jnp.asarray(x, jnp.int32 if name == "transformer" else jnp.float32)
    return Model(apply_fn, xj, jnp.asarray(y, jnp.int32), "head", params)


# ----------------------------------------------------------------------------- TensorFlow


def tf_models(scale: str) -> dict[str, Model]:
    """``name -> Model`` for Keras 3 on TensorFlow, channels-last images."""
    import keras
    import tensorflow as tf
    from keras import layers as L

    keras.utils.set_random_seed(0)
    s = SCALES[scale]
    out: dict[str, Model] = {}
    d, h, _ = s.mlp
    models = {
        "mlp": keras.Sequential([keras.Input((d,)), L.Dense(h, activation="tanh"), L.Dense(CLASSES)]),
        "lenet5": keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                L.Conv2D(6, 5, padding="same", activation="relu"),
                L.MaxPool2D(2),
                L.Conv2D(16, 5, activation="relu"),
                L.MaxPool2D(2),
                L.Flatten(),
                L.Dense(120, activation="relu"),
                L.Dense(84, activation="relu"),
                L.Dense(CLASSES),
            ]
        ),
    }

    inp = keras.Input((32, 32, 3))
    x = L.ReLU()(
        L.BatchNormalization(epsilon=1e-5)(L.Conv2D(s.resnet_widths[0], 3, padding="same", use_bias=False)(inp))
    )
    cin = s.resnet_widths[0]
    for i, w in enumerate(s.resnet_widths):
        for j in range(s.resnet_blocks):
            stride = 2 if (i > 0 and j == 0) else 1
            hid = L.Conv2D(w, 3, stride, padding="same", use_bias=False)(x)
            hid = L.ReLU()(L.BatchNormalization(epsilon=1e-5)(hid))
            hid = L.BatchNormalization(epsilon=1e-5)(L.Conv2D(w, 3, padding="same", use_bias=False)(hid))
            skip = x
            if stride != 1 or cin != w:
                skip = L.BatchNormalization(epsilon=1e-5)(L.Conv2D(w, 1, stride, use_bias=False)(x))
            x = L.ReLU()(L.Add()([hid, skip]))
            cin = w
    models["resnet"] = keras.Model(inp, L.Dense(CLASSES)(L.GlobalAveragePooling2D()(x)))

    tokens = keras.Input((s.tokens,), dtype="int32")
    x = L.Embedding(s.vocab, s.dim)(tokens)
    for _ in range(s.layers):
        att = L.MultiHeadAttention(s.heads, s.dim // s.heads)(x, x)
        x = L.LayerNormalization(epsilon=1e-5)(L.Add()([x, att]))
        ff = L.Dense(s.dim)(L.Dense(4 * s.dim, activation="relu")(x))
        x = L.LayerNormalization(epsilon=1e-5)(L.Add()([x, ff]))
    models["transformer"] = keras.Model(tokens, L.Dense(CLASSES)(L.GlobalAveragePooling1D()(x)))

    for name, model in models.items():
        xs, ys = _data(s, name, 1, channels_last=True)
        xt = tf.constant(xs, tf.int32 if name == "transformer" else tf.float32)
        out[name] = Model(model, xt, tf.constant(ys, tf.int32), model.layers[-1])
    return out
