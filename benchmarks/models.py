"""Benchmark models in PyTorch and JAX, with matching shapes.

Sizes are small by default so a CPU run takes a minute or two; ``scale="full"``
gives the shapes quoted in DESIGN.md (ResNet-18 on CIFAR shapes, LeNet-5,
a 4-layer transformer).
"""

from __future__ import annotations

from typing import Any


def torch_models(scale: str, device: str) -> dict[str, tuple[Any, Any, Any]]:
    """``name -> (model, x, y)`` for PyTorch, on ``device``, in float32."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    full = scale == "full"

    class LeNet5(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
            self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))

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
            self.head = nn.Linear(cin, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))

    class Transformer(nn.Module):
        def __init__(self, vocab: int, dim: int, layers: int, classes: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(dim, classes)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(tokens)).mean(dim=1))

    mlp = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
    resnet = ResNet((64, 128, 256, 512), 2) if full else ResNet((8, 16), 1)
    batch = 128 if full else 32
    out = {
        "mlp": (mlp, torch.randn(128, 784), torch.randint(0, 10, (128,))),
        "lenet5": (LeNet5(), torch.randn(256 if full else 64, 1, 28, 28), torch.randint(0, 10, (256 if full else 64,))),
        "resnet": (resnet.eval(), torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))),
        "transformer": (
            Transformer(1000, 128 if full else 32, 4, 10).eval(),
            torch.randint(0, 1000, (batch, 64 if full else 16)),
            torch.randint(0, 10, (batch,)),
        ),
    }
    return {k: (m.to(device), x.to(device), y.to(device)) for k, (m, x, y) in out.items()}


def jax_mlp(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """``(apply_fn, params, x, y)``: the MLP above, in JAX."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.standard_normal((784, 256)) / 28, dtype=jnp.float32),
        "b1": jnp.zeros(256, jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((256, 10)) / 16, dtype=jnp.float32),
        "b2": jnp.zeros(10, jnp.float32),
    }

    def apply_fn(p: dict, x: jax.Array) -> jax.Array:
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    x = jnp.asarray(rng.standard_normal((128, 784)), dtype=jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 128))
    return apply_fn, params, x, y
