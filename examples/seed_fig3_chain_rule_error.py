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
``--extras`` adds a small ResNet (ReLU) and a small transformer on the 8×8
digits, also in all three frameworks with the same weights (PyTorch's default
initialization drawn with NumPy, :mod:`_seed_models_extra`).

Per initialization and network the work is one gradient and, for the rows
``all`` and each kernel, one Hessian and one GGN product (all rows in one
block): each framework's model is built once and re-weighted, and JAX reuses
its compiled products (multihess compiles a program once and shares it between
operators that trace to it).

Data: scikit-learn's handwritten digits, each 8×8 image enlarged to 32×32 and
repeated over 3 channels so that the LeNet variant has the seed's CIFAR-10
shapes (``--data digits``; the extras take the 8×8 images as they are), or
uniform noise of those shapes with random labels (``--data synthetic``).

Run::

    python examples/seed_fig3_chain_rule_error.py                  # 100 inits, tanh, 3 frameworks
    python examples/seed_fig3_chain_rule_error.py --activation both --extras   # everything on the page
    python examples/seed_fig3_chain_rule_error.py --activation none --extras --frameworks torch
    python examples/seed_fig3_chain_rule_error.py --quick          # 1 init, 16 images; extras without JAX
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _seed_models as sm  # noqa: E402
import _seed_models_extra as sx  # noqa: E402

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


