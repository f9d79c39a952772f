"""Seed fig. 3: how far the approximate chain rule is from the Hessian, per layer, at initialization.

Protocol of the seed: a LeNet-5 variant (conv 6@3×3, average pool, conv 16@3×3,
average pool, dense 120, dense 84, dense 10), re-initialized many times
(Glorot-uniform kernels, zero biases); on one batch of 64 images the error of
layer ``l`` is ``|g_lᵀ G g_l − g_lᵀ H g_l| / ‖g_l‖²`` with ``g_l`` the gradient
restricted to that layer's kernel (:func:`multihess.chain_rule_error`).

The same NumPy weights go into a Keras model (as the seed used), a PyTorch module
and a JAX function, and the script reports how closely the three frameworks agree
on every initialization.  ``--activation relu`` repeats it with ReLU, where every
single layer's block is exact and only the cross-layer terms (``all``) differ;
``--extras`` adds a small ResNet and a small transformer (PyTorch).

Data: scikit-learn's handwritten digits, each 8×8 image enlarged to 32×32 and
repeated over 3 channels so that the network has the seed's CIFAR-10 shapes
(``--data digits``), or uniform noise of that shape with random labels
(``--data synthetic``).

Run::

    python examples/seed_fig3_chain_rule_error.py                  # 100 inits, tanh, 3 frameworks
    python examples/seed_fig3_chain_rule_error.py --activation relu --extras
    python examples/seed_fig3_chain_rule_error.py --quick          # 1 init, 16 images: about 20 s
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _seed_models as sm  # noqa: E402

import multihess as mh  # noqa: E402

FRAMEWORKS = ("tensorflow", "torch", "jax")
SEED_RANGES = {  # the seed's notebook (TensorFlow, CIFAR-10, tanh), read off fig. 3
    "conv1": "0 – 0.35",
    "conv2": "0 – 0.28",
    "dense1": "0 – 0.06",
    "dense2": "0 – 0.015",
    "dense3": "≈ 1e-8 (exact)",
    "all": "—",
}


def progress(iterable, **kwargs):
    """tqdm when installed, else the iterable itself."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def load_data(kind: str, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One batch of ``batch`` images of CIFAR-10's shape (32×32×3), real digits or noise."""
    rng = np.random.default_rng(seed)
    if kind == "digits":
        x, y = sm.digits(32, 3)
        idx = rng.choice(len(x), batch, replace=False)
        return x[idx], y[idx]
    return rng.uniform(0, 1, (batch, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, batch)


class LeNetRunner:
    """Per-layer chain-rule errors of the LeNet variant in one framework, for NumPy weights."""

    def __init__(self, framework: str, activation: str, x: np.ndarray, y: np.ndarray) -> None:
        self.framework, self.activation = framework, activation
        if framework == "torch":
            import torch

            self.data = (torch.tensor(x), torch.tensor(y))
            self.groups = {layer: f"{layer}.weight" for layer in sm.LAYERS}
        elif framework == "jax":
            import jax.numpy as jnp

            self.data = (jnp.asarray(x), jnp.asarray(y))
            self.groups = {layer: f"{layer}*kernel" for layer in sm.LAYERS}
            self.apply_fn = sm.lenet_jax(activation)
        else:
            import tensorflow as tf

            self.data = (tf.constant(x), tf.constant(y))
            self.groups = {layer: f"*{layer}*kernel" for layer in sm.LAYERS}

    def errors(self, weights: dict) -> dict[str, float]:
        """``{"all", layer...: relative error}`` for one initialization."""
        if self.framework == "torch":
            model, params = sm.lenet_torch(weights, self.activation), None
        elif self.framework == "jax":
            import jax
            import jax.numpy as jnp

            model, params = self.apply_fn, jax.tree.map(jnp.asarray, weights)
        else:
            model, params = sm.lenet_keras(weights, self.activation), None
        result = mh.chain_rule_error(model, params, data=self.data, loss="cross_entropy", groups=self.groups)
        return {k: r.relative_error for k, r in result.items()}


def run_lenet(args: argparse.Namespace, activation: str) -> dict[str, dict[str, np.ndarray]]:
    """errors[framework][layer] over the initializations, same weights in every framework."""
    x, y = load_data(args.data, args.batch)
    runners = {fw: LeNetRunner(fw, activation, x, y) for fw in args.frameworks}
    rows: dict[str, list[dict[str, float]]] = {fw: [] for fw in args.frameworks}
    for seed in progress(range(args.inits), desc=f"LeNet {activation}", unit="init"):
        weights = sm.lenet_weights(seed)
        for fw, runner in runners.items():
            rows[fw].append(runner.errors(weights))
    return {fw: {k: np.array([r[k] for r in rs]) for k in rs[0]} for fw, rs in rows.items()}


def lenet_table(errors: dict[str, dict[str, np.ndarray]], title: str, with_seed: bool) -> str:
    """Markdown table: per layer, min – max (median) in each framework, the seed's range, the framework spread."""
    fws = list(errors)
    layers = list(errors[fws[0]])
    head = ["layer"] + (["seed (TF, CIFAR-10)"] if with_seed else []) + fws
    if len(fws) > 1:
        head.append("max |Δ| between frameworks")
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in layers:
        cells = [layer] + ([SEED_RANGES[layer]] if with_seed else [])
        for fw in fws:
            e = errors[fw][layer]
            cells.append(f"{e.min():.3g} – {e.max():.3g} ({np.median(e):.3g})")
        if len(fws) > 1:
            stack = np.stack([errors[fw][layer] for fw in fws])
            cells.append(f"{np.max(stack.max(0) - stack.min(0)):.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement(errors: dict[str, dict[str, np.ndarray]]) -> str:
    """Largest relative difference between frameworks, over inits, for the layers whose error is not rounding."""
    fws = list(errors)
    if len(fws) < 2:
        return ""
    worst = 0.0
    for layer in errors[fws[0]]:
        stack = np.stack([errors[fw][layer] for fw in fws])
        big = stack.min(0) > 1e-4  # the exact layers' errors are float32 rounding, compared absolutely above
        if big.any():
            worst = max(worst, float(np.max((stack.max(0) - stack.min(0))[big] / stack.min(0)[big])))
    return f"Per initialization, {', '.join(fws)} agree to a relative {worst:.1e} on every error above 1e-4."


def histograms(errors: dict[str, dict[str, np.ndarray]], out: Path, prefix: str) -> list[Path]:
    """One histogram PNG per layer, the frameworks overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fws = list(errors)
    for layer in errors[fws[0]]:
        fig, ax = plt.subplots(figsize=(4, 2.6), dpi=80)
        values = np.concatenate([errors[fw][layer] for fw in fws])
        bins = np.linspace(values.min(), values.max() + 1e-30, 20)
        for fw in fws:
            ax.hist(errors[fw][layer], bins=bins, histtype="step", label=fw, linewidth=1.5)
        ax.set_title(f"{prefix}: {layer}", fontsize=9)
        ax.set_xlabel("|gᵀGg − gᵀHg| / ‖g‖²", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"fig3_{prefix}_{layer}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------
# Extras: a small ResNet and a small transformer (PyTorch, digits 8×8)
# ----------------------------------------------------------------------
def small_resnet():
    """Stem conv, two residual blocks (conv–ReLU–conv + skip), average pool, dense: every layer piecewise linear."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv_a = torch.nn.Conv2d(c, c, 3, padding=1)
            self.conv_b = torch.nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.conv_b(torch.relu(self.conv_a(x))))

    class ResNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.block1, self.block2 = Block(8), Block(8)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x.permute(0, 3, 1, 2)))
            x = self.block2(self.block1(x))
            return self.head(x.mean(dim=(2, 3)))

    return ResNet()


