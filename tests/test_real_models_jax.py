"""Real JAX models (flax linen, flax nnx, equinox): products checked against JAX's own autodiff.

Each framework gets a LeNet-5, a small ResNet (BatchNorm in inference mode,
skip connections) and a 2-layer transformer, built here at toy sizes (a few
hundred parameters) in float64.  The oracles are written with plain JAX on a
flat parameter vector made with the framework's own tools (``ravel_pytree``,
``nnx.split``/``nnx.merge``, ``eqx.partition``/``eqx.combine``): central
differences of ``jax.grad``, forward-over-reverse ``jax.jvp(jax.grad)``,
``jax.hessian`` and ``Jᵀ H_z J`` from ``jax.jacfwd``.  Nothing here compares
multihess against itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)  # before any array exists: float64 oracles need float64 models

import equinox as eqx  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from flax.nnx.nn.attention import dot_product_attention_weights  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import multihess as mh  # noqa: E402

F64 = jnp.float64
N, VOCAB, SEQ, DIM = 6, 7, 5, 4  # batch, vocabulary, sequence length, model width


# ----------------------------------------------------------------------------- oracles (plain JAX)
def cross_entropy(z: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch, written out."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z, axis=1), y[:, None], axis=1))


def rel_err(got: Any, expected: Any) -> float:
    got, expected = np.asarray(got), np.asarray(expected)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def fd_hvp(loss_of: Callable[[jax.Array], jax.Array], w: jax.Array, v: jax.Array) -> np.ndarray:
    """Central differences of ``jax.grad``: truncation O(eps²) and round-off O(1e-16/eps), both near 1e-10."""
    eps = 1e-5 * max(1.0, float(jnp.linalg.norm(w))) / float(jnp.linalg.norm(v))
    grad = jax.jit(jax.grad(loss_of))
    return np.asarray((grad(w + eps * v) - grad(w - eps * v)) / (2 * eps))


def ggn_oracle(outputs: Callable[[jax.Array], jax.Array], w: jax.Array) -> np.ndarray:
    """``Σ_i J_iᵀ H_z,i J_i / N`` with ``J`` from ``jax.jacrev`` and the softmax ``H_z`` in closed form (NumPy)."""
    J = np.asarray(jax.jit(jax.jacrev(outputs))(w))  # (N, C, P): N*C reverse passes
    p = np.asarray(jax.nn.softmax(outputs(w), axis=1))
    Hz = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    return np.einsum("ncp,ncd,ndq->pq", J, Hz, J) / len(p)


# ----------------------------------------------------------------------------- a case: model + oracle
@dataclasses.dataclass
class Case:
    """One model, the way a user passes it to multihess, and the oracle's view of the same loss."""

    model: Any  # first argument of mh.hessian / mh.ggn
    weights: Any  # second argument (None for a module passed alone)
    x: jax.Array
    y: jax.Array
    w0: jax.Array  # the trainable parameters, flat, in JAX's leaf order (multihess's documented flat order)
    outputs: Callable[[jax.Array], jax.Array]  # flat parameters -> logits, with the framework's own tools
    to_tree: Callable[[jax.Array], Any]  # flat -> the vector tree a user passes to ``H @``
    from_tree: Callable[[Any], jax.Array]  # the tree ``H @`` answers -> flat, in the same order
    stats: Callable[[], list[np.ndarray]] = lambda: []  # running statistics of BatchNorm layers
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # params= and the like

    def operator(self, make: Callable[..., Any]) -> Any:
        return make(self.model, self.weights, data=(self.x, self.y), loss="cross_entropy", **self.kwargs)

    def loss_of(self, w: jax.Array) -> jax.Array:
        return cross_entropy(self.outputs(w), self.y)


def images(rng: np.random.Generator, channels: int, channels_first: bool = False) -> jax.Array:
    shape = (N, channels, 8, 8) if channels_first else (N, 8, 8, channels)
    return jnp.asarray(rng.standard_normal(shape))


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling of an NHWC batch."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def running_stats(rng: np.random.Generator, c: int) -> tuple[jax.Array, jax.Array]:
    """Running mean and variance far from (0, 1), so that a product using batch statistics would show."""
    return jnp.asarray(rng.normal(size=c)), jnp.asarray(rng.uniform(0.5, 2.0, size=c))