def load_data(kind: str, batch: int, size: int = 32, channels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One batch of ``batch`` images of shape ``size × size × channels``: real digits or uniform noise."""
    rng = np.random.default_rng(seed)
    if kind == "digits":
        x, y = sm.digits(size, channels)
        idx = rng.choice(len(x), batch, replace=False)
        return x[idx], y[idx]
    return rng.uniform(0, 1, (batch, size, size, channels)).astype(np.float32), rng.integers(0, 10, batch)


@dataclass
class Experiment:
    """One network of the figure: its kernels, its NumPy weights per seed, and a builder per framework."""

    name: str
    layers: tuple[str, ...]
    weights: Callable[[int], dict]
    torch: Callable[[], Any]
    keras: Callable[[], Any]
    jax: Callable[[], Any]
    image: tuple[int, int]  # (side, channels) of the input images


def experiment(name: str, keras_layer_norm: bool = False) -> Experiment:
    """``"lenet_tanh"``, ``"lenet_relu"``, ``"resnet"`` or ``"transformer"`` (see :func:`sx.transformer_keras`)."""
    if name.startswith("lenet_"):
        act = name.split("_")[1]
        first = sm.lenet_weights(0)
        return Experiment(
            name,
            sm.LAYERS,
            sm.lenet_weights,
            lambda: sm.lenet_torch(first, act),
            lambda: sm.lenet_keras(first, act),
            lambda: sm.lenet_jax(act),
            (32, 3),
        )
    return Experiment(
        name,
        getattr(sx, f"{name.upper()}_LAYERS"),
        getattr(sx, f"{name}_weights"),
        getattr(sx, f"{name}_torch"),
        (lambda: sx.transformer_keras(keras_layer_norm)) if name == "transformer" else sx.resnet_keras,
        getattr(sx, f"{name}_jax"),
        (8, 1),
    )


class Runner:
    """Per-layer chain-rule errors of one experiment in one framework: the model is built once, re-weighted per init."""

    def __init__(self, framework: str, exp: Experiment, x: np.ndarray, y: np.ndarray) -> None:
        self.framework, self.seconds = framework, 0.0
        if framework == "torch":
            import torch

            self.data = (torch.tensor(x), torch.tensor(y))
            self.model = exp.torch()
            self.groups = {layer: f"{layer}.weight" for layer in exp.layers}
        elif framework == "jax":
            import jax.numpy as jnp

            self.data = (jnp.asarray(x), jnp.asarray(y))
            self.model = exp.jax()
            self.groups = {layer: f"{layer}.kernel" for layer in exp.layers}
        else:
            import tensorflow as tf

            self.data = (tf.constant(x), tf.constant(y))
            self.model = exp.keras()
            self.groups = {layer: f"*{layer.replace('.', '_')}/kernel" for layer in exp.layers}

    def errors(self, weights: dict) -> dict[str, float]:
        """``{"all", layer...: relative error}`` for one initialization."""
        start = time.perf_counter()
        params = None
        if self.framework == "torch":
            sm.load_torch(self.model, weights)
        elif self.framework == "jax":
            import jax
            import jax.numpy as jnp

            params = jax.tree.map(jnp.asarray, weights)
        else:
            sm.load_keras(self.model, weights)
        result = mh.chain_rule_error(self.model, params, data=self.data, loss="cross_entropy", groups=self.groups)
        self.seconds += time.perf_counter() - start
        return {k: r.relative_error for k, r in result.items()}


def run(
    exp: Experiment, args: argparse.Namespace, frameworks: list[str]
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """errors[framework][layer] over the initializations, same weights in every framework; seconds per framework."""
    x, y = load_data(args.data, args.batch, *exp.image)
    runners = {fw: Runner(fw, exp, x, y) for fw in frameworks}
    rows: dict[str, list[dict[str, float]]] = {fw: [] for fw in frameworks}
    for seed in progress(range(args.inits), desc=exp.name, unit="init"):
        weights = exp.weights(seed)
        for fw, runner in runners.items():
            rows[fw].append(runner.errors(weights))
    errors = {fw: {k: np.array([r[k] for r in rs]) for k in rs[0]} for fw, rs in rows.items()}
    return errors, {fw: r.seconds for fw, r in runners.items()}


def table(errors: dict[str, dict[str, np.ndarray]], title: str, with_seed: bool) -> str:
    """Markdown table: per layer, min – max (median) in each framework, the seed's range, the framework spread."""
    fws = list(errors)
    layers = list(errors[fws[0]])
    head = ["layer"] + (["seed (TF, CIFAR-10)"] if with_seed else []) + fws
    if len(fws) > 1:
        head.append("max \\|Δ\\| between frameworks")
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
        path = out / f"fig3_{prefix}_{layer.replace('.', '_')}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


TITLES = {
    "lenet_tanh": "LeNet-5 variant, tanh",
    "lenet_relu": "LeNet-5 variant, relu",
    "resnet": "resnet: stem conv, 2 residual blocks, ReLU",
    "transformer": "transformer: 1 pre-norm encoder layer, attention, GELU MLP",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inits", type=int, default=100, help="re-initializations (default 100, as the seed)")
    parser.add_argument("--batch", type=int, default=64, help="images in the batch (default 64)")
    parser.add_argument(
        "--activation",
        choices=("tanh", "relu", "both", "none"),
        default="tanh",
        help="of the LeNet variant (none: extras only)",
    )
    parser.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of " + ", ".join(FRAMEWORKS)
    )
    parser.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--extras", action="store_true", help="also the small ResNet and transformer")
    parser.add_argument(
        "--keras-layer-norm",
        action="store_true",
        help="transformer in Keras with keras.layers.LayerNormalization instead of layer norms written with keras.ops",
    )
    parser.add_argument(
        "--out", default="seed_fig3", help="folder for the PNGs and the errors as JSON (default ./seed_fig3)"
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only (no PNGs, no JSON of the errors)")
    parser.add_argument(
        "--quick", action="store_true", help="1 init, 16 images, every part (the extras without JAX): a smoke run"
    )
    args = parser.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for fw in args.frameworks:
        if fw not in FRAMEWORKS:
            parser.error(f"--frameworks: unknown {fw!r}; choose from {', '.join(FRAMEWORKS)}")
    if args.inits < 1:
        parser.error("--inits must be at least 1")
    extra_frameworks = args.frameworks
    if args.quick:
        args.inits, args.batch, args.extras = 1, 16, True
        # XLA compiles the extras' products for longer than everything else of the quick run takes.
        extra_frameworks = [fw for fw in args.frameworks if fw != "jax"] or args.frameworks
    out = Path(args.out)
    if not args.no_plots:
        out.mkdir(parents=True, exist_ok=True)

    names = {"tanh": ["lenet_tanh"], "relu": ["lenet_relu"], "both": ["lenet_tanh", "lenet_relu"], "none": []}
    names = names[args.activation] + (["resnet", "transformer"] if args.extras else [])
    for name in names:
        exp = experiment(name, args.keras_layer_norm)
        start = time.perf_counter()
        errors, seconds = run(exp, args, args.frameworks if name.startswith("lenet") else extra_frameworks)
        side, channels = exp.image
        if args.data == "digits":
            data = "digits 8×8" + (f" enlarged to {side}×{side}×{channels}" if side > 8 else "")
        else:
            data = f"uniform noise {side}×{side}×{channels}, random labels"
        per_fw = ", ".join(f"{fw} {s:.0f} s" for fw, s in seconds.items())
        title = (
            f"{TITLES[name]}, {args.inits} inits, batch {args.batch} ({data}); "
            f"{time.perf_counter() - start:.0f} s ({per_fw})"
        )
        if name == "transformer" and args.keras_layer_norm and "tensorflow" in errors:
            title += "; Keras with keras.layers.LayerNormalization"
        print(table(errors, title, with_seed=name == "lenet_tanh"))
        print(agreement(errors), "\n")
        if not args.no_plots:
            for path in histograms(errors, out, name):
                print("wrote", path)
            record = {
                "title": title,
                "seconds": seconds,
                "errors": {fw: {k: v.tolist() for k, v in e.items()} for fw, e in errors.items()},
            }
            (out / f"fig3_{name}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