def small_transformer():
    """Each image row a token: embedding, one pre-norm encoder layer (single-head attention, GELU MLP), mean, dense."""
    import torch

    class Transformer(torch.nn.Module):
        def __init__(self, d: int = 16) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(8, d)
            self.position = torch.nn.Parameter(0.02 * torch.randn(8, d))
            self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.query, self.key, self.value = (torch.nn.Linear(d, d) for _ in range(3))
            self.attn_out = torch.nn.Linear(d, d)
            self.mlp1, self.mlp2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
            self.head = torch.nn.Linear(d, 10)

        def forward(self, x):
            h = self.embed(x[..., 0]) + self.position  # (batch, 8 rows, d)
            a = self.norm1(h)
            scores = self.query(a) @ self.key(a).transpose(1, 2) / a.shape[-1] ** 0.5
            h = h + self.attn_out(torch.softmax(scores, dim=-1) @ self.value(a))
            h = h + self.mlp2(torch.nn.functional.gelu(self.mlp1(self.norm2(h))))
            return self.head(h.mean(dim=1))

    return Transformer()


EXTRA_LAYERS = {
    "resnet": ("stem", "block1.conv_a", "block1.conv_b", "block2.conv_a", "block2.conv_b", "head"),
    "transformer": ("embed", "query", "key", "value", "attn_out", "mlp1", "mlp2", "head"),
}


