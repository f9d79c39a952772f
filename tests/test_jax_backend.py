"""The JAX adapter on real JAX models, checked against NumPy float64 oracles.

Oracles are closed forms (linear and softmax regression, a scalar function)
or central differences of gradients written by hand in NumPy (a 2-layer tanh
MLP).  Nothing here compares the library against itself.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # before any array exists: float64 oracles need float64 models

import jax.numpy as jnp  # noqa: E402

import multihess as mh  # noqa: E402
from multihess._arrays import all_finite, dtype_name, is_floating  # noqa: E402
from multihess._trees import PYTHON_TREES, named_leaves  # noqa: E402
from multihess.backends.jax_backend import JaxBackend  # noqa: E402

N, D, HID, C = 6, 3, 4, 3


# ----------------------------------------------------------------------------- NumPy oracles
def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def mlp_grad(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, loss: str) -> dict[str, np.ndarray]:
    """Hand-written backpropagation of a 2-layer tanh MLP with a mean-reduced loss."""
    h = np.tanh(x @ p["W1"] + p["b1"])
    z = h @ p["W2"] + p["b2"]
    if loss == "cross_entropy":
        dz = (softmax(z) - np.eye(z.shape[1])[y]) / z.shape[0]
    else:  # mse, mean over all elements
        dz = 2.0 * (z - y) / z.size
    da = (dz @ p["W2"].T) * (1.0 - h**2)
    return {"W1": x.T @ da, "b1": da.sum(0), "W2": h.T @ dz, "b2": dz.sum(0)}


def fd_hessian(grad: Callable[[np.ndarray], np.ndarray], w: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Central differences of an analytic gradient, column by column (symmetrized)."""
    cols = []
    for j in range(w.size):
        e = np.zeros_like(w)
        e[j] = eps
        cols.append((grad(w + e) - grad(w - e)) / (2 * eps))
    H = np.stack(cols, axis=1)
    return 0.5 * (H + H.T)


# ----------------------------------------------------------------------------- a flax-style MLP
# JAX's flat order (dict keys sorted) and the NumPy names of each leaf.
MLP_NAMES = ["params.Dense_0.bias", "params.Dense_0.kernel", "params.Dense_1.bias", "params.Dense_1.kernel"]
NP_KEY = dict(zip(MLP_NAMES, ["b1", "W1", "b2", "W2"]))


def mlp_apply(p: dict, x: jax.Array) -> jax.Array:
    q = p["params"]
    h = jnp.tanh(x @ q["Dense_0"]["kernel"] + q["Dense_0"]["bias"])
    return h @ q["Dense_1"]["kernel"] + q["Dense_1"]["bias"]


def make_mlp(dtype=np.float64, loss: str = "cross_entropy", seed: int = 0):
    rng = np.random.default_rng(seed)
    np_p = {
        "W1": rng.normal(size=(D, HID)),
        "b1": rng.normal(size=HID),
        "W2": rng.normal(size=(HID, C)),
        "b2": rng.normal(size=C),
    }
    x = rng.normal(size=(N, D))
    y = rng.integers(0, C, size=N) if loss == "cross_entropy" else rng.normal(size=(N, C))

    def leaf(k):
        return jnp.asarray(np_p[k], dtype=dtype)

    params = {
        "params": {
            "Dense_0": {"kernel": leaf("W1"), "bias": leaf("b1")},
            "Dense_1": {"kernel": leaf("W2"), "bias": leaf("b2")},
        }
    }
    return params, np_p, x, y


def np_flatten(tree: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.ravel(tree[NP_KEY[n]]) for n in names])


def mlp_oracle(np_p, x, y, loss: str) -> np.ndarray:
    shapes = {k: v.shape for k, v in np_p.items()}
    sizes = [np_p[NP_KEY[n]].size for n in MLP_NAMES]

    def unflatten(w):
        parts = np.split(w, np.cumsum(sizes)[:-1])
        return {NP_KEY[n]: part.reshape(shapes[NP_KEY[n]]) for n, part in zip(MLP_NAMES, parts)}

    return fd_hessian(lambda w: np_flatten(mlp_grad(unflatten(w), x, y, loss), MLP_NAMES), np_flatten(np_p, MLP_NAMES))


def offsets(names: list[str], np_p) -> dict[str, slice]:
    out, start = {}, 0
    for n in names:
        size = np_p[NP_KEY[n]].size
        out[n] = slice(start, start + size)
        start += size
    return out