def data(name: str, seed: int = 0) -> tuple[np.random.Generator, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    if name == "transformer":
        x = jnp.asarray(rng.integers(0, VOCAB, size=(N, SEQ)))
        return rng, x, jnp.asarray(rng.integers(0, 3, size=N))
    x = images(rng, 1 if name == "lenet" else 2)
    return rng, x, jnp.asarray(rng.integers(0, 4 if name == "lenet" else 3, size=N))


# ----------------------------------------------------------------------------- flax linen
Dense = functools.partial(nn.Dense, param_dtype=F64, dtype=F64)
Conv = functools.partial(nn.Conv, param_dtype=F64, dtype=F64, padding="VALID")


class LinenLeNet(nn.Module):
    """LeNet-5 in miniature: two tanh convolutions with average pooling, three dense layers."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = avg_pool2(jnp.tanh(Conv(2, (3, 3))(x)))  # 8x8x1 -> 6x6x2 -> 3x3x2
        x = jnp.tanh(Conv(4, (2, 2))(x)).reshape(x.shape[0], -1)  # -> 2x2x4 -> 16
        x = jnp.tanh(Dense(8)(x))
        x = jnp.tanh(Dense(6)(x))
        return Dense(4)(x)


class LinenResNet(nn.Module):
    """Conv-BN-ReLU stem and one residual block (conv-BN-ReLU-conv-BN + skip), global pooling, linear head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(Conv, 4, (3, 3), padding="SAME", use_bias=False)
        bn = functools.partial(nn.BatchNorm, use_running_average=True, param_dtype=F64, dtype=F64)
        h = nn.relu(bn()(conv()(x)))
        r = bn()(conv()(nn.relu(bn()(conv()(h)))))
        return Dense(3)(nn.relu(h + r).mean(axis=(1, 2)))


class LinenBlock(nn.Module):
    """Post-norm encoder layer: self-attention and a GELU feed-forward, each with a residual and LayerNorm."""

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        a = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=DIM, param_dtype=F64, dtype=F64)(h)
        h = nn.LayerNorm(param_dtype=F64, dtype=F64)(h + a)
        f = Dense(DIM)(nn.gelu(Dense(2 * DIM)(h)))
        return nn.LayerNorm(param_dtype=F64, dtype=F64)(h + f)


class LinenTransformer(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = nn.Embed(VOCAB, DIM, param_dtype=F64, dtype=F64)(tokens)
        h = h + self.param("pos", nn.initializers.normal(0.5, F64), (SEQ, DIM))
        h = LinenBlock()(LinenBlock()(h))
        return Dense(3)(h.mean(axis=1))


def linen_case(name: str) -> Case:
    rng, x, y = data(name)
    module = {"lenet": LinenLeNet, "resnet": LinenResNet, "transformer": LinenTransformer}[name]()
    variables = jax.jit(module.init)(jax.random.key(0), x)
    kwargs: dict[str, Any] = {}
    if "batch_stats" in variables:
        stats = {k: dict(zip(("mean", "var"), running_stats(rng, 4))) for k in variables["batch_stats"]}
        # The running statistics are variables too, but not parameters: multihess takes the "params" collection.
        variables = {"params": variables["params"], "batch_stats": stats}
    w0, unravel = ravel_pytree(variables["params"])

    def outputs(w: jax.Array) -> jax.Array:
        return module.apply({**variables, "params": unravel(w)}, x)

    def to_tree(v: jax.Array) -> dict[str, Any]:
        # A tree shaped like the weights, None in place of the variables outside params=.
        return {**{k: None for k in variables}, "params": unravel(v)}

    def stats_now() -> list[np.ndarray]:
        return [np.asarray(a) for a in jax.tree.leaves(variables.get("batch_stats", {}))]

    return Case(
        # A jitted apply function, as a JAX user writes it; multihess's first-batch checks then run compiled.
        jax.jit(module.apply),
        variables,
        x,
        y,
        w0,
        outputs,
        to_tree,
        lambda t: ravel_pytree(t["params"])[0],
        stats_now,
        kwargs,
    )


# ----------------------------------------------------------------------------- flax nnx
class NnxLeNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        conv = functools.partial(nnx.Conv, padding="VALID", param_dtype=F64, rngs=rngs)
        dense = functools.partial(nnx.Linear, param_dtype=F64, rngs=rngs)
        self.conv1, self.conv2 = conv(1, 2, (3, 3)), conv(2, 4, (2, 2))
        self.fc1, self.fc2, self.fc3 = dense(16, 8), dense(8, 6), dense(6, 4)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = avg_pool2(jnp.tanh(self.conv1(x)))
        x = jnp.tanh(self.conv2(x)).reshape(x.shape[0], -1)
        return self.fc3(jnp.tanh(self.fc2(jnp.tanh(self.fc1(x)))))


class NnxResNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), use_bias=False, param_dtype=F64, rngs=rngs)
        bn = functools.partial(nnx.BatchNorm, 4, use_running_average=True, param_dtype=F64, rngs=rngs)
        self.stem, self.bn0 = conv(2, 4), bn()
        self.conv1, self.bn1, self.conv2, self.bn2 = conv(4, 4), bn(), conv(4, 4), bn()
        self.head = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn0(self.stem(x)))
        r = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(h)))))
        return self.head(nnx.relu(h + r).mean(axis=(1, 2)))


