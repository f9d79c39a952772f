"""Exact and Monte Carlo GGN diagonals of real PyTorch models against per-sample Jacobians from plain autograd.

The PyTorch backend takes a recorded route for parameters read once by a
recognized op (matrix products, added biases, convolutions, inference-mode
batch norms, layer norms) and the generic per-sample route for everything
else; these models mix both, and the oracles know neither: the oldest tests
build ``J_nᵀ S_n`` from per-sample Jacobians and the analytic square root of
the loss's Hessian, the newer ones ``diag(Jᵀ H J)`` from the Jacobian of the
whole batch (``torch.func.jacrev``) and the Hessian of the PyTorch loss
itself (``torch.autograd.functional.hessian``), which assumes neither the
samples' independence nor any square root.

Tolerances: in float64 the two sides differ by rounding in sums of at most a
few thousand terms (≲ 1e-13 relative); ``rtol=1e-10`` leaves room for that
and still fails on any wrong formula, which is off by O(1).  ``atol`` is set
relative to the largest entry for entries that vanish (dead ReLUs, unused
parameters).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import multihess as mh
from multihess.backends import torch_per_sample
from multihess.backends.torch_backend import TorchBackend


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


def flat_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The model's parameters as one flat vector, and its outputs on ``x`` as a function of that vector."""
    named = list(model.named_parameters())
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def outputs(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        params = {n: t.view(p.shape) for (n, p), t in zip(named, parts)}
        return torch.func.functional_call(model, {**params, **buffers}, (x,))

    return w0, outputs


def test_batch_statistics_fall_back_to_whole_batch_products() -> None:
    # In training mode BatchNorm mixes the samples: G = Jᵀ H_z J with J the Jacobian of the whole batch.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    w0, outputs = flat_outputs(model, x)

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


# ----------------------------------------------------------------------
# Convolutions, batch and layer norms, and layouts whose rows are not samples
# ----------------------------------------------------------------------
def whole_batch_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> np.ndarray:
    """``diag(Jᵀ H J)``, ``J`` the Jacobian of the whole batch's outputs, ``H`` the torch loss's Hessian in them."""
    w0, outputs = flat_outputs(model, x)

    z = outputs(w0).detach()
    J = torch.func.jacrev(outputs)(w0).reshape(z.numel(), -1)
    lossf = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    H = torch.autograd.functional.hessian(lambda q: lossf(q, y), z).reshape(z.numel(), z.numel())
    return torch.einsum("ip,ij,jp->p", J, H, J).numpy()


class ConvNet(nn.Module):
    """One convolution (any dimension and settings), tanh, and a linear head on the flattened map."""

    def __init__(self, conv: nn.Module, size: tuple[int, ...], classes: int = 3) -> None:
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            flat = conv(torch.zeros((1, conv.in_channels) + size)).numel()
        self.head = nn.Linear(flat, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


CONVS = {
    "2d": lambda: nn.Conv2d(4, 6, 3),
    "2d_stride_pad_nobias": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
    "2d_dilation_groups": lambda: nn.Conv2d(4, 6, (3, 2), padding=2, dilation=(2, 1), groups=2),
    "2d_same_even_kernel": lambda: nn.Conv2d(4, 6, (2, 3), padding="same", dilation=(1, 2)),
    "2d_valid": lambda: nn.Conv2d(4, 2, 2, padding="valid", bias=False),
    "2d_reflect_stride": lambda: nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1, padding_mode="reflect", groups=2),
    "2d_depthwise": lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4),
    "1d": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=3, dilation=2, groups=2),
    "1d_nobias": lambda: nn.Conv1d(4, 5, 4, bias=False),
    "3d": lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1),
}
SIZES = {"1": (11,), "2": (7, 6), "3": (4, 4, 3)}


class ResidualNet(nn.Module):
    """A ResNet-style block in inference mode: conv-BN-ReLU twice, a strided 1×1 skip with BN, pooling, BN1d, head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(4)
        self.skip = nn.Sequential(nn.Conv2d(3, 4, 1, stride=2, bias=False), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 5)
        self.b3 = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h)) + self.skip(x))
        return self.head(torch.tanh(self.b3(self.fc(h.mean((2, 3))))))


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


class Layouts(nn.Module):
    """Linear layers, a layer norm, a right product and an added bias on sequences, with the samples in every place.

    Positions after the samples ``(N, T, D)``; samples after the positions
    ``(T, N, D)`` (attention's internal layout; with ``T == N`` the shape
    alone cannot tell which axis holds the samples); and both flattened to
    rows ``(N·T, D)`` and ``(T·N, D)``, where a row is not a sample.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.rows = nn.Linear(4, 4)
        self.cols = nn.Linear(4, 4)
        self.B = nn.Parameter(torch.randn(4, 4) / 2)
        self.b = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T = x.shape[:2]
        h = torch.tanh(self.norm(self.inp(x)))  # (N, T, 4)
        h = torch.tanh(self.mix(h.transpose(0, 1))).transpose(0, 1)  # (T, N, 4) inside
        h = torch.tanh(self.rows(h.reshape(N * T, 4))).reshape(N, T, 4)  # sample-major rows
        h = torch.tanh(self.cols(h.transpose(0, 1).reshape(T * N, 4))).reshape(T, N, 4).transpose(0, 1)
        h = torch.tanh(h @ self.B + self.b)
        return self.head(h.mean(1))