def np_(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def close(a, b, rtol: float = 1e-7) -> None:
    a, b = np_(a), np_(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1.0, np.abs(b).max()))


# ----------------------------------------------------------------------------- exact Hessian and GGN
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_mlp_hessian_and_hvp_match_finite_differences(loss) -> None:
    params, np_p, x, y = make_mlp(loss=loss)
    H = mh.hessian(mlp_apply, params, data=(x, y), loss=loss)
    assert H.rows.names == MLP_NAMES and H.shape == (31, 31) and H.dtype == jnp.float64
    oracle = mlp_oracle(np_p, x, y, loss)
    close(H.dense(), oracle)
    v = np.random.default_rng(1).normal(size=31)
    close(H @ jnp.asarray(v), oracle @ v)
    V = np.random.default_rng(2).normal(size=(31, 3))
    close(H.matmat(jnp.asarray(V)), oracle @ V)


def test_finite_difference_operator_agrees_with_hessian() -> None:
    params, np_p, x, y = make_mlp()
    oracle = mlp_oracle(np_p, x, y, "cross_entropy")
    F = mh.finite_difference_hessian(mlp_apply, params, data=(x, y), loss="cross_entropy")
    H = mh.hessian(mlp_apply, params, data=(x, y), loss="cross_entropy")
    v = jnp.asarray(np.random.default_rng(3).normal(size=31))
    close(F @ v, H @ v, rtol=1e-7)
    close(F @ v, oracle @ np_(v), rtol=1e-7)


def test_float32_model_matches_float64_oracle() -> None:
    params, np_p, x, y = make_mlp(dtype=np.float32)
    H = mh.hessian(mlp_apply, params, data=(x, y), loss="cross_entropy")
    G = mh.ggn(mlp_apply, params, data=(x, y), loss="cross_entropy", params="params.Dense_1.*")
    dense = H.dense()
    assert dense.dtype == jnp.float32 and G.dense().dtype == jnp.float32
    oracle = mlp_oracle({k: v.astype(np.float32).astype(np.float64) for k, v in np_p.items()}, x, y, "cross_entropy")
    close(dense, oracle, rtol=1e-5)
    # The last layer's GGN block equals its Hessian block (z is linear in it).
    s = offsets(MLP_NAMES, np_p)
    last = np.r_[s["params.Dense_1.bias"], s["params.Dense_1.kernel"]]
    close(G.dense(), oracle[np.ix_(last, last)], rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 31, 64])
def test_dense_runs_one_linearized_program_per_batch(monkeypatch, chunk_size: int) -> None:
    """``dense()`` through the compiled ``dense`` variant: uneven chunks, two unequal batches, Hessian and GGN."""
    from multihess.backends import jax_backend

    traced: list[int] = []
    original = jax_backend._dense_matrix

    def counting(f, w, batch, chunk):
        traced.append(chunk)
        return original(f, w, batch, chunk)

    monkeypatch.setattr(jax_backend, "_dense_matrix", counting)
    params, np_p, x, y = make_mlp(seed=7)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]  # the mean weights the batches by size
    oracle = mlp_oracle(np_p, x, y, "cross_entropy")
    close(mh.hessian(mlp_apply, params, data=data, loss="cross_entropy").dense(chunk_size=chunk_size), oracle)
    # The last layer's GGN block equals its Hessian block (z is linear in it).
    s = offsets(MLP_NAMES, np_p)
    last = np.r_[s["params.Dense_1.bias"], s["params.Dense_1.kernel"]]
    G = mh.ggn(mlp_apply, params, data=data, loss="cross_entropy", params="params.Dense_1.*")
    close(G.dense(chunk_size=chunk_size), oracle[np.ix_(last, last)])
    assert traced and set(traced) == {chunk_size}


def test_dense_counts_the_sum_over_batches_against_max_bytes() -> None:
    """One batch builds the matrix and one copy; more batches hold their running sum beside those two."""
    params, np_p, x, y = make_mlp(seed=8)
    one = mh.hessian(mlp_apply, params, data=(x, y), loss="cross_entropy")
    n = one.shape[0]
    size = n * n * np.dtype(one.dtype).itemsize
    close(one.dense(max_bytes=2 * size), mlp_oracle(np_p, x, y, "cross_entropy"))
    two = mh.hessian(mlp_apply, params, data=[(x[:4], y[:4]), (x[4:], y[4:])], loss="cross_entropy")
    with pytest.raises(MemoryError, match="max_bytes"):
        two.dense(max_bytes=2 * size)
    close(two.dense(max_bytes=3 * size), mlp_oracle(np_p, x, y, "cross_entropy"))


