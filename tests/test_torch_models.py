"""Real PyTorch models: products checked against finite differences of plain autograd gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import multihess as mh

torch.set_num_threads(1)


def flat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[torch.Tensor, callable]:
    """The oracle's own view of the loss as a function of a flat parameter vector (no multihess code)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        params = {n: part.view(p.shape) for (n, p), part in zip(named, parts)}
        return loss_fn(torch.func.functional_call(model, params, (x,)), y)

    return w0, loss_of


def fd_hvp(loss_of, w0: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """Central differences of autograd gradients, in float64."""
    eps = 1e-5 * max(1.0, w0.norm().item()) / v.norm().item()

    def grad_at(w):
        w = w.detach().requires_grad_(True)
        return torch.autograd.grad(loss_of(w), w)[0]

    return ((grad_at(w0 + eps * v) - grad_at(w0 - eps * v)) / (2 * eps)).numpy()


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = nn.functional.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.softplus(self.bn(self.stem(x)))
        h = h + self.block(h)
        return self.head(h.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Token classifier on the default attention path (``scaled_dot_product_attention``)."""

    def __init__(self, vocab: int = 7, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def _case(name: str):
    torch.manual_seed(0)
    if name == "lenet":
        model, x, y = LeNet(), torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    elif name == "resnet":
        model, x, y = TinyResNet().eval(), torch.randn(3, 2, 5, 5), torch.randint(0, 3, (3,))
    else:
        model, x, y = TinyTransformer().eval(), torch.randint(0, 7, (3, 5)), torch.randint(0, 3, (3,))
    return model.double(), x.double() if x.is_floating_point() else x, y


@pytest.mark.parametrize("name", ["lenet", "resnet", "transformer"])
def test_hvp_matches_finite_differences(name: str) -> None:
    model, x, y = _case(name)
    w0, loss_of = flat_loss(model, x, y, nn.functional.cross_entropy)
    v = torch.from_numpy(np.random.default_rng(1).standard_normal(w0.numel()))
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    expected = fd_hvp(loss_of, w0, v)
    got = (H @ v).numpy()
    assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected)
    # A second product on the same batch reuses the kept graph and stays exact.
    assert np.allclose((H @ (2 * v)).numpy(), 2 * got, rtol=1e-12, atol=1e-14)


def check_products_with_several_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
    """Six calls with three rows, against finite differences: the timed trials of every pass, then the choice."""
    w0, loss_of = flat_loss(model, x, y, nn.functional.cross_entropy)
    V = torch.from_numpy(np.random.default_rng(seed).standard_normal((3, w0.numel())))
    expected = np.stack([fd_hvp(loss_of, w0, v) for v in V])
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    for _ in range(6):
        got = H.apply_rows(V).numpy()
        assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected)


@pytest.mark.parametrize("name", ["lenet", "transformer"])
def test_products_with_several_rows_agree_whichever_pass_is_timed(name: str) -> None:
    # The first calls with several rows run the vmapped, the looped and the torch.func passes in turn (and
    # time them); every call, before and after the choice, gives the finite-difference products.
    check_products_with_several_rows(*_case(name), seed=2)


class CountingCalls(nn.Module):
    """A linear model that counts its calls in a buffer, in place: ``torch.func``'s transforms refuse that."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return torch.tanh(self.linear(x))


def test_a_model_torch_func_refuses_still_gets_products_with_several_rows() -> None:
    # The torch.func pass fails on this model; it drops out of the timing and the others give the products.
    torch.manual_seed(0)
    model, x, y = CountingCalls().double(), torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    check_products_with_several_rows(model, x, y, seed=3)


def test_default_attention_breaks_plain_double_backward() -> None:
    """The reason for the math-attention fallback: fused attention has no second derivative."""
    model, x, y = _case("transformer")
    w0, loss_of = flat_loss(model, x, y, nn.functional.cross_entropy)
    w = w0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of(w), w, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g, w, torch.ones_like(w))


def test_transformer_ggn_is_psd_and_matches_jacobian_oracle() -> None:
    model, x, y = _case("transformer")
    G = mh.ggn(model, data=(x, y), loss="cross_entropy", params="head.*")
    # Oracle: J from autograd row by row, H_z closed form in NumPy.
    w0, _ = flat_loss(model, x, y, nn.functional.cross_entropy)
    named = [(n, p) for n, p in model.named_parameters()]
    head = [i for i, (n, _) in enumerate(named) if n.startswith("head.")]
    sizes = [p.numel() for _, p in named]
    start = sum(sizes[: head[0]])
    stop = start + sum(sizes[i] for i in head)

    def outputs(w_head: torch.Tensor) -> torch.Tensor:
        w = torch.cat([w0[:start], w_head, w0[stop:]])
        parts = torch.split(w, sizes)
        return torch.func.functional_call(model, {n: q.view(p.shape) for (n, p), q in zip(named, parts)}, (x,))

    J = torch.autograd.functional.jacobian(outputs, w0[start:stop]).numpy()  # (N, C, P)
    z = outputs(w0[start:stop]).detach().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = sum(J[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ J[i] for i in range(len(z))) / len(z)
    dense = G.dense().numpy()
    assert np.allclose(dense, expected, rtol=1e-10, atol=1e-12)
    assert np.linalg.eigvalsh(dense).min() >= -1e-12


def test_float32_model_keeps_dtype_and_is_close() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    v = torch.randn(H.shape[0])
    out = H @ v
    assert out.dtype == torch.float32 and H.dtype == torch.float32
    w0, loss_of = flat_loss(model.double(), x.double(), y, nn.functional.cross_entropy)
    expected = fd_hvp(loss_of, w0, v.double())
    assert np.linalg.norm(out.numpy() - expected) <= 1e-4 * np.linalg.norm(expected)


def test_several_batches_equal_one_big_batch_mean() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    w0, loss_of = flat_loss(model, x, y, nn.functional.mse_loss)
    v = torch.from_numpy(np.random.default_rng(2).standard_normal(w0.numel()))
    expected = fd_hvp(loss_of, w0, v)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # unequal sizes: weights 0.4 and 0.6
    for make in (mh.hessian, mh.ggn):
        op = make(model, data=batches, loss="mse")
        whole = make(model, data=(x, y), loss="mse")
        assert np.allclose((op @ v).numpy(), (whole @ v).numpy(), rtol=1e-12, atol=1e-14)
    assert np.linalg.norm(
        (mh.hessian(model, data=batches, loss="mse") @ v).numpy() - expected
    ) <= 1e-6 * np.linalg.norm(expected)


def test_training_mode_batchnorm_leaves_running_stats_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().train()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    before = model[1].running_mean.clone()
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    H @ torch.ones(H.shape[0], dtype=torch.float64)
    assert torch.equal(model[1].running_mean, before)
    # Training-mode BatchNorm normalizes with batch statistics: the oracle does too.
    w0, loss_of = flat_loss(model, x, y, nn.functional.cross_entropy)
    v = torch.from_numpy(np.random.default_rng(3).standard_normal(w0.numel()))
    assert np.linalg.norm((H @ v).numpy() - fd_hvp(loss_of, w0, v)) <= 1e-6 * np.linalg.norm(fd_hvp(loss_of, w0, v))