def _model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """A float64 model in inference mode with its inputs, targets and loss."""
    torch.manual_seed(0)
    loss = "cross_entropy"
    if name.startswith("conv"):
        conv = CONVS[name[len("conv") :]]()
        size = SIZES[name[len("conv")]]
        model, (x, y) = ConvNet(conv, size), _data((5, conv.in_channels) + size, 3)
    elif name == "residual_bn_eval":
        model, (x, y) = ResidualNet(), _data((6, 3, 6, 6), 3)
        with torch.no_grad():  # running statistics and affine parameters away from their initial 0, 1
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    elif name == "lenet":
        model, (x, y) = lenet(), _data((4, 1, 12, 12), 3)
    elif name == "layouts":
        model, (x, y) = Layouts(), _data((5, 5, 3), 3)  # T == N
    elif name == "layouts_mse":
        loss = "mse"
        model, (x, _) = Layouts(), _data((4, 6, 3), 3)
        y = torch.randn(4, 3, dtype=torch.float64)
    elif name == "tied_conv":
        model, (x, y) = TiedConv(), _data((5, 2, 9), 3)
    elif name in ("embedding", "embedding_seq_first"):
        model = Embedded(seq_first=name == "embedding_seq_first")
        # Rows repeat within and across samples; token 0 is the padding row, which gets no gradient.
        x = torch.tensor([[1, 2, 1, 0, 3], [4, 4, 4, 0, 0], [6, 1, 2, 5, 5], [0, 3, 2, 6, 1]])
        y = torch.tensor([0, 2, 1, 1])
    else:
        raise ValueError(name)
    return model.double().eval(), x, y, loss


class Embedded(nn.Module):
    """An embedding table with a padding row, a linear layer on the sequence, mean pooling and a head.

    With ``seq_first`` the lookup takes the tokens transposed, ``(T, N)``: the
    samples are the second axis of the lookup's output.
    """

    def __init__(self, seq_first: bool = False) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.seq_first:
            h = self.embed(tokens.T).transpose(0, 1)
        else:
            h = self.embed(tokens)
        return self.head(torch.tanh(self.mix(h)).mean(1))


class TiedConv(nn.Module):
    """One convolution applied twice (its kernel and bias are each read twice) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


@pytest.fixture
def generic_entries(monkeypatch) -> list[int]:
    """The number of entries each call of the generic per-sample route is asked for, through the backend's hook."""
    calls: list[int] = []
    original = torch_per_sample.per_sample_squares

    def spied(f, per_cotangent, generic):
        def counting(g, pc):
            inner = generic(g, pc)

            def squares(w, x, cotangents, budget):
                calls.append(int(w.numel()))
                return inner(w, x, cotangents, budget)

            return squares

        return original(f, per_cotangent, counting)

    monkeypatch.setattr(torch_per_sample, "per_sample_squares", spied)
    return calls


STRUCTURED = [f"conv{name}" for name in CONVS] + [
    "residual_bn_eval",
    "lenet",
    "layouts",
    "layouts_mse",
    "embedding",
    "embedding_seq_first",
]


@pytest.mark.parametrize("name", STRUCTURED)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_structured_models_match_the_whole_batch_oracle_without_the_generic_route(name: str, generic_entries) -> None:
    model, x, y, loss = _model(name)
    expected = whole_batch_diagonal(model, x, y, loss)
    got = exact_diagonal(model, x, y, loss)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.max())
    # Every parameter is read once by a recognized op: none goes through per-sample passes of the network.
    assert generic_entries == []


def test_a_convolution_read_twice_takes_the_generic_route(generic_entries) -> None:
    model, x, y, loss = _model("tied_conv")
    expected = whole_batch_diagonal(model, x, y, loss)
    got = exact_diagonal(model, x, y, loss)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.max())
    conv = sum(p.numel() for p in model.conv.parameters())
    assert generic_entries == [conv]  # the tied kernel and bias, and nothing of the head


@pytest.mark.parametrize("name", ["tied_conv", "layouts", "lenet"])
def test_batches_of_one_structure_reuse_the_guards_verdicts(name: str, generic_entries, monkeypatch) -> None:
    """Two batches of one shape, streamed: the guards run on the first only, and both sums stay exact.

    ``tied_conv`` keeps entries on the generic route, ``layouts`` outputs
    whose samples are not on axis 0: what is reused must carry both.
    """
    model, x, y, loss = _model(name)
    x2 = x + 0.5 * torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    expected = whole_batch_diagonal(model, torch.cat([x, x2]), torch.cat([y, y]), loss)
    guards = []
    original = torch_per_sample._layouts
    monkeypatch.setattr(torch_per_sample, "_layouts", lambda *a: guards.append(1) or original(*a))
    G = mh.ggn(model, data=[(x, y), (x2, y)], loss=loss)
    for _ in range(2):
        got = mh.diagonal(G, method="exact").value.numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.max())
    assert len(guards) == 1
    assert len(generic_entries) == (4 if name == "tied_conv" else 0)  # the tied entries, every batch, every call