def test_linear_regression_hessian_closed_form_over_two_batches() -> None:
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(10, 4)), rng.normal(size=(10, 1))
    w = jnp.asarray(rng.normal(size=(4, 1)))
    data = [(X[:7], Y[:7]), (X[7:], Y[7:])]  # unequal batches: the mean weights them by size
    H = mh.hessian(lambda p, x: x @ p, w, data=data, loss="mse")
    assert H.rows.names == ["params"]
    close(H.dense(), 2.0 * X.T @ X / 10)
    G = mh.ggn(lambda p, x: x @ p, w, data=data, loss="mse", reduction="sum")
    close(G.dense(), 2.0 * X.T @ X)


def test_batch_with_non_array_entries_compiles() -> None:
    # A string in the batch cannot be traced; it is part of the compiled function's cache key instead.
    rng = np.random.default_rng(10)
    X, Y = rng.normal(size=(8, 3)), rng.normal(size=(8, 1))
    w = jnp.asarray(rng.normal(size=(3, 1)))

    def apply(p, xb):
        x, mode = xb
        return (x @ p) * (2.0 if mode == "double" else 1.0)

    for mode, factor in (("double", 4.0), ("single", 1.0)):
        H = mh.hessian(apply, w, data=((X, mode), Y), loss="mse")
        close(H.dense(), factor * 2.0 * X.T @ X / 8)
        G = mh.ggn(apply, w, data=((X, mode), Y), loss="mse")
        close(G @ jnp.ones(3), factor * 2.0 * X.T @ X.sum(axis=1) / 8)


def test_softmax_regression_ggn_closed_form() -> None:
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(N, D)), rng.integers(0, C, size=N)
    W = rng.normal(size=(D, C))
    params = {"W": jnp.asarray(W)}
    G = mh.ggn(lambda p, x: x @ p["W"], params, data=(X, y), loss="cross_entropy")
    # vec(W) is row-major, so entry (a, c) sits at a*C + c: G = Σ_i x_i x_iᵀ ⊗ (diag(p_i) − p_i p_iᵀ) / N.
    P = softmax(X @ W)
    oracle = sum(np.kron(np.outer(X[i], X[i]), np.diag(P[i]) - np.outer(P[i], P[i])) for i in range(N)) / N
    close(G.dense(), oracle)
    # z is linear in W: the exact Hessian is the same closed form.
    close(mh.hessian(lambda p, x: x @ p["W"], params, data=(X, y), loss="cross_entropy").dense(), oracle)


def test_scalar_function_of_a_vector() -> None:
    rng = np.random.default_rng(6)
    a, w = rng.normal(size=5), rng.normal(size=5)
    a_j = jnp.asarray(a)

    def fn(v):
        return jnp.sum(v**4) / 4 + 0.5 * jnp.dot(a_j, v) ** 2 + jnp.sum(jnp.sin(v))

    H = mh.hessian(fn, jnp.asarray(w))
    close(H.dense(), np.diag(3 * w**2 - np.sin(w)) + np.outer(a, a))
    with pytest.raises(ValueError, match="GGN needs model outputs and a loss"):
        mh.ggn(fn, jnp.asarray(w))


# ----------------------------------------------------------------------------- trees, subsets, blocks
def test_tree_in_tree_out() -> None:
    params, np_p, x, y = make_mlp()
    oracle = mlp_oracle(np_p, x, y, "cross_entropy")
    H = mh.hessian(mlp_apply, params, data=(x, y), loss="cross_entropy")
    rng = np.random.default_rng(7)
    v_np = {k: rng.normal(size=p.shape) for k, p in np_p.items()}
    v = {
        "params": {
            "Dense_0": {"kernel": jnp.asarray(v_np["W1"]), "bias": jnp.asarray(v_np["b1"])},
            "Dense_1": {"kernel": jnp.asarray(v_np["W2"]), "bias": jnp.asarray(v_np["b2"])},
        }
    }
    out = H @ v
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    expected = oracle @ np_flatten(v_np, MLP_NAMES)
    s = offsets(MLP_NAMES, np_p)
    close(out["params"]["Dense_1"]["kernel"], expected[s["params.Dense_1.kernel"]].reshape(HID, C))
    close(out["params"]["Dense_0"]["bias"], expected[s["params.Dense_0.bias"]])


