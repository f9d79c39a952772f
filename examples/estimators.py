"""Traces, diagonals, top eigenvalues and a spectral density of a small PyTorch network.

Each estimate is printed next to the value read off the dense float64 matrix,
so the script also shows how close the estimators get.  Run:
``python examples/estimators.py``.
"""

from __future__ import annotations

import numpy as np
import torch

import multihess as mh

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4)).double()
x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 4, (64,))

H = mh.hessian(model, data=(x, y), loss="cross_entropy")
G = mh.ggn(model, data=(x, y), loss="cross_entropy")
H_dense, G_dense = H.dense().numpy(), G.dense().numpy()

print(f"{H.shape[0]} parameters; tr H = {np.trace(H_dense):.5f}, tr G = {np.trace(G_dense):.5f}")
for method in ("hutchinson", "hutch++", "xtrace"):
    estimate = mh.trace(H, num_probes=30, method=method, seed=0)
    print(f"  trace of H, {method:<10}: {estimate.value:.5f} ± {estimate.std_error:.5f}")
print(f"  trace of G, exact     : {mh.trace(G, method='exact').value:.5f}")

diag = mh.diagonal(G, method="exact").value.numpy()
print(f"exact GGN diagonal: max |error| {np.max(np.abs(diag - np.diag(G_dense))):.1e}")

top = mh.eigvalsh(H, k=3)
print(f"top-3 eigenvalues of H: {np.round(top, 5)} (dense: {np.round(np.linalg.eigvalsh(H_dense)[::-1][:3], 5)})")

density = mh.spectral_density(H, num_probes=5, num_steps=30, seed=0)
mean = np.sum(density.grid * density.density) * (density.grid[1] - density.grid[0])
print(f"spectral density: mean eigenvalue {mean:.5f} (dense: {np.trace(H_dense) / H.shape[0]:.5f})")

for name, block in mh.summary(G, method="exact").items():
    print(f"  layer {name}: trace {block.trace.value:.5f}, top eigenvalue {block.top_eigenvalue:.5f}")
