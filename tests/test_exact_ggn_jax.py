"""Exact GGN diagonals of JAX models against per-sample Jacobians and the loss's Hessian, in float64.

The JAX backend reads the model's jaxpr: parameters read once by a matrix
product (of one row per sample or of a sequence of rows), a convolution
without feature groups, an embedding lookup or an added bias take a
structured route, everything else (a grouped convolution, a tied weight) the
generic per-sample route restricted to those entries.  The oracle knows
neither: ``diag(G) = Σ_n diag(J_nᵀ H_n J_n)`` with ``J_n`` from
``jax.jacrev`` of the model on sample ``n`` alone and ``H_n`` the block of
``jax.hessian`` of the loss in the outputs, all in float64.  It uses no
square root of ``H`` and no per-sample VJP.

Tolerances: in float64 both sides differ by rounding in sums of a few
hundred terms (≲ 1e-14 relative); ``rtol=1e-10`` leaves room for that and
still fails on any wrong formula, which is off by O(1).  ``atol`` is set
relative to the largest entry, for entries that vanish (dead ReLUs, an unused
parameter).  Lower precisions are explained at their tests.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # before any array exists: the oracles run in float64

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import multihess as mh  # noqa: E402
from multihess._per_sample import generic_squares  # noqa: E402
from multihess.backends import jax_per_sample  # noqa: E402
from multihess.backends.jax_backend import JaxBackend  # noqa: E402

Apply = Callable[[Any, Any], jax.Array]


# ----------------------------------------------------------------------------- the oracle
def _loss_fn(loss: str, y: jax.Array) -> Callable[[jax.Array], jax.Array]:
    if loss == "cross_entropy":  # mean over samples, integer labels
        return lambda z: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))
    return lambda z: jnp.mean((z - y) ** 2)  # mse: mean over every element


def _jacobians(apply: Apply, params: Any, x: jax.Array) -> tuple[np.ndarray, Callable]:
    """Per-sample Jacobians ``(N, C, P)`` of the model on each sample alone, in float64 and ravel_pytree order."""
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    w, unravel = ravel_pytree(params64)
    x64 = jnp.asarray(x, jnp.float64)
    rows = [jax.jacrev(lambda v, n=n: apply(unravel(v), x64[n : n + 1])[0])(w) for n in range(x.shape[0])]
    return np.stack([np.asarray(r).reshape(-1, w.size) for r in rows]), unravel


def oracle_diagonal(apply: Apply, params: Any, x: jax.Array, y: jax.Array, loss: str) -> np.ndarray:
    """``Σ_n diag(J_nᵀ H_n J_n)`` in float64 from ``jax.jacrev`` and ``jax.hessian`` of the loss in the outputs."""
    J, unravel = _jacobians(apply, params, x)
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    z = apply(params64, jnp.asarray(x, jnp.float64))
    N = z.shape[0]
    H = np.asarray(jax.hessian(_loss_fn(loss, y if loss == "cross_entropy" else jnp.asarray(y, jnp.float64)))(z))
    H = H.reshape(N, -1, N, H.shape[-1] if z.ndim == 2 else -1)
    return sum(np.einsum("cp,cd,dp->p", J[n], H[n, :, n, :], J[n]) for n in range(N))


def exact_diagonal(apply: Apply, params: Any, x: jax.Array, y: jax.Array, loss: str) -> np.ndarray:
    G = mh.ggn(apply, params, data=(x, y), loss=loss)
    return np.asarray(mh.diagonal(G, method="exact").value, dtype=np.float64)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, atol_rel: float) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol_rel * np.abs(expected).max())


# ----------------------------------------------------------------------------- models
def _init(shapes: dict[str, tuple[int, ...]], dtype: Any = jnp.float64, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0] if len(s) > 1 else 2.0), dtype) for k, s in shapes.items()
    }


def mlp(act: Callable[[jax.Array], jax.Array], bias: bool, widths: tuple[int, ...]) -> tuple[Apply, dict]:
    """A dense network ``x @ W + b`` with ``len(widths) - 1`` layers."""
    layers = len(widths) - 1
    shapes = {f"W{i}": (widths[i], widths[i + 1]) for i in range(layers)}
    if bias:
        shapes |= {f"b{i}": (widths[i + 1],) for i in range(layers)}

    def apply(p: dict, x: jax.Array) -> jax.Array:
        for i in range(layers):
            x = x @ p[f"W{i}"] + p[f"b{i}"] if bias else x @ p[f"W{i}"]
            if i < layers - 1:
                x = act(x)
        return x

    return apply, shapes


def mixed() -> tuple[Apply, dict]:
    """A convolution, a kernel on a sequence, a tied weight, an unused leaf, and dense layers with biases.

    Inputs ``(N, 8)``: a 1-D signal for the convolution, ``(4, 2)`` tokens for
    the sequence kernel, and the first 4 features for the tied weight.
    """
    shapes = {
        "conv_w": (3, 1, 2),  # width, in, out (WIO)
        "conv_b": (2,),
        "seq_w": (2, 3),
        "seq_b": (3,),
        "tied": (4, 4),
        "unused": (2,),
        "head_w": (6 * 2 + 3 + 4, 3),
        "head_b": (3,),
    }

    def apply(p: dict, x: jax.Array) -> jax.Array:
        n = x.shape[0]
        conv = lax.conv_general_dilated(
            x[:, :, None], p["conv_w"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
        )
        conv = jnp.tanh(conv + p["conv_b"]).reshape(n, -1)  # bias on a (N, 6, 2) output: summed over positions
        seq = jnp.tanh(x.reshape(n, 4, 2) @ p["seq_w"] + p["seq_b"]).mean(axis=1)  # 3-D activation
        tied = jnp.tanh(jnp.tanh(x[:, :4] @ p["tied"]) @ p["tied"])
        return jnp.concatenate([conv, seq, tied], axis=1) @ p["head_w"] + p["head_b"]

    return apply, shapes


def sequence() -> tuple[Apply, dict]:
    """Dense kernels on sequences: kernel right and left of the ``dot_general``, with and without bias.

    Inputs ``(N, 12)`` as 4 tokens of 3 features.  ``W1`` (``tokens @ W1 +
    b1``); ``W2`` the left operand of a ``dot_general`` whose output puts the
    tokens last; ``W3`` contracting two axes of the activation, out of
    order (its axis 0 with the activation's last); ``tied`` read by two
    sequence products (the generic route); a mean over the rows and a head.
    """
    shapes = {
        "W1": (3, 4),
        "b1": (4,),
        "W2": (5, 4),
        "W3": (2, 5, 3),
        "tied": (3, 3),
        "head": (3, 2),
        "head_b": (2,),
    }

    def apply(p: dict, x: jax.Array) -> jax.Array:
        n = x.shape[0]
        h = jnp.tanh(x.reshape(n, 4, 3) @ p["W1"] + p["b1"])  # (n, 4, 4)
        h = lax.dot_general(p["W2"], h, (((1,), (2,)), ((), ())))  # (5, n, 4), no bias
        h = jnp.tanh(h).reshape(5, n, 2, 2).transpose(1, 0, 2, 3)  # (n, 5, 2, 2)
        h = jnp.tanh(lax.dot_general(h, p["W3"], (((3, 1), (0, 1)), ((), ()))))  # (n, 2, 3)
        h = jnp.tanh(jnp.tanh(h @ p["tied"]) @ p["tied"])
        return h.mean(axis=1) @ p["head"] + p["head_b"]

    return apply, shapes


def embedding() -> tuple[Apply, dict]:
    """Embedding tables looked up at tokens made from the inputs ``(N, 5)`` (five tokens per sample).

    ``E`` at tokens in range (some repeated within a sample), ``F`` with
    ``mode="fill"`` at tokens partly past its end (those lookups read 0 and
    are dropped), ``C`` with ``mode="clip"`` (clamped), a bias over the
    tokens, and ``tied`` both looked up and used as the output projection.
    """
    shapes = {"E": (4, 3), "F": (5, 3), "C": (3, 3), "b": (3,), "tied": (4, 3)}

    def apply(p: dict, x: jax.Array) -> jax.Array:
        tokens = (jnp.abs(x) * 3).astype(jnp.int32)  # 0, 1, 2, ...: past 3 for |x| ≥ 4/3
        h = p["E"][tokens % 4] + jnp.take(p["F"], tokens, axis=0, mode="fill", fill_value=0.0)
        h = jnp.tanh(h + p["C"].at[tokens].get(mode="clip") + p["tied"][tokens % 4] + p["b"])
        return h.mean(axis=1) @ p["tied"].T

    return apply, shapes


def convolutions() -> tuple[Apply, dict]:
    """Convolutions in several layouts, read as dense products of windows, and grouped ones.

    Inputs ``(N, 72)`` as ``6 × 6`` images of 2 channels.  ``k1`` (HWIO, stride
    ``(2, 1)``, uneven padding, a dilated kernel) with a bias; ``k2`` in
    NCHW / OIHW; ``k3`` transposed (``lhs_dilation``); ``g`` depthwise with
    two outputs per channel (three feature groups); ``wide`` with 40 groups
    of one channel; a dense head.
    """
    shapes = {"k1": (3, 3, 2, 4), "b1": (4,), "k2": (3, 4, 2, 2), "k3": (2, 2, 3, 3), "g": (2, 2, 1, 6)}
    groups = 40
    shapes |= {"wide": (1, 1, 1, groups), "head": (48 + groups, 3)}

    def apply(p: dict, x: jax.Array) -> jax.Array:
        n = x.shape[0]
        nhwc = ("NHWC", "HWIO", "NHWC")
        h = lax.conv_general_dilated(
            x.reshape(n, 6, 6, 2), p["k1"], (2, 1), ((1, 0), (2, 1)), rhs_dilation=(1, 2), dimension_numbers=nhwc
        )
        h = jnp.tanh(h + p["b1"]).transpose(0, 3, 1, 2)  # (n, 4, 3, 5)
        h = jnp.tanh(lax.conv_general_dilated(h, p["k2"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")))
        h = h.transpose(0, 2, 3, 1)  # (n, 2, 4, 3)
        h = lax.conv_general_dilated(h, p["k3"], (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2), dimension_numbers=nhwc)
        h = jnp.tanh(h)
        h = lax.conv_general_dilated(h, p["g"], (2, 2), "VALID", dimension_numbers=nhwc, feature_group_count=3)
        wide = jnp.tile(x[:, None, None, :1], (1, 1, 1, groups))  # (n, 1, 1, groups): one channel per group
        wide = lax.conv_general_dilated(
            wide, p["wide"], (1, 1), "VALID", dimension_numbers=nhwc, feature_group_count=groups
        )
        return jnp.concatenate([jnp.tanh(h).reshape(n, -1), jnp.tanh(wide).reshape(n, -1)], axis=1) @ p["head"]

    return apply, shapes


def norms() -> tuple[Apply, dict]:
    """Scales read by products and quotients: layer norm, inference batch norm folded first, ``s / h``.

    ``ln_scale`` multiplies the normalized activation (the view on the right
    of the ``mul``); ``bn_scale`` is divided by a constant first
    (``x * (s / √(var + ε))``, a parameter-only op, as written for a
    batch norm with fixed statistics) and broadcast over the tokens; ``r``
    is divided by an activation and ``g`` multiplies one from the left.
    """
    shapes = {"W": (3, 4), "ln_scale": (4,), "ln_shift": (4,), "bn_scale": (4,), "r": (4,), "g": (4, 4), "head": (4, 3)}
    var = jnp.asarray(np.linspace(0.5, 2.0, 4))

    def apply(p: dict, x: jax.Array) -> jax.Array:
        n = x.shape[0]
        h = x.reshape(n, 4, 3) @ p["W"]  # (n, 4 tokens, 4)
        mean = h.mean(-1, keepdims=True)
        h = (h - mean) / jnp.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * p["ln_scale"] + p["ln_shift"]
        h = jnp.tanh(h * (p["bn_scale"] / jnp.sqrt(var + 1e-5)))
        h = p["r"] / (1.5 + h) + p["g"] * h
        return jnp.tanh(h).mean(axis=1) @ p["head"]

    return apply, shapes


def layouts() -> tuple[Apply, dict]:
    """Kernels stored ``(out, in)`` (``x @ W.T``, and ``W @ x_n`` under vmap), subtracted biases, a nested jit."""
    shapes = {"A": (5, 4), "a": (5,), "B": (4, 5), "b": (4,), "C": (3, 4), "c": (3,)}

    @jax.jit
    def inner(W: jax.Array, h: jax.Array) -> jax.Array:  # a jit equation receiving a parameter view
        return jax.vmap(lambda row: W @ row)(h)

    def apply(p: dict, x: jax.Array) -> jax.Array:
        h = jnp.tanh(x @ p["A"].T - p["a"])
        h = jnp.tanh(p["b"] - inner(p["B"], h))
        return jnp.dot(h, p["C"].T) + p["c"]

    return apply, shapes


def data(n: int, d: int, classes: int, dtype: Any = jnp.float64, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((n, d)), dtype), jnp.asarray(rng.integers(0, classes, n))


MODELS: dict[str, Callable[[], tuple[Apply, dict, int]]] = {
    "tanh_mlp_bias": lambda: (*mlp(jnp.tanh, True, (4, 6, 5, 3)), 4),
    "relu_mlp_no_bias": lambda: (*mlp(jax.nn.relu, False, (4, 7, 6, 3)), 4),
    "relu_mlp_bias_deep": lambda: (*mlp(jax.nn.relu, True, (5, 6, 6, 6, 4)), 5),
    "mixed": lambda: (*mixed(), 8),
    "layouts": lambda: (*layouts(), 4),
    "sequence": lambda: (*sequence(), 12),
    "convolutions": lambda: (*convolutions(), 72),
    "norms": lambda: (*norms(), 12),
}


# ----------------------------------------------------------------------------- float64 against the oracle
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_exact_diagonal_matches_oracle(name: str, loss: str) -> None:
    apply, shapes, d = MODELS[name]()
    params = _init(shapes)
    classes = apply(params, jnp.zeros((1, d))).shape[1]
    x, labels = data(7, d, classes)
    y = labels if loss == "cross_entropy" else jnp.asarray(np.random.default_rng(2).standard_normal((7, classes)))
    expected = oracle_diagonal(apply, params, x, y, loss)
    assert_close(exact_diagonal(apply, params, x, y, loss), expected, rtol=1e-10, atol_rel=1e-12)


def test_unused_and_dead_entries_are_zero() -> None:
    apply, shapes, d = MODELS["mixed"]()
    params = _init(shapes)
    x, y = data(5, d, 3)
    diag = exact_diagonal(apply, params, x, y, "cross_entropy")
    _, unravel = ravel_pytree(params)
    assert np.all(np.asarray(unravel(jnp.asarray(diag))["unused"]) == 0.0)
    assert np.all(np.asarray(unravel(jnp.asarray(diag))["tied"]) > 0.0)  # the generic route did run


# ----------------------------------------------------------------------------- routes
def _bind(apply: Apply, params: dict) -> Any:
    b = JaxBackend()
    return b, b.bind(apply, params, [n for n, _ in b.named_parameters(apply, params)])


def _routes(apply: Apply, params: dict, x: jax.Array) -> dict[str, np.ndarray]:
    """Per parameter, where the analysis sends each entry: ``True`` for the structured route."""
    _, binding = _bind(apply, params)
    mask = jax_per_sample.structured_entries(binding.apply, binding.w, x)
    _, unravel = ravel_pytree(params)
    return {k: np.asarray(v) for k, v in unravel(jnp.asarray(mask, jnp.float64)).items()}


def test_recognized_entries_take_the_structured_route() -> None:
    apply, shapes, d = MODELS["mixed"]()
    params = _init(shapes)
    x, _ = data(5, d, 3)
    routes = _routes(apply, params, x)
    # Read once by a matrix product (of one row or of 4 tokens per sample), a convolution, or an added bias
    # (also over positions).
    for name in ("conv_w", "conv_b", "seq_w", "seq_b", "head_w", "head_b"):
        assert routes[name].all(), name
    # A weight read twice, a leaf nothing reads.
    for name in ("tied", "unused"):
        assert not routes[name].any(), name


def test_convolutions_take_the_structured_route() -> None:
    apply, shapes, d = MODELS["convolutions"]()
    params = _init(shapes)
    x, _ = data(5, d, 3)
    routes = _routes(apply, params, x)
    assert all(r.all() for r in routes.values()), {k: r.all() for k, r in routes.items()}


def test_sequence_kernels_take_the_structured_route() -> None:
    apply, shapes, d = MODELS["sequence"]()
    params = _init(shapes)
    x, _ = data(5, d, 2)
    routes = _routes(apply, params, x)
    for name in ("W1", "b1", "W2", "W3", "head", "head_b"):
        assert routes[name].all(), name
    assert not routes["tied"].any()  # read by two products


def test_embedding_tables_take_the_structured_route(monkeypatch: pytest.MonkeyPatch) -> None:
    apply, shapes = embedding()
    params = _init(shapes)
    x, _ = data(6, 5, 4)
    tokens = np.asarray(jnp.abs(x) * 3).astype(int)
    assert (tokens >= 5).any() and (tokens >= 3).any()  # lookups dropped by F and clamped by C
    assert any(len(set(row % 4)) < len(row) for row in tokens)  # a row of E looked up twice by one sample
    routes = _routes(apply, params, x)
    for name in ("E", "F", "C", "b"):
        assert routes[name].all(), name
    assert not routes["tied"].any()  # looked up and multiplied
    # Per cotangent, in chunks of one sample and cotangent, against the closed-form root; and no use is
    # rejected by the guard (a rejection would analyse the jaxpr again).
    analysed = []
    analyse = jax_per_sample._analyse
    monkeypatch.setattr(jax_per_sample, "_analyse", lambda *a: analysed.append(a[2]) or analyse(*a))
    U = _softmax_root_columns(np.asarray(apply(params, x)))
    b, binding = _bind(apply, params)
    out = np.asarray(b.per_sample_squares(binding.apply, True)(binding.w, x, lambda z: jnp.asarray(U), 1))
    assert_close(out, _oracle_squares(apply, params, x, U), rtol=1e-10, atol_rel=1e-12)
    assert analysed == [frozenset()]


@pytest.mark.parametrize("name", ["tanh_mlp_bias", "relu_mlp_no_bias", "layouts", "norms"])
def test_models_of_recognized_reads_never_take_the_generic_route(name: str) -> None:
    apply, shapes, d = MODELS[name]()
    params = _init(shapes)
    x, _ = data(6, d, 3)
    b, binding = _bind(apply, params)
    assert jax_per_sample.structured_entries(binding.apply, binding.w, x).all()
    calls = []

    def spy(*args: Any) -> Any:
        calls.append(args)
        return generic_squares(*args)

    squares = jax_per_sample.per_sample_squares(b, binding.apply, False, spy)
    U = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 3)))
    squares(binding.w, x, lambda z: U, 2**30)
    assert calls == []


# ----------------------------------------------------------------------------- the contract, chunked
def _oracle_squares(apply: Apply, params: dict, x: jax.Array, U: np.ndarray) -> np.ndarray:
    """``Σ_n (J_nᵀ U[k, n])²`` per cotangent ``(K, P)`` from per-sample Jacobians."""
    J, _ = _jacobians(apply, params, x)
    products = np.einsum("knc,ncp->knp", U, J)
    return (products**2).sum(axis=1)


@pytest.mark.parametrize("per_cotangent", [False, True])
@pytest.mark.parametrize("budget", [2**30, 1])  # one chunk, or one sample and one cotangent per chunk
@pytest.mark.parametrize("unroll", [False, True])  # backward passes vmapped over the cotangents, or one each
def test_squares_per_cotangent_and_chunked(
    per_cotangent: bool, budget: int, unroll: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jax_per_sample._Passes, "choose", lambda self, k_chunk: (unroll, False))
    apply, shapes, d = MODELS["mixed"]()
    params = _init(shapes)
    x, _ = data(5, d, 3)
    U = np.random.default_rng(4).standard_normal((4, 5, 3))
    b, binding = _bind(apply, params)
    squares = b.per_sample_squares(binding.apply, per_cotangent)
    out = np.asarray(squares(binding.w, x, lambda z: jnp.asarray(U), budget))
    expected = _oracle_squares(apply, params, x, U)
    assert_close(out, expected if per_cotangent else expected.sum(0), rtol=1e-10, atol_rel=1e-12)


def _softmax_root_columns(z: np.ndarray) -> np.ndarray:
    """Columns ``(C, N, C)`` of a square root of the mean cross-entropy's ``H_z``, in closed form.

    ``H_n = (diag(p) - p pᵀ) / N`` and column ``c`` is ``√p_c (e_c - p) / √N``:
    ``Σ_c p_c (e_c - p)(e_c - p)ᵀ = diag(p) - p pᵀ`` since ``Σ_c p_c = 1``.
    """
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    N, C = p.shape
    return np.sqrt(p.T)[:, :, None] * (np.eye(C)[:, None, :] - p[None]) / np.sqrt(N)


# Sequence products formed, or Σ_k through Gram matrices of rows; per cotangent or summed; backward passes
# vmapped or unrolled: every pair of the first two, each value of the third.
@pytest.mark.parametrize(
    ("gram", "per_cotangent", "unroll"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, False)],
)
def test_sequence_squares_by_products_and_by_gram(
    gram: bool, per_cotangent: bool, unroll: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jax_per_sample._Passes, "choose", lambda self, k_chunk: (unroll, False))
    monkeypatch.setattr(jax_per_sample, "_gram", lambda use, k, keep_k: use.rows == 1 or gram)
    apply, shapes, d = MODELS["sequence"]()
    params = _init(shapes)
    x, y = data(6, d, 2)
    U = _softmax_root_columns(np.asarray(apply(params, x)))
    b, binding = _bind(apply, params)
    squares = b.per_sample_squares(binding.apply, per_cotangent)
    out = np.asarray(squares(binding.w, x, lambda z: jnp.asarray(U), 2**30))
    expected = _oracle_squares(apply, params, x, U)
    assert_close(out, expected if per_cotangent else expected.sum(0), rtol=1e-10, atol_rel=1e-12)
    if not per_cotangent and not unroll:  # once: the closed-form root against the loss's Hessian from autodiff
        assert_close(out, oracle_diagonal(apply, params, x, y, "cross_entropy"), rtol=1e-10, atol_rel=1e-12)


def test_new_batch_size_reuses_the_analysis() -> None:
    apply, shapes, d = MODELS["tanh_mlp_bias"]()
    params = _init(shapes)
    b, binding = _bind(apply, params)
    squares = b.per_sample_squares(binding.apply, False)
    for n in (3, 8):
        x, _ = data(n, d, 3, seed=n)
        U = np.random.default_rng(n).standard_normal((3, n, 3))
        out = np.asarray(squares(binding.w, x, lambda z, U=U: jnp.asarray(U), 2**30))
        assert_close(out, _oracle_squares(apply, params, x, U).sum(0), rtol=1e-10, atol_rel=1e-12)


# ----------------------------------------------------------------------------- vmapped or unrolled passes
def test_passes_start_with_the_guess_and_try_the_other_once_it_is_amortized() -> None:
    passes = jax_per_sample._Passes(unrolled_first=True)
    assert passes.choose(10) == (True, False)  # compiles the first guess
    passes.record(True, 2.0, timed=False)
    assert passes.choose(10) == (True, True)  # timed once
    passes.record(True, 0.1, timed=True)
    # 2 s of compilation against 0.1 s a call: the guess serves until the calls add up to as much.
    seen = []
    while (choice := passes.choose(10))[0]:
        seen.append(choice)
        passes.record(True, 0.1, timed=False)
    assert seen == [(True, False)] * 18 and passes.calls[True] == 20
    assert choice == (False, False)  # the other compiles
    passes.record(False, 1.5, timed=False)
    assert passes.choose(10) == (False, True)
    passes.record(False, 0.05, timed=True)
    assert all(passes.choose(10) == (False, False) for _ in range(5))  # the faster one from now on
    assert passes.choose(1) == (False, False)  # one cotangent: one program
    assert passes.choose(jax_per_sample._Passes.MAX_UNROLLED + 1) == (False, False)


def test_convolutions_start_unrolled_on_a_cpu() -> None:
    def conv(p: dict, x: jax.Array) -> jax.Array:
        h = lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.tanh(h).mean(axis=(1, 2)) @ p["head"]

    conv_params = {"k": jnp.ones((3, 3, 2, 4)), "head": jnp.ones((4, 3))}
    dense, shapes, d = MODELS["tanh_mlp_bias"]()
    for apply, params, x, expected in [
        (conv, conv_params, jnp.ones((2, 5, 5, 2)), True),
        (dense, _init(shapes), data(2, d, 3)[0], False),
    ]:
        _, binding = _bind(apply, params)
        leaves, treedef = jax.tree_util.tree_flatten(x)
        closed = jax_per_sample._trace(binding.apply, binding.w, leaves, treedef)
        assert jax_per_sample._unrolled_first(binding.w, closed.jaxpr) is expected


# ----------------------------------------------------------------------------- the guard
@pytest.mark.parametrize(
    ("rule", "model", "classes"),
    [
        ("_bias_product", "tanh_mlp_bias", 3),
        ("_bias_product", "norms", 3),  # the scales' products too
        ("_dense_deltas", "sequence", 2),
        ("_activation", "convolutions", 3),
    ],
)
def test_guard_sends_wrong_products_to_the_generic_route(
    monkeypatch: pytest.MonkeyPatch, rule: str, model: str, classes: int
) -> None:
    # A structured product off by a factor 2 (its squares by 4): the first moment disagrees with autograd's
    # gradient, so those entries must go the generic route and the diagonal stay exact.  For the activations,
    # only the convolutions' windows are doubled.
    original = getattr(jax_per_sample, rule)
    if rule == "_activation":
        wrong = lambda use, *args: original(use, *args) * (1.0 if use.windows is None else 2.0)  # noqa: E731
    else:
        wrong = lambda use, delta, dtype: 2.0 * original(use, delta, dtype)  # noqa: E731
    monkeypatch.setattr(jax_per_sample, rule, wrong)
    apply, shapes, d = MODELS[model]()
    params = _init(shapes)
    x, y = data(6, d, classes)
    expected = oracle_diagonal(apply, params, x, y, "cross_entropy")
    assert_close(exact_diagonal(apply, params, x, y, "cross_entropy"), expected, rtol=1e-10, atol_rel=1e-12)


# ----------------------------------------------------------------------------- flax
@pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="flax is not installed")
def test_flax_linen_dense() -> None:
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.tanh(nn.Dense(6, param_dtype=jnp.float64)(x))
            x = nn.relu(nn.Dense(5, param_dtype=jnp.float64)(x))
            return nn.Dense(3, param_dtype=jnp.float64)(x)

    net = Net()
    x, y = data(6, 4, 3)
    variables = net.init(jax.random.PRNGKey(0), x)
    b, binding = _bind(net.apply, variables)
    assert jax_per_sample.structured_entries(binding.apply, binding.w, x).all()
    expected = oracle_diagonal(net.apply, variables, x, y, "cross_entropy")
    assert_close(exact_diagonal(net.apply, variables, x, y, "cross_entropy"), expected, rtol=1e-10, atol_rel=1e-12)


# ----------------------------------------------------------------------------- lower precision
def test_float32() -> None:
    # Both routes compute in float32 (unit roundoff 6e-8); an entry is a sum of a few dozen squares of
    # products of 2-3 rounded factors, so relative errors stay near 1e-6.  rtol=1e-4 leaves room and still
    # fails on a wrong formula (O(1)).
    for name in ("tanh_mlp_bias", "mixed"):
        apply, shapes, d = MODELS[name]()
        params = _init(shapes, jnp.float32)
        x, y = data(7, d, 3, jnp.float32)
        diag = exact_diagonal(apply, params, x, y, "cross_entropy")
        assert_close(diag, oracle_diagonal(apply, params, x, y, "cross_entropy"), rtol=1e-4, atol_rel=1e-6)


@pytest.mark.filterwarnings("ignore:diagonal. the products of this GGNOperator run in float16")
def test_float16() -> None:
    # The model runs in float16 (unit roundoff 4.9e-4): activations and cotangents are rounded at every
    # layer, so a per-sample product of this 2-layer net carries a relative error of a few 1e-3 and its square
    # twice that; the squares are summed in float32.  rtol=3e-2 covers that with margin and still fails on a
    # wrong formula.  Entries below 1e-2 of the largest lose their digits to float16's absolute rounding.
    apply, shapes, d = MODELS["tanh_mlp_bias"]()
    params = _init(shapes, jnp.float16)
    x, y = data(16, d, 3, jnp.float16)
    diag = exact_diagonal(apply, params, x, y, "cross_entropy")
    expected = oracle_diagonal(apply, params, x, y, "cross_entropy")
    assert np.isfinite(diag).all()
    assert_close(diag, expected, rtol=3e-2, atol_rel=1e-2)