def test_subsets_and_cross_blocks() -> None:
    params, np_p, x, y = make_mlp()
    oracle = mlp_oracle(np_p, x, y, "cross_entropy")
    s = offsets(MLP_NAMES, np_p)
    first = np.r_[s["params.Dense_0.bias"], s["params.Dense_0.kernel"]]
    last = np.r_[s["params.Dense_1.bias"], s["params.Dense_1.kernel"]]
    kw = dict(data=(x, y), loss="cross_entropy")

    block = mh.hessian(mlp_apply, params, params="params.Dense_1.*", **kw)
    close(block.dense(), oracle[np.ix_(last, last)])
    cross = mh.hessian(mlp_apply, params, params="params.Dense_0.*", col_params="params.Dense_1.*", **kw)
    assert cross.shape == (16, 15)
    close(cross.dense(), oracle[np.ix_(first, last)])
    # Selecting by the array itself picks the same parameter as its name.
    kernel = params["params"]["Dense_1"]["kernel"]
    by_array = mh.hessian(mlp_apply, params, params=[kernel], **kw)
    sk = s["params.Dense_1.kernel"]
    close(by_array.dense(), oracle[sk, sk])

    # A vector over a subset is a tree with None in place of the other parameters.
    v = jnp.asarray(np.random.default_rng(8).normal(size=15))
    tree = block.rows.to_tree(v)
    assert tree["params"]["Dense_0"] == {"bias": None, "kernel": None}
    out = block @ tree
    assert out["params"]["Dense_0"]["kernel"] is None
    close(out["params"]["Dense_1"]["bias"], (oracle[np.ix_(last, last)] @ np_(v))[:3])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "b"], meta_fields=[])
@dataclasses.dataclass
class Layer:
    w: jax.Array
    b: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["layers", "scale"], meta_fields=["act"])
@dataclasses.dataclass
class MLPModule:
    """An equinox-style callable pytree: arrays, a non-array leaf and a static activation."""

    layers: list
    scale: float
    act: Callable = jnp.tanh

    def __call__(self, x):
        h = self.act(x @ self.layers[0].w + self.layers[0].b)
        return self.scale * (h @ self.layers[1].w + self.layers[1].b)


def test_custom_pytree_params_and_callable_module() -> None:
    _, np_p, x, y = make_mlp()
    oracle = mlp_oracle(np_p, x, y, "cross_entropy")
    j = {k: jnp.asarray(v) for k, v in np_p.items()}
    module = MLPModule([Layer(j["W1"], j["b1"]), Layer(j["W2"], j["b2"])], 1.0)
    backend = JaxBackend()
    assert backend.owns(module)
    names = [n for n, _ in backend.named_parameters(module, None)]
    assert names == ["layers.0.w", "layers.0.b", "layers.1.w", "layers.1.b"]  # dataclass field order
    H = mh.hessian(module, data=(x, y), loss="cross_entropy")
    order = ["params.Dense_0.kernel", "params.Dense_0.bias", "params.Dense_1.kernel", "params.Dense_1.bias"]
    s = offsets(MLP_NAMES, np_p)
    perm = np.concatenate([np.arange(s[n].start, s[n].stop) for n in order])
    close(H.dense(), oracle[np.ix_(perm, perm)])
    # The same module as f(params, x): the tree comes back as the module type.
    out = mh.hessian(lambda m, x: m(x), module, data=(x, y), loss="cross_entropy") @ module
    assert isinstance(out, MLPModule) and isinstance(out.layers[1], Layer)
    expected = oracle @ np_flatten(np_p, MLP_NAMES)  # v = the parameters themselves
    close(out.layers[1].w, expected[s["params.Dense_1.kernel"]].reshape(HID, C))
    assert out.scale == 1.0 and out.act is jnp.tanh


def test_names_match_the_core_tree_naming() -> None:
    tree = {"b": [jnp.ones(2), (jnp.ones(3), {"k": jnp.ones(1)})], "a": jnp.ones(2)}
    mine = {n for n, _ in JaxBackend().named_parameters(lambda p, x: x, tree)}
    core = {n for n, _ in named_leaves(PYTHON_TREES, tree)[0]}  # the plain-container walker
    assert mine == core == {"a", "b.0", "b.1.0", "b.1.1.k"}
    assert [n for n, _ in JaxBackend().named_parameters(lambda p: p, jnp.ones(3))] == ["params"]