def attention_f64(query: jax.Array, key: jax.Array, value: jax.Array, **_: Any) -> jax.Array:
    """nnx's attention in the parameters' dtype.

    nnx's default ``dot_product_attention`` hands dropout-free attention to
    ``jax.nn.dot_product_attention``, whose softmax runs in float32 even on
    float64 inputs; that round-off (~1e-7) would swamp a float64 comparison.
    """
    return jnp.einsum("...hqk,...khd->...qhd", dot_product_attention_weights(query, key), value)


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.attn = nnx.MultiHeadAttention(
            2, DIM, DIM, param_dtype=F64, decode=False, attention_fn=attention_f64, rngs=rngs
        )
        self.ln1 = nnx.LayerNorm(DIM, param_dtype=F64, rngs=rngs)
        self.ff1 = nnx.Linear(DIM, 2 * DIM, param_dtype=F64, rngs=rngs)
        self.ff2 = nnx.Linear(2 * DIM, DIM, param_dtype=F64, rngs=rngs)
        self.ln2 = nnx.LayerNorm(DIM, param_dtype=F64, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = self.ln1(h + self.attn(h))
        return self.ln2(h + self.ff2(nnx.gelu(self.ff1(h))))


class NnxTransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, DIM, param_dtype=F64, rngs=rngs)
        self.pos = nnx.Param(0.5 * jax.random.normal(rngs.params(), (SEQ, DIM), F64))
        self.blocks = nnx.List([NnxBlock(rngs), NnxBlock(rngs)])
        self.head = nnx.Linear(DIM, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens) + self.pos[...]
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(axis=1))


def nnx_case(name: str) -> Case:
    """The module itself goes to multihess (an nnx module is a pytree); the oracle uses nnx.split/merge."""
    rng, x, y = data(name)
    # Built under nnx.jit: one compiled initialization instead of one dispatch per initializer.
    model = nnx.jit(
        lambda: {"lenet": NnxLeNet, "resnet": NnxResNet, "transformer": NnxTransformer}[name](nnx.Rngs(0))
    )()
    kwargs: dict[str, Any] = {}
    if name == "resnet":
        for bn in (model.bn0, model.bn1, model.bn2):
            mean, var = running_stats(rng, 4)
            bn.mean[...], bn.var[...] = mean.astype(bn.mean.dtype), var.astype(bn.var.dtype)  # a cast, not a promotion
        # nnx.BatchStat leaves are arrays of the module pytree like the nnx.Param leaves; only the Params count.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    w0, unravel = ravel_pytree(params)

    def outputs(w: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, unravel(w), rest)(x)

    def to_tree(v: jax.Array) -> Any:
        # The module itself with the vector in its Param leaves (None in its BatchStat leaves, outside params=).
        return nnx.merge(graphdef, unravel(v), jax.tree.map(lambda _: None, rest))

    def from_tree(tree: Any) -> jax.Array:
        # The answer is the module shaped the same way; its Param leaves, in leaf order.
        return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(nnx.state(tree, nnx.Param))])

    def stats_now() -> list[np.ndarray]:
        return [np.asarray(a) for a in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]

    return Case(model, None, x, y, w0, outputs, to_tree, from_tree, stats_now, kwargs)