def run_extra(name: str, inits: int, batch: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-layer (weight matrices/kernels) errors of a PyTorch ResNet or transformer over ``inits`` default inits."""
    import torch

    x, y = sm.digits(8, 1)
    idx = np.random.default_rng(0).choice(len(x), batch, replace=False)
    data = (torch.tensor(x[idx]), torch.tensor(y[idx]))
    build = {"resnet": small_resnet, "transformer": small_transformer}[name]
    groups = {layer: f"{layer}.weight" for layer in EXTRA_LAYERS[name]}
    rows = []
    for seed in progress(range(inits), desc=name, unit="init"):
        torch.manual_seed(seed)
        result = mh.chain_rule_error(build(), data=data, loss="cross_entropy", groups=groups)
        rows.append({k: r.relative_error for k, r in result.items()})
    return {"torch": {k: np.array([r[k] for r in rows]) for k in rows[0]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inits", type=int, default=100, help="re-initializations (default 100, as the seed)")
    parser.add_argument("--batch", type=int, default=64, help="images in the batch (default 64)")
    parser.add_argument("--activation", choices=("tanh", "relu", "both"), default="tanh")
    parser.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of " + ", ".join(FRAMEWORKS)
    )
    parser.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--extras", action="store_true", help="also a small ResNet and transformer (PyTorch)")
    parser.add_argument("--out", default="seed_fig3", help="folder for the PNGs (default ./seed_fig3)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--quick", action="store_true", help="1 init, 16 images: a smoke run of every part")
    args = parser.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for fw in args.frameworks:
        if fw not in FRAMEWORKS:
            parser.error(f"--frameworks: unknown {fw!r}; choose from {', '.join(FRAMEWORKS)}")
    if args.inits < 1:
        parser.error("--inits must be at least 1")
    if args.quick:
        args.inits, args.batch, args.extras = 1, 16, True
    out = Path(args.out)
    if not args.no_plots:
        out.mkdir(parents=True, exist_ok=True)

    activations = ("tanh", "relu") if args.activation == "both" else (args.activation,)
    data_note = "digits 8×8 enlarged to 32×32×3" if args.data == "digits" else "uniform noise 32×32×3, random labels"
    for activation in activations:
        start = time.perf_counter()
        errors = run_lenet(args, activation)
        title = (
            f"LeNet-5 variant, {activation}, {args.inits} inits, batch {args.batch} ({data_note}); "
            f"{time.perf_counter() - start:.0f} s"
        )
        print(lenet_table(errors, title, with_seed=activation == "tanh"))
        print(agreement(errors), "\n")
        if not args.no_plots:
            for path in histograms(errors, out, f"lenet_{activation}"):
                print("wrote", path)
    if args.extras:
        for name in ("resnet", "transformer"):
            start = time.perf_counter()
            errors = run_extra(name, min(args.inits, 20), args.batch)
            title = f"{name} (PyTorch, default init, {min(args.inits, 20)} inits, batch {args.batch} of digits 8×8)"
            print(lenet_table(errors, f"{title}; {time.perf_counter() - start:.0f} s", with_seed=False), "\n")


if __name__ == "__main__":
    main()