# ----------------------------------------------------------------------------- detection and conversion
def test_owns_and_asarray() -> None:
    b = JaxBackend()
    assert b.owns(jnp.ones(2)) and b.owns({"a": jnp.ones(2), "b": [jnp.ones(1)]})
    assert not b.owns(np.ones(2)) and not b.owns({"a": np.ones(2)}) and not b.owns({"a": jnp.ones(2), "b": np.ones(1)})
    assert not b.owns([1.0, 2.0]) and not b.owns("text")
    like = jnp.ones(2, dtype=jnp.float32)
    f = b.asarray(np.arange(3.0), like)
    labels = b.asarray(np.arange(3), like)
    assert f.dtype == jnp.float32 and f.devices() == like.devices()
    assert jnp.issubdtype(labels.dtype, jnp.integer) and b.to_numpy(labels).tolist() == [0, 1, 2]
    assert dtype_name(like) == "float32" and is_floating(b.xp, like) and not is_floating(b.xp, labels)
    assert all_finite(b.xp, like) and not all_finite(b.xp, jnp.array([1.0, jnp.nan]))


# ----------------------------------------------------------------------------- bad input
def test_bad_vectors() -> None:
    params, _, x, y = make_mlp()
    H = mh.hessian(mlp_apply, params, data=(x, y), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"shape \(31,\)"):
        H @ jnp.ones(30)
    with pytest.raises(ValueError, match="NaN"):
        H @ jnp.ones(31).at[4].set(jnp.nan)
    with pytest.raises(TypeError, match="NumPy"):
        H @ np.ones(31)
    with pytest.raises(TypeError, match="dtype float32"):
        H @ jnp.ones(31, dtype=jnp.float32)
    tree = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(TypeError, match="NumPy"):
        H @ {"params": {**tree["params"], "Dense_0": {"kernel": np.ones((D, HID)), "bias": jnp.ones(HID)}}}
    with pytest.raises(ValueError, match=r"v\['params.Dense_0.kernel'\] has shape"):
        H @ {"params": {**tree["params"], "Dense_0": {"kernel": jnp.ones((HID, D)), "bias": jnp.ones(HID)}}}
    with pytest.raises(ValueError, match="parameters are"):
        H @ {"params": {"Dense_1": tree["params"]["Dense_1"]}}


def test_arrays_from_two_frameworks() -> None:
    torch = pytest.importorskip("torch")
    params, _, x, y = make_mlp()
    H = mh.hessian(mlp_apply, params, data=(x, y), loss="cross_entropy")
    with pytest.raises(TypeError, match="two frameworks"):
        H @ torch.ones(31, dtype=torch.float64)
    with pytest.raises(TypeError, match="two frameworks"):
        mh.hessian(mlp_apply, params, data=(torch.as_tensor(x), torch.as_tensor(y)), loss="cross_entropy")


def test_integer_parameters_are_rejected() -> None:
    with pytest.raises(TypeError, match="dtype int"):
        mh.hessian(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.arange(3)})
    # An integer leaf outside the selection stays fixed.
    p = {"w": jnp.ones(3), "n": jnp.arange(2)}
    H = mh.hessian(lambda q: jnp.sum(q["w"] ** 3) + jnp.sum(q["n"]), p, params="w", col_params="w")
    close(H.dense(), np.diag(6.0 * np.ones(3)))


# ----------------------------------------------------------------------------- compiled once
def test_products_trace_once_per_shape() -> None:
    params, np_p, x, y = make_mlp()
    traces = [0]

    def counted(p, xb):
        traces[0] += 1  # Python side effect: runs only while JAX traces
        return mlp_apply(p, xb)

    rng = np.random.default_rng(9)
    vs = [jnp.asarray(rng.normal(size=31)) for _ in range(4)]
    Vs = [jnp.asarray(rng.normal(size=(31, 3))) for _ in range(3)]
    for make in (mh.hessian, mh.ggn):
        op = make(counted, params, data=(x, y), loss="cross_entropy")
        before = traces[0]
        op @ vs[0]
        after_first = traces[0]
        assert after_first > before  # the counter does see traces
        for v in vs[1:]:
            op @ v
        op.matmat(Vs[0])
        after_matmat = traces[0]
        for V in Vs[1:]:
            op.matmat(V)
        assert traces[0] == after_matmat, f"{make.__name__}: retraced on repeated products"
        for v in vs:
            op @ v
        assert traces[0] == after_matmat, f"{make.__name__}: retraced on repeated products"
    # The compiled GGN products are right, too.
    close(op @ vs[0], _mlp_ggn_oracle(np_p, x, y) @ np_(vs[0]))