# ----------------------------------------------------------------------------- equinox
class EqxLeNet(eqx.Module):
    """Per-sample layers, vmapped over the batch inside ``__call__``, so the module is passed alone."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    fcs: list[eqx.nn.Linear]

    def __init__(self, key: jax.Array) -> None:
        k = jax.random.split(key, 5)
        self.conv1 = eqx.nn.Conv2d(1, 2, 3, dtype=F64, key=k[0])
        self.conv2 = eqx.nn.Conv2d(2, 4, 2, dtype=F64, key=k[1])
        self.fcs = [eqx.nn.Linear(i, o, dtype=F64, key=kk) for i, o, kk in [(16, 8, k[2]), (8, 6, k[3]), (6, 4, k[4])]]

    def one(self, x: jax.Array) -> jax.Array:
        x = eqx.nn.AvgPool2d(2, 2)(jnp.tanh(self.conv1(x)))  # CHW: 1x8x8 -> 2x6x6 -> 2x3x3
        x = jnp.tanh(self.conv2(x)).ravel()
        x = jnp.tanh(self.fcs[0](x))
        return self.fcs[2](jnp.tanh(self.fcs[1](x)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.vmap(self.one)(x)


class EqxResNet(eqx.Module):
    """Per-sample layers with stateful BatchNorm: evaluated through an apply function holding the state."""

    convs: list[eqx.nn.Conv2d]
    bns: list[eqx.nn.BatchNorm]
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k = jax.random.split(key, 4)
        self.convs = [
            eqx.nn.Conv2d(c, 4, 3, padding=1, use_bias=False, dtype=F64, key=kk) for c, kk in zip((2, 4, 4), k)
        ]
        self.bns = [eqx.nn.BatchNorm(4, axis_name="batch", mode="ema", dtype=F64) for _ in range(3)]
        self.head = eqx.nn.Linear(4, 3, dtype=F64, key=k[3])

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        h, state = self.bns[0](self.convs[0](x), state)
        h = jax.nn.relu(h)
        r, state = self.bns[1](self.convs[1](h), state)
        r, state = self.bns[2](self.convs[2](jax.nn.relu(r)), state)
        return self.head(jax.nn.relu(h + r).mean(axis=(1, 2))), state


class EqxBlock(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    ln1: eqx.nn.LayerNorm
    ff1: eqx.nn.Linear
    ff2: eqx.nn.Linear
    ln2: eqx.nn.LayerNorm

    def __init__(self, key: jax.Array) -> None:
        k = jax.random.split(key, 3)
        self.attn = eqx.nn.MultiheadAttention(2, DIM, use_query_bias=True, use_output_bias=True, dtype=F64, key=k[0])
        self.ln1, self.ln2 = eqx.nn.LayerNorm(DIM, dtype=F64), eqx.nn.LayerNorm(DIM, dtype=F64)
        self.ff1 = eqx.nn.Linear(DIM, 2 * DIM, dtype=F64, key=k[1])
        self.ff2 = eqx.nn.Linear(2 * DIM, DIM, dtype=F64, key=k[2])

    def __call__(self, h: jax.Array) -> jax.Array:  # (SEQ, DIM)
        h = jax.vmap(self.ln1)(h + self.attn(h, h, h))
        return jax.vmap(self.ln2)(h + jax.vmap(lambda t: self.ff2(jax.nn.gelu(self.ff1(t))))(h))


class EqxTransformer(eqx.Module):
    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: list[EqxBlock]
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k = jax.random.split(key, 5)
        self.embed = eqx.nn.Embedding(VOCAB, DIM, dtype=F64, key=k[0])
        self.pos = 0.5 * jax.random.normal(k[1], (SEQ, DIM), F64)
        self.blocks = [EqxBlock(k[2]), EqxBlock(k[3])]
        self.head = eqx.nn.Linear(DIM, 3, dtype=F64, key=k[4])

    def one(self, tokens: jax.Array) -> jax.Array:
        h = jax.vmap(self.embed)(tokens) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(axis=0))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jax.vmap(self.one)(tokens)


def eqx_case(name: str) -> Case:
    rng, x, y = data(name)
    key = jax.random.key(0)
    if name == "resnet":
        model, state = eqx.filter_jit(eqx.nn.make_with_state(EqxResNet))(key)
        for bn in model.bns:
            state = state.set(bn.ema_state_index, running_stats(rng, 4))
        model = eqx.nn.inference_mode(model)  # BatchNorm normalizes with the running statistics in `state`
        x = jnp.moveaxis(x, -1, 1)  # NHWC -> NCHW

        def apply(m: EqxResNet, x: jax.Array) -> jax.Array:
            # The state is closed over: multihess sees parameters and inputs only, never the statistics.
            batched = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
            return batched(x, state)[0]

        first, weights = apply, model
        stats_now = lambda: [np.asarray(a) for a in jax.tree.leaves(state)]  # noqa: E731
    else:
        model = eqx.filter_jit({"lenet": EqxLeNet, "transformer": EqxTransformer}[name])(key)
        x = jnp.moveaxis(x, -1, 1) if name == "lenet" else x
        first, weights, stats_now = model, None, lambda: []
        apply = lambda m, x: m(x)  # noqa: E731
    params, static = eqx.partition(model, eqx.is_array)
    w0, unravel = ravel_pytree(params)

    def from_tree(tree: Any) -> jax.Array:
        return ravel_pytree(eqx.filter(tree, eqx.is_array))[0]

    return Case(
        first,
        weights,
        x,
        y,
        w0,
        lambda w: apply(eqx.combine(unravel(w), static), x),
        lambda v: eqx.combine(unravel(v), static),  # the module itself with the vector in its array leaves
        from_tree,
        stats_now,
    )


# ----------------------------------------------------------------------------- the checks
BUILDERS = {"linen": linen_case, "nnx": nnx_case, "equinox": eqx_case}


@functools.cache
def case(framework: str, name: str) -> Case:
    """Each model is built once and shared by the tests (building runs JAX eagerly, which is slow)."""
    return BUILDERS[framework](name)


CASES = [(f, m) for f in BUILDERS for m in ("lenet", "resnet", "transformer")]


# Compiling one HVP of these 2-layer transformers costs 4-10 s of CPU (XLA CPU, ~1500 ops after
# differentiation), and jax.hessian as much again: transformers are checked against finite differences
# only, so that the file stays short; LeNet and ResNet get the dense check too.
DENSE = {c: c[1] != "transformer" for c in CASES}


@pytest.mark.parametrize("framework,name", CASES)
def test_hessian_matches_jax_autodiff(framework: str, name: str) -> None:
    c = case(framework, name)
    before = c.stats()
    n = c.w0.size
    H = c.operator(mh.hessian)
    assert H.shape == (n, n) and H.dtype == F64
    v = jnp.asarray(np.random.default_rng(1).standard_normal(n))
    got = c.from_tree(H @ c.to_tree(v))  # the tree a user passes in, and the tree that comes back
    # Central differences of jax.grad: O(eps²) truncation + O(1e-16/eps) round-off, ≈ 1e-9 relative here.
    assert rel_err(got, fd_hvp(c.loss_of, c.w0, v)) <= 1e-6
    if DENSE[framework, name]:
        # jax.hessian (forward-over-reverse Jacobian of jax.grad): both sides are exact float64 derivatives
        # evaluated in different orders, so they differ by round-off only.
        assert n <= 600
        expected = np.asarray(jax.jit(jax.hessian(c.loss_of))(c.w0))
        assert rel_err(got, expected @ np.asarray(v)) <= 1e-10
        assert rel_err(H @ v, expected @ np.asarray(v)) <= 1e-10  # flat in, flat out, in the same leaf order
        dense = np.asarray(H.dense(chunk_size=96))  # one compiled program, 96 columns at a time
        assert rel_err(dense, expected) <= 1e-10
    # Inference-mode BatchNorm: products read the running statistics and never write them.
    after = c.stats()
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("framework,name", [("linen", "lenet"), ("nnx", "resnet"), ("equinox", "lenet")])
def test_ggn_matches_jacobian_oracle(framework: str, name: str) -> None:
    c = case(framework, name)
    before = c.stats()
    n = c.w0.size
    expected = ggn_oracle(c.outputs, c.w0)
    dense = np.asarray(c.operator(mh.ggn).dense(chunk_size=n))  # one chunk of every column
    assert rel_err(dense, expected) <= 1e-10  # exact in both: round-off only
    # Cross-entropy is convex in the logits, so G is PSD (up to round-off).
    assert np.linalg.eigvalsh(dense).min() >= -1e-12 * np.abs(dense).max()
    after = c.stats()
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))


def test_nnx_split_route_matches_module_route() -> None:
    """The functional nnx route (``nnx.split`` + ``nnx.merge`` in an apply function) against ``jax.jvp(jax.grad)``."""
    c = case("nnx", "resnet")
    graphdef, params, rest = nnx.split(c.model, nnx.Param, ...)
    H = mh.hessian(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, data=(c.x, c.y), loss="cross_entropy")
    v = jnp.asarray(np.random.default_rng(2).standard_normal(c.w0.size))
    got = ravel_pytree(H @ ravel_pytree(params)[1](v))[0]  # an nnx.State in, an nnx.State out
    expected = jax.jit(lambda w, v: jax.jvp(jax.grad(c.loss_of), (w,), (v,))[1])(c.w0, v)
    assert rel_err(got, expected) <= 1e-10
