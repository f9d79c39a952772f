"""Seed fig. 1: the loss of a trained LeNet-5 variant along two random, filter-normalized directions.

Li, Xu, Taylor, Studer and Goldstein (2018), "Visualizing the Loss Landscape of
Neural Nets": each direction is Gaussian, rescaled filter by filter (a
convolution's output channel, a dense layer's output unit) to the norm of that
filter of the trained weights, with zero on the biases; the loss
``L(w + a·d₁ + b·d₂)`` is evaluated on a grid of ``(a, b)``.  The script also
checks the picture against multihess: the curvature ``dᵀHd`` along each
direction from :func:`multihess.hessian` next to a central second difference
of the loss.

Data: scikit-learn's handwritten digits, 8×8 images enlarged to 32×32×3 (the
seed's CIFAR-10 / LeNet shapes); the loss is the mean cross-entropy on 512 of them.

Run::

    python examples/seed_fig1_landscape.py                 # 31×31 grid, writes landscape_contour.png, _surface.png
    python examples/seed_fig1_landscape.py --quick         # 7×7 grid, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _seed_models as sm  # noqa: E402

import multihess as mh  # noqa: E402


def progress(iterable, **kwargs):
    """tqdm when installed, else the iterable itself."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def trained_lenet(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The tanh LeNet variant (Glorot-uniform init) trained with Adam, lr 1e-3, batch 64."""
    model = sm.lenet_torch(sm.lenet_weights(seed), "tanh")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in progress(range(epochs), desc="training", unit="epoch"):
        for idx in torch.randperm(len(x), generator=order).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def filter_normalized_direction(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A Gaussian direction with each filter scaled to the norm of the same filter of the weights; zero on biases."""
    out = {}
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p)  # Li et al.: biases (and batch-norm parameters) stay put
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        # dimension 0 is the output channel of a convolution and the output unit of a dense layer
        d_norm = d.flatten(1).norm(dim=1).view(-1, *[1] * (p.dim() - 1))
        w_norm = p.detach().flatten(1).norm(dim=1).view(-1, *[1] * (p.dim() - 1))
        out[name] = d / (d_norm + 1e-12) * w_norm
    return out


def loss_surface(model, x, y, d1, d2, coords: np.ndarray) -> np.ndarray:
    """``L(w + a d₁ + b d₂)`` for every ``(a, b)`` in ``coords × coords`` (the weights are restored afterwards)."""
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    values = np.empty((len(coords), len(coords)))
    cells = [(i, j) for i in range(len(coords)) for j in range(len(coords))]
    with torch.no_grad():
        for i, j in progress(cells, desc="grid", unit="point"):
            for n, p in model.named_parameters():
                p.copy_(base[n] + coords[i] * d1[n] + coords[j] * d2[n])
            values[j, i] = torch.nn.functional.cross_entropy(model(x), y).item()
        for n, p in model.named_parameters():
            p.copy_(base[n])
    return values


def curvature_check(model, x, y, d: dict[str, torch.Tensor], h: float = 1e-2) -> tuple[float, float]:
    """``dᵀHd`` by multihess, and the central second difference ``(L(w+hd) − 2L(w) + L(w−hd)) / h²`` in float64."""
    model = copy.deepcopy(model).double()  # float64, so that the difference quotient is not rounding
    d = {n: t.double() for n, t in d.items()}
    x64 = x.double()
    H = mh.hessian(model, data=(x64, y), loss="cross_entropy")
    flat = torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()])
    exact = float(flat @ (H @ flat))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    with torch.no_grad():
        for step in (h, 0.0, -h):
            for n, p in model.named_parameters():
                p.copy_(base[n] + step * d[n])
            losses.append(torch.nn.functional.cross_entropy(model(x64), y).item())
    return exact, (losses[0] - 2 * losses[1] + losses[2]) / h**2


def plots(coords: np.ndarray, values: np.ndarray, out: Path) -> list[Path]:
    """Contour and surface PNGs of the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = np.meshgrid(coords, coords)
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=80)
    levels = np.quantile(values, np.linspace(0, 1, 25))
    contour = ax.contour(a, b, values, levels=np.unique(levels), cmap="viridis", linewidths=0.8)
    fig.colorbar(contour, ax=ax)
    ax.plot(0, 0, "r+")
    ax.set(xlabel="direction 1", ylabel="direction 2", title="loss, filter-normalized directions")
    fig.tight_layout()
    contour_path = out / "landscape_contour.png"
    fig.savefig(contour_path)
    plt.close(fig)

    fig = plt.figure(figsize=(4.6, 3.6), dpi=80)
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(a, b, np.minimum(values, np.quantile(values, 0.95)), cmap="viridis", linewidth=0)
    ax.set(xlabel="direction 1", ylabel="direction 2", zlabel="loss")
    fig.tight_layout()
    surface_path = out / "landscape_surface.png"
    fig.savefig(surface_path)
    plt.close(fig)
    return [contour_path, surface_path]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, default=31, help="points per axis (default 31)")
    parser.add_argument("--span", type=float, default=1.0, help="the grid covers [-span, span]² (default 1)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs before the plot (default 5)")
    parser.add_argument("--out", default="seed_fig1", help="folder for the PNGs (default ./seed_fig1)")
    parser.add_argument("--quick", action="store_true", help="7×7 grid, 1 epoch, 128 images")
    args = parser.parse_args(argv)
    if args.grid < 3 or args.epochs < 0 or args.span <= 0:
        parser.error("--grid must be at least 3, --epochs non-negative, --span positive")
    samples = 512
    if args.quick:
        args.grid, args.epochs, samples = 7, 1, 128
    torch.manual_seed(0)

    images, labels = sm.digits(32, 3)
    x_all, y_all = torch.tensor(images), torch.tensor(labels)
    start = time.perf_counter()
    model = trained_lenet(x_all, y_all, args.epochs)
    x, y = x_all[:samples], y_all[:samples]
    generator = torch.Generator().manual_seed(1)
    d1, d2 = filter_normalized_direction(model, generator), filter_normalized_direction(model, generator)
    coords = np.linspace(-args.span, args.span, args.grid)
    values = loss_surface(model, x, y, d1, d2, coords)
    centre = values[args.grid // 2, args.grid // 2]
    print(
        f"**Loss landscape of the tanh LeNet-5 variant after {args.epochs} epochs (digits 8×8 enlarged to 32×32×3, "
        f"{samples} images); {args.grid}×{args.grid} grid over [-{args.span:g}, {args.span:g}]², "
        f"{time.perf_counter() - start:.0f} s**\n"
    )
    print(f"loss at the trained weights {centre:.4f}; over the grid {values.min():.4f} .. {values.max():.4f}\n")
    print("| direction | dᵀHd (multihess) | central second difference, h = 1e-2 |")
    print("|---|---|---|")
    for name, d in (("1", d1), ("2", d2)):
        exact, fd = curvature_check(model, x, y, d)
        print(f"| {name} | {exact:.5g} | {fd:.5g} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in plots(coords, values, out):
        print("wrote", path)


if __name__ == "__main__":
    main()