def _mlp_ggn_oracle(np_p, x, y) -> np.ndarray:
    """Jᵀ H_z J with J by central differences of the NumPy forward pass and H_z closed form."""
    shapes = {k: v.shape for k, v in np_p.items()}
    sizes = [np_p[NP_KEY[n]].size for n in MLP_NAMES]
    w0 = np_flatten(np_p, MLP_NAMES)

    def forward(w):
        parts = np.split(w, np.cumsum(sizes)[:-1])
        p = {NP_KEY[n]: part.reshape(shapes[NP_KEY[n]]) for n, part in zip(MLP_NAMES, parts)}
        return (np.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]).ravel()

    eps = 1e-6
    J = np.stack([(forward(w0 + eps * e) - forward(w0 - eps * e)) / (2 * eps) for e in np.eye(w0.size)], axis=1)
    P = softmax(forward(w0).reshape(N, C))
    Hz = np.zeros((N * C, N * C))
    for i in range(N):
        Hz[i * C : (i + 1) * C, i * C : (i + 1) * C] = (np.diag(P[i]) - np.outer(P[i], P[i])) / N
    return J.T @ Hz @ J


# ----------------------------------------------------------------------------- parameters as the user's arrays
@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_compiled_products_take_the_users_arrays(operator: str) -> None:
    """The binding keeps the leaves ``w`` was joined from; products on them match NumPy float64.

    Oracles: the finite-difference Hessian, and the GGN written out with the
    Jacobian from ``jax.jacfwd`` and the softmax Hessian in NumPy.
    """
    params, np_p, x, y = make_mlp(np.float64, "cross_entropy", seed=3)
    make = mh.hessian if operator == "hessian" else mh.ggn
    A = make(mlp_apply, params, data=(jnp.asarray(x), jnp.asarray(y)), loss="cross_entropy")
    binding = A.rows
    leaves = dict(named_leaves(PYTHON_TREES, params)[0])
    assert all(piece is leaves[n] for piece, n in zip(binding.w_pieces, binding.names))
    if operator == "hessian":
        oracle = mlp_oracle(np_p, x, y, "cross_entropy")
    else:
        h = np.tanh(x @ np_p["W1"] + np_p["b1"])
        p = softmax(h @ np_p["W2"] + np_p["b2"])
        J = np_(jax.jacfwd(lambda w: binding.apply(w, jnp.asarray(x)))(binding.w)).reshape(N * C, -1)
        Hz = np.zeros((N * C, N * C))
        for i in range(N):
            Hz[i * C : (i + 1) * C, i * C : (i + 1) * C] = (np.diag(p[i]) - np.outer(p[i], p[i])) / N
        oracle = J.T @ Hz @ J
    V = np.random.default_rng(4).normal(size=(binding.size, 2))
    close(A @ jnp.asarray(V[:, 0]), oracle @ V[:, 0])  # a vector
    close(A @ jnp.asarray(V), oracle @ V)  # a block of rows
    close(np_flatten_tree(A @ binding.to_tree(jnp.asarray(V[:, 1]))), oracle @ V[:, 1])  # a tree
    close(mh.trace(A, method="exact") if operator == "ggn" else np.trace(oracle), np.trace(oracle))


def np_flatten_tree(tree: dict) -> np.ndarray:
    return np.concatenate([np_(leaf).ravel() for _, leaf in named_leaves(PYTHON_TREES, tree)[0]])


def test_a_product_on_the_users_arrays_copies_no_parameter() -> None:
    """The joined pieces meet the binding's split in the compiled program, and XLA keeps neither.

    Checked on XLA's optimized program of a GGN product with a tree (as
    ``G @ tree`` runs it): with the flat vector, each parameter is a
    ``slice`` of it, a copy; with the pieces, no slice is left.
    """
    from multihess._backend import parameters_joined, product_on_parts
    from multihess._ggn import ggn_product

    params, _, x, y = make_mlp(np.float32, "cross_entropy", seed=3)
    batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y))
    G = mh.ggn(mlp_apply, params, data=batch, loss="cross_entropy")
    binding = G.rows
    f = parameters_joined(jnp, functools.partial(ggn_product, G.backend, G.problem.loss, binding.apply))
    program = jax.jit(functools.partial(product_on_parts, jnp, f, checked=False))
    tangent = [jnp.ones_like(piece) for piece in binding.w_pieces]

    def text(w) -> str:
        return program.lower(w, batch, tangent).compile().as_text()

    assert " slice(" in text(binding.w)  # the copies the pieces avoid
    assert " slice(" not in text(binding.w_pieces)
