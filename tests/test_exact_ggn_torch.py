"""Exact and Monte Carlo GGN diagonals of real PyTorch models against per-sample Jacobians from plain autograd.

The PyTorch backend takes a recorded route for parameters read once by a
matrix product with one row per sample and the generic per-sample route for
everything else; these models mix both, and the oracle knows neither.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import multihess as mh
from multihess.backends import torch_per_sample


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models run faster on one thread; restored so other test files keep their setting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def oracle_roots(model: nn.Module, x: torch.Tensor, loss: str) -> tuple[np.ndarray, np.ndarray]:
    """``J_nᵀ S_n`` per sample, ``(N, K, P)``, and the class probabilities, from autograd Jacobians (float64)."""
    named = [(n, p) for n, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        return torch.func.functional_call(model, {n: t.view(p.shape) for (n, p), t in zip(named, parts)}, (xs,))

    z = outputs(w0, x).detach()
    N = z.shape[0]
    rows, probs = [], []
    for n in range(N):
        J = torch.autograd.functional.jacobian(lambda w, n=n: outputs(w, x[n : n + 1])[0], w0)
        J = J.reshape(-1, w0.numel()).numpy()
        zn = z[n].numpy()
        if loss == "cross_entropy":  # logits (C,) or (C, T): class axis first
            logits = zn.reshape(zn.shape[0], -1)
            p = np.exp(logits - logits.max(0))
            p /= p.sum(0)
            C, T = logits.shape
            S = np.zeros((C * T, C * T))  # block diagonal over positions: √p_c (e_c − p)
            for t in range(T):
                block = (np.diag(np.sqrt(p[:, t])) - np.outer(p[:, t], np.sqrt(p[:, t]))) / np.sqrt(N * T)
                S[np.ix_(np.arange(C) * T + t, np.arange(C) * T + t)] = block
            probs.append(p[:, 0])
        else:
            S = np.sqrt(2.0 / z.numel()) * np.eye(J.shape[0])
        rows.append(S.T @ J)
    return np.stack(rows), np.stack(probs) if probs else np.empty(0)


def exact_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> np.ndarray:
    G = mh.ggn(model, data=(x, y), loss=loss)
    return mh.diagonal(G, method="exact").value.numpy()


class TiedConvNorm(nn.Module):
    """A linear layer applied twice (tied), a convolution, a layer norm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.conv = nn.Conv1d(1, 2, 3)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4 + 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        c = self.conv(x[:, None, :]).flatten(1)
        return self.head(torch.cat([self.norm(h), c], 1))


class TokenTagger(nn.Module):
    """Per-token logits ``(N, C, T)``: linear layers on 3-D inputs and cross-entropy over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(x))).transpose(1, 2)


def _data(shape: tuple[int, ...], classes: int, label_shape: tuple[int, ...] | None = None):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64)
    return x, torch.randint(0, classes, label_shape or shape[:1])


@pytest.mark.parametrize("name", ["mlp", "tied_conv_norm", "token_tagger", "mse_mlp"])
def test_exact_diagonal_of_real_models(name: str) -> None:
    torch.manual_seed(0)
    loss = "cross_entropy"
    if name == "mlp":
        model, (x, y) = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), _data((7, 4), 3)
    elif name == "tied_conv_norm":
        model, (x, y) = TiedConvNorm(), _data((6, 4), 3)
    elif name == "token_tagger":
        model, (x, y) = TokenTagger(), _data((5, 4, 2), 3, (5, 4))
    else:
        loss = "mse"
        model = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 2))
        x = torch.randn(6, 3, dtype=torch.float64)
        y = torch.randn(6, 2, dtype=torch.float64)
    model = model.double()
    roots, _ = oracle_roots(model, x, loss)
    expected = np.einsum("nkp,nkp->p", roots, roots)
    np.testing.assert_allclose(exact_diagonal(model, x, y, loss), expected, rtol=1e-10, atol=1e-14 * expected.max())


def test_batch_statistics_fall_back_to_whole_batch_products() -> None:
    # In training mode BatchNorm mixes the samples: G = Jᵀ H_z J with J the Jacobian of the whole batch.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    named = [(n, p) for n, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def outputs(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        params = {n: t.view(p.shape) for (n, p), t in zip(named, parts)}
        return torch.func.functional_call(model, {**params, **buffers}, (x,))

    J = torch.autograd.functional.jacobian(outputs, w0).reshape(-1, w0.numel()).numpy()
    expected = np.einsum("ip,ip->p", J, J) * 2.0 / J.shape[0]  # H_z = 2/(N C) I
    np.testing.assert_allclose(exact_diagonal(model, x, y, "mse"), expected, rtol=1e-10, atol=1e-12 * expected.max())


class _Blind(torch_per_sample._Recorder):
    """A recorder that misses reads: every unrecognized one, and every recognized one after the first of a view."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs)
        self.others.clear()
        seen, kept = set(), []
        for use in self.uses:
            key = (use.alias.storage_offset(), tuple(use.alias.shape))
            if key not in seen:
                seen.add(key)
                kept.append(use)
        self.uses[:] = kept
        return out


def test_reads_the_recording_misses_are_caught(monkeypatch) -> None:
    """Entries read where the recording cannot see take the generic route: the result stays exact."""
    torch.manual_seed(0)
    model = TiedConvNorm().double()
    x, y = _data((6, 4), 3)
    roots, _ = oracle_roots(model, x, "cross_entropy")
    expected = np.einsum("nkp,nkp->p", roots, roots)
    monkeypatch.setattr(torch_per_sample, "_Recorder", _Blind)
    np.testing.assert_allclose(exact_diagonal(model, x, y, "cross_entropy"), expected, rtol=1e-10)


def test_monte_carlo_diagonal_of_a_real_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = _data((8, 4), 3)
    roots, probs = oracle_roots(model, x, "cross_entropy")
    expected = np.einsum("nkp,nkp->p", roots, roots)
    # One sampled label contributes (J_nᵀ S_n[:, ŷ])² / p_ŷ: mean Σ_c A², fourth moment Σ_c A⁴ / p_c.
    second = np.einsum("nkp,nkp->np", roots, roots)
    variance = np.sum(np.einsum("nkp,nk->np", roots**4, 1.0 / probs) - second**2, axis=0)
    k = 300
    G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    est = mh.diagonal(G, method="mc", num_samples=k, seed=3)
    sigma = np.sqrt(variance / k)
    assert np.all(np.abs(est.value.numpy() - expected) <= 5 * sigma + 1e-12)
    big = sigma > 1e-3 * sigma.max()
    ratio = est.std_error.numpy()[big] / sigma[big]
    assert np.all((ratio > 0.5) & (ratio < 2))


def test_float32_model_matches_the_float64_oracle() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    got = exact_diagonal(model, x, y, "cross_entropy")
    model64 = model.double()
    roots, _ = oracle_roots(model64, x.double(), "cross_entropy")
    expected = np.einsum("nkp,nkp->p", roots, roots)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.max())
