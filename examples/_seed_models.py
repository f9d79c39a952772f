"""Models and data shared by the seed examples, with one set of NumPy weights for all three frameworks.

The weights live in TensorFlow's layout (convolution kernels ``(kh, kw, c_in, c_out)``,
dense kernels ``(in, out)``, images NHWC); the PyTorch module transposes them and
flattens in NHWC order, and the JAX function uses the same layout, so the three
models compute the same function of the same numbers.
"""

from __future__ import annotations

import numpy as np

LAYERS = ("conv1", "conv2", "dense1", "dense2", "dense3")
"""Parameterized layers of the LeNet-5 variant, in order."""


# ----------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------
def digits(size: int = 8, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (1797 images, 8×8, 10 classes) as NHWC float32 in [0, 1].

    ``size`` > 8 enlarges each pixel to a ``size // 8`` square block (nearest
    neighbour), and ``channels`` repeats the gray image, so ``size=32,
    channels=3`` gives CIFAR-10's shapes from real images.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)  # pixel values 0..16
    if size % 8:
        raise ValueError(f"size must be a multiple of 8, got {size}")
    factor = size // 8
    x = np.kron(x, np.ones((1, factor, factor), dtype=np.float32))
    x = np.repeat(x[..., None], channels, axis=-1)
    return x, data.target.astype(np.int64)


# ----------------------------------------------------------------------
# LeNet-5 variant: conv 6@3×3, pool, conv 16@3×3, pool, dense 120, dense 84, dense 10
# ----------------------------------------------------------------------
def lenet_shapes(image: int = 32, channels: int = 3) -> dict[str, tuple[int, ...]]:
    """Kernel shape of each layer for ``image × image × channels`` inputs (valid 3×3 convolutions, 2×2 pools)."""
    side = ((image - 2) // 2 - 2) // 2
    return {
        "conv1": (3, 3, channels, 6),
        "conv2": (3, 3, 6, 16),
        "dense1": (side * side * 16, 120),
        "dense2": (120, 84),
        "dense3": (84, 10),
    }


def glorot_uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Keras' Glorot-uniform draw: U(±√(6 / (fan_in + fan_out))), receptive field counted in both fans."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def lenet_weights(seed: int, image: int = 32, channels: int = 3, dtype: str = "float32") -> dict:
    """Glorot-uniform kernels and zero biases, as ``{layer: {"kernel", "bias"}}`` NumPy arrays."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in lenet_shapes(image, channels).items():
        out[name] = {
            "kernel": glorot_uniform(rng, shape).astype(dtype),
            "bias": np.zeros(shape[-1], dtype=dtype),
        }
    return out


def lenet_torch(weights: dict, activation: str = "tanh"):
    """The LeNet variant as a ``torch.nn.Module`` holding ``weights`` (NHWC input, NHWC flatten)."""
    import torch

    act = {"tanh": torch.tanh, "relu": torch.relu}[activation]
    dtype = getattr(torch, str(weights["conv1"]["kernel"].dtype))

    class LeNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name in LAYERS:
                kernel = np.asarray(weights[name]["kernel"])
                cout = kernel.shape[-1]
                if name.startswith("conv"):
                    layer = torch.nn.Conv2d(kernel.shape[2], cout, kernel.shape[:2], dtype=dtype)
                    layer.weight.data = torch.tensor(kernel.transpose(3, 2, 0, 1).copy())
                else:
                    layer = torch.nn.Linear(kernel.shape[0], cout, dtype=dtype)
                    layer.weight.data = torch.tensor(kernel.T.copy())
                layer.bias.data = torch.tensor(np.asarray(weights[name]["bias"]).copy())
                setattr(self, name, layer)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 3, 1, 2)  # NHWC → NCHW
            x = torch.nn.functional.avg_pool2d(act(self.conv1(x)), 2)
            x = torch.nn.functional.avg_pool2d(act(self.conv2(x)), 2)
            x = x.permute(0, 2, 3, 1).flatten(1)  # flatten in NHWC order, as Keras does
            x = act(self.dense1(x))
            x = act(self.dense2(x))
            return self.dense3(x)

    return LeNet()


def lenet_keras(weights: dict, activation: str = "tanh"):
    """The LeNet variant as a Keras ``Sequential`` model holding ``weights``."""
    import keras

    kernel = weights["conv1"]["kernel"]
    image = None  # filled below from dense1's fan-in
    side = int(round(np.sqrt(weights["dense1"]["kernel"].shape[0] / 16)))
    image = (side * 2 + 2) * 2 + 2
    dtype = str(kernel.dtype)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((image, image, kernel.shape[2]), dtype=dtype),
            layers.Conv2D(6, 3, activation=activation, name="conv1", dtype=dtype),
            layers.AveragePooling2D(2, dtype=dtype),
            layers.Conv2D(16, 3, activation=activation, name="conv2", dtype=dtype),
            layers.AveragePooling2D(2, dtype=dtype),
            layers.Flatten(dtype=dtype),
            layers.Dense(120, activation=activation, name="dense1", dtype=dtype),
            layers.Dense(84, activation=activation, name="dense2", dtype=dtype),
            layers.Dense(10, name="dense3", dtype=dtype),
        ]
    )
    for name in LAYERS:
        model.get_layer(name).set_weights([weights[name]["kernel"], weights[name]["bias"]])
    return model


def lenet_jax(activation: str = "tanh"):
    """``apply_fn(params, x)`` of the LeNet variant in JAX, for ``params`` shaped like :func:`lenet_weights`."""
    import jax
    import jax.numpy as jnp

    act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[activation]

    def conv(x, layer):
        y = jax.lax.conv_general_dilated(
            x, layer["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + layer["bias"]

    def pool(x):
        n, h, w, c = x.shape
        x = x[:, : h // 2 * 2, : w // 2 * 2]  # floor, as a valid 2×2 pool drops the odd row
        return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

    def apply_fn(params, x):
        x = pool(act(conv(x, params["conv1"])))
        x = pool(act(conv(x, params["conv2"])))
        x = x.reshape(x.shape[0], -1)
        x = act(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
        x = act(x @ params["dense2"]["kernel"] + params["dense2"]["bias"])
        return x @ params["dense3"]["kernel"] + params["dense3"]["bias"]

    return apply_fn


# ----------------------------------------------------------------------
# Loading NumPy weights into a model built once
# ----------------------------------------------------------------------
def load_torch(module, weights: dict) -> None:
    """Copy ``{layer: {"kernel", "bias"} | {"gamma", "beta"}}`` (and ``{"position": {"embedding"}}``) into ``module``.

    Kernels are transposed to PyTorch's layout; ``layer`` is the submodule's
    dotted name.  The copy is in place, so the module is built once and
    re-initialized as often as needed.
    """
    import torch

    with torch.no_grad():
        for layer, values in weights.items():
            if layer == "position":
                module.position.copy_(torch.from_numpy(values["embedding"]))
                continue
            target = module.get_submodule(layer)
            for key, value in values.items():
                if key == "kernel":
                    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
                param = target.bias if key in ("bias", "beta") else target.weight
                param.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def load_keras(model, weights: dict) -> None:
    """Assign the same weights to a Keras model's variables (the layer named ``layer`` with ``_`` for ``.``)."""
    for layer, values in weights.items():
        if layer == "position":
            model.position.assign(values["embedding"])
            continue
        order = ("gamma", "beta") if "gamma" in values else ("kernel", "bias")
        model.get_layer(layer.replace(".", "_")).set_weights([values[k] for k in order])