class WithSpare(nn.Module):
    """An MLP with a parameter its forward pass never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.spare = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_entries_no_op_reads_are_judged_on_every_batch(monkeypatch) -> None:
    """An entry the recording never sees read might be read where it cannot look: nothing about it is kept."""
    torch.manual_seed(0)
    model = WithSpare().double()
    x, y = _data((6, 4), 3)
    x2 = x + 0.5
    expected = whole_batch_diagonal(model, torch.cat([x, x2]), torch.cat([y, y]), "cross_entropy")
    guards = []
    original = torch_per_sample._layouts
    monkeypatch.setattr(torch_per_sample, "_layouts", lambda *a: guards.append(1) or original(*a))
    G = mh.ggn(model, data=[(x, y), (x2, y)], loss="cross_entropy")
    for _ in range(2):
        got = mh.diagonal(G, method="exact").value.numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.max())
    assert len(guards) == 4  # two batches, two calls


@pytest.mark.parametrize("name", ["conv2d_dilation_groups", "conv3d", "residual_bn_eval", "layouts"])
@pytest.mark.parametrize("per_cotangent", [False, True])
def test_squares_of_random_cotangents_in_small_chunks(name: str, per_cotangent: bool, generic_entries) -> None:
    """``Σ_n (J_nᵀ u_nk)²`` for arbitrary cotangents, per cotangent or summed, with a budget of a few products."""
    model, x, _, _ = _model(name)
    named = [(n, p) for n, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def f(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for _, p in named])
        params = {n: t.view(p.shape) for (n, p), t in zip(named, parts)}
        return torch.func.functional_call(model, {**params, **buffers}, (xs,))

    z = f(w0, x).detach()
    U = torch.randn((4,) + tuple(z.shape), dtype=torch.float64)
    J = torch.func.jacrev(lambda w: f(w, x))(w0)  # (N, C, P): sample n's rows are its Jacobian
    expected = torch.einsum("knc,ncp->knp", U, J).square().sum(1)
    expected = expected if per_cotangent else expected.sum(0)
    squares = TorchBackend().per_sample_squares(f, per_cotangent)
    # 4 kB: a few per-sample products at a time, so every chunk loop runs more than once.
    got = squares(w0, x, lambda _: U, 4096)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12 * float(expected.max()))
    assert generic_entries == []


class StridedRead(nn.Module):
    """A layer that uses every other column of its weight (a view with gaps) and an ordinary head."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(5, 8) / 2)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(F.linear(x, self.W[:, ::2])))


def test_a_view_with_gaps_takes_the_generic_route_for_exactly_its_entries(generic_entries) -> None:
    torch.manual_seed(0)
    model = StridedRead().double()
    x, y = _data((6, 4), 3)
    expected = whole_batch_diagonal(model, x, y, "cross_entropy")
    got = exact_diagonal(model, x, y, "cross_entropy")
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.max())
    assert np.all(got[1:8:2] == 0)  # the columns never read
    assert generic_entries == [20]  # the 5 × 4 entries read; the head takes the recorded route


class Encoder(nn.Module):
    """PyTorch's own encoder layer (attention read inside one fused function call), mean-pooled, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's fallback for fused attention
def test_transformer_layer_takes_the_recorded_route_inside_attention(generic_entries) -> None:
    torch.manual_seed(0)
    # Training mode with dropout 0 computes the eval function without the fused inference kernel,
    # which the whole-batch oracle's Jacobian cannot differentiate.
    model = Encoder().double().train()
    x, y = _data((4, 3, 4), 3)
    expected = whole_batch_diagonal(model, x, y, "cross_entropy")
    got = exact_diagonal(model, x, y, "cross_entropy")
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.max())
    # The attention's projections are read inside F.multi_head_attention_forward, whose inside the recording
    # sees: with the feed-forward layers, the layer norms and the head, every entry takes the recorded route.
    assert generic_entries == []


class CrossAttention(nn.Module):
    """Attention from one sequence to another, with padded keys masked out, then a head on the pooled output."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, memory = x[:, :2], x[:, 2:]
        mask = torch.zeros(memory.shape[:2], dtype=torch.bool)
        mask[:, -1] = True  # the last key of every sample is padding
        out, _ = self.attn(query, memory, memory, key_padding_mask=mask, need_weights=False)
        return self.head(torch.tanh(out).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_cross_attention_with_a_key_mask_takes_the_recorded_route(generic_entries) -> None:
    torch.manual_seed(0)
    model = CrossAttention().double().train()  # dropout 0: the eval function, without the fused inference kernel
    x, y = _data((4, 5, 4), 3)
    expected = whole_batch_diagonal(model, x, y, "cross_entropy")
    got = exact_diagonal(model, x, y, "cross_entropy")
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.max())
    # The packed projection is cut into the query's and the keys' and values' blocks, each read by one linear map.
    assert generic_entries == []
