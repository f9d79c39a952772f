"""The TensorFlow adapter on Keras models, tf.Modules and functions, checked against NumPy float64 oracles.

Oracles are closed forms (linear and softmax regression, a scalar function of
a vector) or central differences of gradients and forward passes written by
hand in NumPy (a 2-layer tanh MLP).  Nothing here compares the library
against itself.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import multihess as mh  # noqa: E402
from multihess._arrays import all_finite, dtype_name, is_floating, one_hot, sigmoid, softplus  # noqa: E402
from multihess.backends.tensorflow_backend import TensorFlowBackend  # noqa: E402

N, D, HID, C = 6, 3, 4, 3


# ----------------------------------------------------------------------------- NumPy oracles
def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def mlp_forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


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


def make_data(loss: str, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = {
        "W1": rng.normal(size=(D, HID)),
        "b1": rng.normal(size=HID),
        "W2": rng.normal(size=(HID, C)),
        "b2": rng.normal(size=C),
    }
    x = rng.normal(size=(N, D))
    y = rng.integers(0, C, size=N) if loss == "cross_entropy" else rng.normal(size=(N, C))
    return p, x, y


class Flat:
    """A NumPy parameter dict as one flat vector in a given key order."""

    def __init__(self, p: dict[str, np.ndarray], order: list[str]) -> None:
        self.p, self.order = p, order
        self.shapes = {k: p[k].shape for k in order}
        self.sizes = [p[k].size for k in order]
        bounds = np.cumsum([0] + self.sizes)
        self.slices = {k: slice(bounds[i], bounds[i + 1]) for i, k in enumerate(order)}
        self.w = np.concatenate([np.ravel(p[k]) for k in order])

    def flatten(self, tree: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.ravel(tree[k]) for k in self.order])

    def unflatten(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return {k: w[self.slices[k]].reshape(self.shapes[k]) for k in self.order}


def fd_hessian(grad: Callable[[np.ndarray], np.ndarray], w: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Central differences of an analytic gradient, column by column (symmetrized)."""
    cols = []
    for e in np.eye(w.size) * eps:
        cols.append((grad(w + e) - grad(w - e)) / (2 * eps))
    H = np.stack(cols, axis=1)
    return 0.5 * (H + H.T)


def hessian_oracle(p, x, y, loss: str, order: list[str]) -> np.ndarray:
    f = Flat(p, order)
    return fd_hessian(lambda w: f.flatten(mlp_grad(f.unflatten(w), x, y, loss)), f.w)


def ggn_oracle(p, x, y, loss: str, order: list[str]) -> np.ndarray:
    """Jᵀ H_z J with J by central differences of the NumPy forward pass and H_z in closed form."""
    J = forward_jacobian(p, x, order)
    if loss == "cross_entropy":
        P = softmax(mlp_forward(p, x))
        Hz = np.zeros((N * C, N * C))
        for i in range(N):
            Hz[i * C : (i + 1) * C, i * C : (i + 1) * C] = (np.diag(P[i]) - np.outer(P[i], P[i])) / N
    else:
        Hz = 2.0 * np.eye(N * C) / (N * C)
    return J.T @ Hz @ J


def forward_jacobian(p, x, order: list[str]) -> np.ndarray:
    """``∂ vec(z) / ∂ w`` of the NumPy MLP by central differences: shape ``(N·C, P)``."""
    f = Flat(p, order)
    eps = 1e-6
    cols = [
        (mlp_forward(f.unflatten(f.w + e), x) - mlp_forward(f.unflatten(f.w - e), x)).ravel() / (2 * eps)
        for e in np.eye(f.w.size) * eps
    ]
    return np.stack(cols, axis=1)


def np_(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def close(a, b, rtol: float = 1e-7) -> None:
    a, b = np_(a), np_(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1.0, np.abs(b).max()))


# ----------------------------------------------------------------------------- models
KERAS_ORDER = ["W1", "b1", "W2", "b2"]  # trainable_variables: kernel, bias of each layer
NEST_ORDER = ["W1", "W2", "b1", "b2"]  # tf.nest sorts dict keys


def make_keras(p: dict[str, np.ndarray], dtype: str = "float64") -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((D,), dtype=dtype),
            keras.layers.Dense(HID, activation="tanh", dtype=dtype, name="hidden"),
            keras.layers.Dense(C, dtype=dtype, name="out"),
        ],
        name="mlp",
    )
    model.set_weights([p[k] for k in KERAS_ORDER])
    return model


def mlp_apply(params: dict, x: tf.Tensor) -> tf.Tensor:
    return tf.tanh(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


def tf_dict(p: dict[str, np.ndarray], dtype=tf.float64) -> dict[str, tf.Tensor]:
    return {k: tf.constant(v, dtype=dtype) for k, v in p.items()}


# ----------------------------------------------------------------------------- Hessian and GGN of a Keras model
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_keras_mlp_hessian_and_ggn_match_oracles(loss) -> None:
    p, x, y = make_data(loss)
    model = make_keras(p)
    H = mh.hessian(model, data=(x, y), loss=loss)
    assert H.backend.name == "tensorflow" and H.shape == (31, 31) and H.dtype == tf.float64
    assert H.rows.names == ["mlp/hidden/kernel", "mlp/hidden/bias", "mlp/out/kernel", "mlp/out/bias"]
    oracle = hessian_oracle(p, x, y, loss, KERAS_ORDER)
    close(H.dense(), oracle)
    rng = np.random.default_rng(1)
    v = rng.normal(size=31)
    close(H @ tf.constant(v), oracle @ v)
    V = rng.normal(size=(31, 3))
    close(H.matmat(tf.constant(V)), oracle @ V)

    G = mh.ggn(model, data=(x, y), loss=loss)
    g_oracle = ggn_oracle(p, x, y, loss, KERAS_ORDER)
    close(G.dense(), g_oracle, rtol=1e-6)  # J from differences of the forward pass: ~1e-9 absolute error
    close(G @ tf.constant(v), g_oracle @ v, rtol=1e-6)
    # Nothing of the user's model was touched by the products.
    for var, key in zip(model.trainable_variables, KERAS_ORDER):
        np.testing.assert_array_equal(var.numpy(), p[key])


def test_keras_tree_in_tree_out_and_subsets() -> None:
    p, x, y = make_data("cross_entropy")
    model = make_keras(p)
    oracle = hessian_oracle(p, x, y, "cross_entropy", KERAS_ORDER)
    s = Flat(p, KERAS_ORDER).slices
    kw = dict(data=(x, y), loss="cross_entropy")
    H = mh.hessian(model, **kw)
    rng = np.random.default_rng(2)
    v_np = {k: rng.normal(size=p[k].shape) for k in KERAS_ORDER}
    out = H @ [tf.constant(v_np[k]) for k in KERAS_ORDER]
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [p[k].shape for k in KERAS_ORDER]
    expected = oracle @ Flat(v_np, KERAS_ORDER).w
    for o, k in zip(out, KERAS_ORDER):
        close(o, expected[s[k]].reshape(p[k].shape))

    last = np.r_[s["W2"], s["b2"]]
    first = np.r_[s["W1"], s["b1"]]
    block = mh.hessian(model, params="mlp/out/*", **kw)
    close(block.dense(), oracle[np.ix_(last, last)])
    cross = mh.hessian(model, params="mlp/hidden/*", col_params="mlp/out/*", **kw)
    assert cross.shape == (16, 15)
    close(cross.dense(), oracle[np.ix_(first, last)])
    by_variable = mh.hessian(model, params=[model.layers[1].kernel], **kw)
    close(by_variable.dense(), oracle[s["W2"], s["W2"]])

    # Subset trees are full lists with None outside params=.
    u = rng.normal(size=15)
    tree = block.rows.to_tree(tf.constant(u))
    assert tree[0] is None and tree[1] is None and tuple(tree[2].shape) == (HID, C)
    res = block @ tree
    assert res[0] is None and res[1] is None
    close(tf.concat([tf.reshape(res[2], [-1]), res[3]], 0), oracle[np.ix_(last, last)] @ u)
    with pytest.raises(ValueError, match="outside params="):
        block @ [tf.ones_like(t) for t in model.trainable_variables]

    # The last layer's GGN block is its Hessian block: z is linear in it.
    close(mh.ggn(model, params="mlp/out/*", **kw).dense(), oracle[np.ix_(last, last)], rtol=1e-6)


def test_float32_keras_model_within_float32_tolerance() -> None:
    p, x, y = make_data("cross_entropy", seed=3)
    p32 = {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}
    model = make_keras(p32, dtype="float32")
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    dense = H.dense()
    assert dense.dtype == tf.float32 and H.rows.w.dtype == tf.float32
    x32 = x.astype(np.float32).astype(np.float64)  # the model sees the data rounded to float32
    close(dense, hessian_oracle(p32, x32, y, "cross_entropy", KERAS_ORDER), rtol=1e-5)
    G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    close(G.dense(), ggn_oracle(p32, x32, y, "cross_entropy", KERAS_ORDER), rtol=1e-5)


def test_inference_layers_are_deterministic_and_untouched() -> None:
    # Dropout is off and BatchNormalization uses its moving statistics (training=False); the moving
    # statistics are snapshots, so the products change nothing in the model.
    rng = np.random.default_rng(4)
    model = keras.Sequential(
        [
            keras.Input((D,), dtype="float64"),
            keras.layers.Dense(HID, dtype="float64"),
            keras.layers.BatchNormalization(dtype="float64"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(C, dtype="float64"),
        ]
    )
    bn = model.layers[1]
    bn.moving_mean.assign(rng.normal(size=HID))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=HID))
    before = [v.numpy().copy() for v in model.variables]
    x, y = rng.normal(size=(N, D)), rng.normal(size=(N, C))
    H = mh.hessian(model, data=(x, y), loss="mse")
    H.dense()
    for v, b in zip(model.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    # Every layer is affine in inference mode: for the last kernel, H = 2/(N C) · hᵀh ⊗ I with h the
    # (fixed) input of the last layer, computed here in NumPy.
    W1, b1 = (v.numpy() for v in model.layers[0].trainable_variables)
    gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
    h = (x @ W1 + b1 - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + bn.epsilon) * gamma + beta
    last = mh.hessian(model, data=(x, y), loss="mse", params=[model.layers[3].kernel])
    close(last.dense(), np.kron(h.T @ h, np.eye(C)) * 2.0 / (N * C))


# ----------------------------------------------------------------------------- functions of parameter structures
def test_function_of_a_dict_of_tensors() -> None:
    p, x, y = make_data("cross_entropy", seed=5)
    params = tf_dict(p)
    H = mh.hessian(mlp_apply, params, data=(x, y), loss="cross_entropy")
    assert H.rows.names == NEST_ORDER
    oracle = hessian_oracle(p, x, y, "cross_entropy", NEST_ORDER)
    close(H.dense(), oracle)
    # A dict in, the same dict out.
    rng = np.random.default_rng(6)
    v_np = {k: rng.normal(size=p[k].shape) for k in p}
    out = H @ tf_dict(v_np)
    assert isinstance(out, dict) and set(out) == set(p)
    expected = oracle @ Flat(v_np, NEST_ORDER).w
    s = Flat(p, NEST_ORDER).slices
    for k in p:
        close(out[k], expected[s[k]].reshape(p[k].shape))
    # A tf.function-wrapped apply function is a TensorFlow model too.
    compiled = mh.hessian(tf.function(mlp_apply), params, data=(x, y), loss="cross_entropy")
    only_w1 = np.r_[v_np["W1"].ravel(), np.zeros(19)]  # W1 comes first in tf.nest order
    close(compiled @ tf.constant(only_w1), oracle[:, s["W1"]] @ v_np["W1"].ravel())
    G = mh.ggn(mlp_apply, params, data=(x, y), loss="cross_entropy", params=["W2", "b2"])
    last = np.r_[s["W2"], s["b2"]]
    close(G.dense(), oracle[np.ix_(last, last)], rtol=1e-6)
    sub = G @ G.rows.to_tree(tf.ones(15, tf.float64))
    assert sub["W1"] is None and tuple(sub["W2"].shape) == (HID, C)


def test_nested_structure_with_variables_and_non_array_leaves() -> None:
    p, x, y = make_data("mse", seed=7)
    params = {"layers": [(tf.Variable(p["W1"]), tf.Variable(p["b1"])), (tf.constant(p["W2"]), tf.constant(p["b2"]))]}
    params["scale"] = 1.0  # a Python number: a fixed leaf, not a parameter

    def apply(q, xb):
        (w1, b1), (w2, b2) = q["layers"]
        return q["scale"] * (tf.tanh(xb @ w1 + b1) @ w2 + b2)

    H = mh.hessian(apply, params, data=(x, y), loss="mse")
    assert H.rows.names == ["layers.0.0", "layers.0.1", "layers.1.0", "layers.1.1"]
    close(H.dense(), hessian_oracle(p, x, y, "mse", KERAS_ORDER))
    out = H @ params
    assert out["scale"] == 1.0 and isinstance(out["layers"][1], tuple)


def test_scalar_function_hessian_with_respect_to_inputs() -> None:
    rng = np.random.default_rng(8)
    a, w = rng.normal(size=5), rng.normal(size=5)
    a_t = tf.constant(a)

    def fn(v):
        return tf.reduce_sum(v**4) / 4 + 0.5 * tf.tensordot(a_t, v, 1) ** 2 + tf.reduce_sum(tf.sin(v))

    H = mh.hessian(fn, tf.constant(w))
    assert H.rows.names == ["params"]
    close(H.dense(), np.diag(3 * w**2 - np.sin(w)) + np.outer(a, a))
    with pytest.raises(ValueError, match="GGN needs model outputs and a loss"):
        mh.ggn(fn, tf.constant(w))


def test_linear_and_softmax_regression_closed_forms() -> None:
    rng = np.random.default_rng(9)
    X, Y = rng.normal(size=(10, 4)), rng.normal(size=(10, 1))
    w = tf.constant(rng.normal(size=(4, 1)))
    data = [(X[:7], Y[:7]), (X[7:], Y[7:])]  # unequal batches: the mean weights them by size
    close(mh.hessian(lambda q, x: x @ q, w, data=data, loss="mse").dense(), 2.0 * X.T @ X / 10)
    close(mh.ggn(lambda q, x: x @ q, w, data=data, loss="mse", reduction="sum").dense(), 2.0 * X.T @ X)

    # A Python value in the batch is part of the compiled function's cache key, not a traced input.
    flagged = mh.hessian(
        lambda q, xb: xb[0] @ q * (2.0 if xb[1] == "double" else 1.0), w, data=((X, "double"), Y), loss="mse"
    )
    close(flagged.dense(), 4.0 * 2.0 * X.T @ X / 10)

    X, y, W = rng.normal(size=(N, D)), rng.integers(0, C, size=N), rng.normal(size=(D, C))
    P = softmax(X @ W)
    # vec(W) is row-major: G = Σ_i x_i x_iᵀ ⊗ (diag(p_i) − p_i p_iᵀ) / N, and H = G since z is linear in W.
    oracle = sum(np.kron(np.outer(X[i], X[i]), np.diag(P[i]) - np.outer(P[i], P[i])) for i in range(N)) / N
    G = mh.ggn(lambda q, x: x @ q["W"], {"W": tf.constant(W)}, data=(X, y), loss="cross_entropy")
    close(G.dense(), oracle)
    close(mh.hessian(lambda q, x: x @ q["W"], {"W": tf.constant(W)}, data=(X, y), loss="cross_entropy").dense(), oracle)


@pytest.mark.parametrize("onednn", [False, True])
def test_dense_hessian_is_vectorized_unless_onednn_meets_einsum(monkeypatch, onednn: bool) -> None:
    """``dense()`` in one compiled call: ``pfor`` over each chunk, a loop where oneDNN would see batched matmuls."""
    from multihess.backends import tensorflow_backend

    monkeypatch.setattr(tensorflow_backend, "_onednn_kernels_on", lambda: onednn)
    rng = np.random.default_rng(11)
    X, y, W = rng.normal(size=(N, D)), rng.integers(0, C, size=N), rng.normal(size=(D, C))
    P = softmax(X @ W)
    oracle = sum(np.kron(np.outer(X[i], X[i]), np.diag(P[i]) - np.outer(P[i], P[i])) for i in range(N)) / N
    models = {"matmul": lambda q, x: x @ q["W"], "einsum": lambda q, x: tf.einsum("nd,dc->nc", x, q["W"])}
    for name, apply in models.items():
        H = mh.hessian(apply, {"W": tf.constant(W)}, data=(X, y), loss="cross_entropy")
        for chunk_size in (1, 2, 5, 64):  # n = 9: one row, chunks that do not divide it, and one chunk
            close(H.dense(chunk_size=chunk_size), oracle)
        assert H._hvp.dense.vectorized is not (onednn and name == "einsum")


@pytest.mark.parametrize("modes", [dict(), dict(hvp_mode="forward"), dict(jvp_mode="accumulator")])
def test_dense_ggn_and_forward_mode_hessian_of_a_keras_model(modes) -> None:
    """Products through ``rowwise`` build ``dense()`` as one Jacobian in the vector: a while loop, never pfor.

    pfor gave wrong columns without an error for a Keras MLP's GGN (a tape inside a tape), so the oracle is
    NumPy float64 and the model Keras, with chunks of one row, some rows, and every row.
    """
    p, x, y = make_data("cross_entropy", seed=13)
    model = make_keras(p)
    backend = TensorFlowBackend(**modes)
    G = mh.ggn(model, data=(x, y), loss="cross_entropy", backend=backend)
    H = mh.hessian(model, data=(x, y), loss="cross_entropy", backend=backend)
    assert callable(getattr(G._product, "dense", None))  # the compiled variant, not the chunk loop
    for chunk_size in (1, 7, 64):
        close(G.dense(chunk_size=chunk_size), ggn_oracle(p, x, y, "cross_entropy", KERAS_ORDER), rtol=1e-6)
        close(H.dense(chunk_size=chunk_size), hessian_oracle(p, x, y, "cross_entropy", KERAS_ORDER))


# ----------------------------------------------------------------------------- linearization and per-sample products
def test_linearize_and_per_sample_products() -> None:
    p, x, _ = make_data("mse", seed=16)
    b = TensorFlowBackend()
    params = tf_dict(p)
    binding = b.bind(mlp_apply, params, NEST_ORDER)
    J = forward_jacobian(p, x, NEST_ORDER)  # (N·C, 31), rows sample-major
    rng = np.random.default_rng(17)

    lin = b.linearize(binding.apply, binding.w, tf.constant(x))
    close(lin.out, mlp_forward(p, x), rtol=1e-12)
    V, U = rng.normal(size=(3, 31)), rng.normal(size=(3, N, C))
    close(lin.jvp_batched(tf.constant(V)), (J @ V.T).T.reshape(3, N, C), rtol=1e-8)
    close(lin.vjp_batched(tf.constant(U)), U.reshape(3, -1) @ J, rtol=1e-8)
    close(lin.jvp(tf.constant(V[0])), (J @ V[0]).reshape(N, C), rtol=1e-8)

    # Per-sample products: out[k, n] = J_nᵀ U[k, n] with J_n the rows of sample n.
    J_n = J.reshape(N, C, 31)
    K = 2
    Uk = rng.normal(size=(K, N, C))
    expected = np.einsum("knc,ncp->knp", Uk, J_n)
    close(b.per_sample_vjp(binding.apply, binding.w, tf.constant(x), tf.constant(Uk)), expected, rtol=1e-8)
    squares = b.per_sample_squares(binding.apply, per_cotangent=True)
    # A small memory budget splits the samples into chunks; the sums must not depend on it.
    for budget in (2**30, 3 * 31 * 8):
        close(squares(binding.w, tf.constant(x), lambda z: tf.constant(Uk), budget), (expected**2).sum(1), rtol=1e-8)


# ----------------------------------------------------------------------------- tf.Module
class Affine(tf.Module):
    def __init__(self, w: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.w, self.b = tf.Variable(w), tf.Variable(b)

    def __call__(self, x):
        return x @ self.w + self.b


class ModuleMLP(tf.Module):
    def __init__(self, p: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.layers = [Affine(p["W1"], p["b1"]), Affine(p["W2"], p["b2"])]
        self.temperature = tf.Variable(1.0, dtype=tf.float64, trainable=False)

    @tf.function
    def __call__(self, x):
        return self.layers[1](tf.tanh(self.layers[0](x))) / self.temperature


def test_tf_module_is_evaluated_without_being_modified() -> None:
    p, x, y = make_data("cross_entropy", seed=10)
    module = ModuleMLP(p)
    H = mh.hessian(module, data=(x, y), loss="cross_entropy")
    assert H.rows.names == ["layers.0.b", "layers.0.w", "layers.1.b", "layers.1.w"]
    # The flat vector and the list trees follow trainable_variables.
    named = TensorFlowBackend().named_parameters(module, None)
    assert [id(v) for _, v in named] == [id(v) for v in module.trainable_variables]
    close(H.dense(), hessian_oracle(p, x, y, "cross_entropy", ["b1", "W1", "b2", "W2"]))
    out = H @ [tf.ones_like(v) for v in module.trainable_variables]
    assert isinstance(out, list) and len(out) == 4
    assert all(isinstance(v, tf.Variable) for v in (module.layers[0].w, module.layers[1].b))
    np.testing.assert_array_equal(module.layers[0].w.numpy(), p["W1"])

    class Counting(Affine):
        def __call__(self, x):
            self.b.assign_add(tf.ones_like(self.b))  # a side effect on a variable
            return super().__call__(x)

    with pytest.raises(TypeError, match="tf.Variable method"):
        mh.hessian(Counting(p["W1"], p["b1"]), data=(x, np.zeros((N, HID))), loss="mse")


# ----------------------------------------------------------------------------- product modes and compilation
@pytest.mark.parametrize("modes", [dict(hvp_mode="forward"), dict(jvp_mode="accumulator")])
def test_alternative_product_modes_match_oracles(modes) -> None:
    p, x, y = make_data("cross_entropy", seed=11)
    params = tf_dict(p)
    backend = TensorFlowBackend(**modes)
    V = np.random.default_rng(12).normal(size=(31, 2))
    H = mh.hessian(mlp_apply, params, data=(x, y), loss="cross_entropy", backend=backend)
    close(H.matmat(tf.constant(V)), hessian_oracle(p, x, y, "cross_entropy", NEST_ORDER) @ V)
    G = mh.ggn(mlp_apply, params, data=(x, y), loss="cross_entropy", backend=backend)
    close(G.matmat(tf.constant(V)), ggn_oracle(p, x, y, "cross_entropy", NEST_ORDER) @ V, rtol=1e-6)
    binding = backend.bind(mlp_apply, params, NEST_ORDER)
    lin = backend.linearize(binding.apply, binding.w, tf.constant(x))
    J = forward_jacobian(p, x, NEST_ORDER)
    close(lin.jvp_batched(tf.constant(V.T)), (J @ V).T.reshape(2, N, C), rtol=1e-8)
    with pytest.raises(ValueError, match="hvp_mode must be one of"):
        TensorFlowBackend(hvp_mode="sideways")


def test_xla_compiled_products_match_closed_form() -> None:
    rng = np.random.default_rng(15)
    X, y, W = rng.normal(size=(N, D)), rng.integers(0, C, size=N), rng.normal(size=(D, C))
    P = softmax(X @ W)
    oracle = sum(np.kron(np.outer(X[i], X[i]), np.diag(P[i]) - np.outer(P[i], P[i])) for i in range(N)) / N
    backend = TensorFlowBackend(jit_compile=True)
    # 21 vectors: XLA's batched products unroll 16 rows per program, so this takes two programs.
    V = rng.normal(size=(D * C, 21))
    for make in (mh.hessian, mh.ggn):
        op = make(lambda q, x: x @ q, tf.constant(W), data=(X, y), loss="cross_entropy", backend=backend)
        close(op.dense(), oracle)
        close(op.matmat(tf.constant(V)), oracle @ V)
        close(op._quadratic_forms(tf.constant(V.T)), np.einsum("ik,ij,jk->k", V, oracle, V))


def _pooling_net(dtype: str) -> keras.Model:
    L = keras.layers
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16, 16, 1), dtype=dtype),
            L.Conv2D(4, 3, padding="same", activation="relu", dtype=dtype),
            L.MaxPool2D(2, dtype=dtype),
            L.Conv2D(6, 3, activation="relu", dtype=dtype),
            L.MaxPool2D(2, dtype=dtype),
            L.Flatten(dtype=dtype),
            L.Dense(C, dtype=dtype),
        ]
    )


def test_xla_is_not_used_for_second_derivatives_of_max_pooling() -> None:
    # XLA's max-pooling second derivative put this product 3 % off in float32; the backend must notice
    # it in the traced program, say so, and run it without XLA.
    model, twin = _pooling_net("float32"), _pooling_net("float64")
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    rng = np.random.default_rng(21)
    x, y = rng.normal(size=(32, 16, 16, 1)), rng.integers(0, C, size=32)
    v = [rng.normal(size=tuple(w.shape)) for w in model.trainable_variables]

    def nested_tapes(net: keras.Model, dtype: tf.DType) -> np.ndarray:  # float64 oracle, no XLA
        variables = net.trainable_variables
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                z = net(tf.constant(x, dtype))
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(y), z))
            g = inner.gradient(loss, variables)
        hv = outer.gradient(g, variables, output_gradients=[tf.constant(t, dtype) for t in v])
        return np.concatenate([t.numpy().ravel() for t in hv])

    expected = nested_tapes(twin, tf.float64)
    H = mh.hessian(
        model, data=(x.astype(np.float32), y), loss="cross_entropy", backend=TensorFlowBackend(jit_compile=True)
    )
    with pytest.warns(RuntimeWarning, match="max pooling"):
        got = H @ [tf.constant(t, tf.float32) for t in v]
    got = np.concatenate([t.numpy().ravel() for t in got])
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def test_repeated_products_never_retrace() -> None:
    p, x, y = make_data("cross_entropy", seed=13)
    params = tf_dict(p)
    traces = [0]

    def counted(q, xb):
        traces[0] += 1  # Python side effect: runs only while TensorFlow traces (or evaluates eagerly)
        return mlp_apply(q, xb)

    rng = np.random.default_rng(14)
    vs = [tf.constant(rng.normal(size=31)) for _ in range(3)]
    Vs = [tf.constant(rng.normal(size=(31, 3))) for _ in range(3)]
    for make in (mh.hessian, mh.ggn):
        op = make(counted, params, data=(x, y), loss="cross_entropy")
        before = traces[0]
        op @ vs[0]
        op.matmat(Vs[0])
        assert traces[0] > before  # the counter does see traces
        settled = traces[0]
        for v, V in zip(vs, Vs):
            op @ v
            op.matmat(V)
        assert traces[0] == settled, f"{make.__name__}: retraced on repeated products"
    oracle = ggn_oracle(p, x, y, "cross_entropy", NEST_ORDER)
    close(op.matmat(Vs[1]), oracle @ np_(Vs[1]), rtol=1e-6)


# ----------------------------------------------------------------------------- detection, conversion, bad input
def test_owns_conversion_and_array_ops() -> None:
    b = TensorFlowBackend()
    model = make_keras(make_data("mse")[0])
    assert b.owns(tf.ones(2)) and b.owns(tf.Variable(1.0)) and b.owns(model) and b.owns(model.trainable_variables[0])
    assert b.owns({"a": tf.ones(2), "b": [tf.ones(1), 3]}) and b.owns(ModuleMLP(make_data("mse")[0]))
    assert not b.owns(np.ones(2)) and not b.owns({"a": tf.ones(2), "b": np.ones(1)}) and not b.owns([1.0, 2.0])
    like = tf.ones(2, dtype=tf.float32)
    floats, labels = b.asarray(np.arange(3.0), like), b.asarray(np.arange(3), like)
    assert floats.dtype == tf.float32 and floats.device == like.device
    assert labels.dtype.is_integer and b.to_numpy(labels).tolist() == [0, 1, 2]
    xp = b.xp
    assert dtype_name(like) == "float32" and is_floating(xp, like) and not is_floating(xp, labels)
    assert (
        all_finite(xp, like)
        and not all_finite(xp, tf.constant([1.0, np.nan]))
        and not all_finite(xp, tf.constant([np.inf]))
    )
    assert all_finite(xp, tf.constant([1e38] * 9))  # the sum overflows, the entries do not
    a = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(b.to_numpy(xp.moveaxis(tf.constant(a), 1, -1)), np.moveaxis(a, 1, -1))
    np.testing.assert_array_equal(b.to_numpy(one_hot(b, tf.constant([2, 0]), 3, like)), np.eye(3)[[2, 0]])
    z = np.array([-800.0, -3.0, 0.0, 2.5, 800.0])
    np.testing.assert_allclose(b.to_numpy(softplus(xp, tf.constant(z))), np.logaddexp(z, 0.0), rtol=1e-15)
    np.testing.assert_allclose(b.to_numpy(sigmoid(xp, tf.constant(z))), 0.5 * (1 + np.tanh(z / 2)), rtol=1e-15)


def test_objects_of_other_frameworks_are_not_owned() -> None:
    b = TensorFlowBackend()
    torch = pytest.importorskip("torch")
    assert not b.owns(torch.ones(2)) and not b.owns(torch.nn.Linear(2, 2)) and not b.owns({"w": torch.ones(2)})
    jnp = pytest.importorskip("jax.numpy")
    assert not b.owns(jnp.ones(2)) and not b.owns([jnp.ones(2)])


def test_bad_vectors() -> None:
    p, x, y = make_data("cross_entropy")
    model = make_keras(p)
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"shape \(31,\)"):
        H @ tf.ones(30, dtype=tf.float64)
    with pytest.raises(TypeError, match="NumPy"):
        H @ np.ones(31)
    with pytest.raises(TypeError, match="dtype float32"):
        H @ tf.ones(31)
    with pytest.raises(ValueError, match="NaN"):
        H @ tf.constant([np.nan] + [0.0] * 30, dtype=tf.float64)
    good = [tf.ones(p[k].shape, tf.float64) for k in KERAS_ORDER]
    with pytest.raises(ValueError, match=r"v\['mlp/hidden/kernel'\] has shape"):
        H @ ([tf.ones((HID, D), tf.float64)] + good[1:])
    with pytest.raises(ValueError, match="list of 3 entries"):
        H @ good[:3]
    with pytest.raises(TypeError, match="NumPy"):
        H @ ([np.ones((D, HID))] + good[1:])
    F = mh.hessian(mlp_apply, tf_dict(p), data=(x, y), loss="cross_entropy")
    with pytest.raises(ValueError, match="parameters are"):
        F @ {"W1": good[0], "b1": good[1]}
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="two frameworks"):
        H @ torch.ones(31, dtype=torch.float64)
    with pytest.raises(TypeError, match="two frameworks"):
        F @ {**tf_dict(p), "W1": torch.ones(D, HID, dtype=torch.float64)}
    with pytest.raises(TypeError, match="two frameworks"):
        mh.hessian(model, data=(torch.as_tensor(x), torch.as_tensor(y)), loss="cross_entropy")


def test_unbuilt_keras_model_is_a_clear_error() -> None:
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        mh.hessian(model, data=(np.ones((2, 3)), np.ones((2, 2))), loss="mse")


ATTENTION_GGN_DIAGONAL = r"""
import numpy as np, tensorflow as tf, keras, multihess as mh

keras.utils.set_random_seed(0)
inp = keras.Input((5, 8))
h = inp + keras.layers.MultiHeadAttention(2, 4)(inp, inp)
h = keras.layers.LayerNormalization()(h)
h = keras.layers.GlobalAveragePooling1D()(h)
model = keras.Model(inp, keras.layers.Dense(4)(h))
rng = np.random.default_rng(0)
x = tf.constant(rng.normal(size=(6, 5, 8)).astype("float32"))
y = tf.constant(rng.integers(0, 4, 6))
got = mh.diagonal(mh.ggn(model, data=(x, y), loss="cross_entropy"), method="exact").value.numpy()

# Oracle: diag(Σ_n J_nᵀ H_z,n J_n), per-sample Jacobians from the tape, one sample at a time.
expected = 0.0
for n in range(6):
    with tf.GradientTape(persistent=True) as tape:
        z = model(x[n : n + 1])[0]
    blocks = tape.jacobian(z, model.trainable_variables, experimental_use_pfor=False)
    J = np.concatenate([np.reshape(j.numpy(), (4, -1)) for j in blocks], axis=1).astype(np.float64)
    p = tf.nn.softmax(tf.cast(z, tf.float64)).numpy()
    Hz = (np.diag(p) - np.outer(p, p)) / 6
    expected = expected + np.einsum("cp,cd,dp->p", J, Hz, J)
err = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
assert err < 1e-4, err  # float32 products against float64 sums of the same float32 Jacobians
print("relative error", err)
"""


def run_under_onednn(script: str) -> None:
    """Run ``script`` in a process of its own with oneDNN's kernels on (their crashes take the process down)."""
    import subprocess
    import sys

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # oneDNN's default: on
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "relative error" in result.stdout


def test_exact_ggn_diagonal_of_attention_under_onednn() -> None:
    """Vectorized per-sample gradients through batched matmuls aborted the process under oneDNN: run it alone."""
    run_under_onednn(ATTENTION_GGN_DIAGONAL)


RESNET_GGN_DIAGONAL = r"""
import numpy as np, tensorflow as tf, keras, multihess as mh

keras.utils.set_random_seed(0)
L = keras.layers
inp = keras.Input((16, 16, 3))
x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(inp)))
h = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, 2, padding="same", use_bias=False)(x)))
h = L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(h))
skip = L.BatchNormalization()(L.Conv2D(16, 1, 2, use_bias=False)(x))  # strided 1x1 projection
h = L.ReLU()(L.Add()([h, skip]))
model = keras.Model(inp, L.Dense(5)(L.GlobalAveragePooling2D()(h)))
rng = np.random.default_rng(0)
for layer in model.layers:  # running statistics far from 0 and 1
    if isinstance(layer, L.BatchNormalization):
        c = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(size=c).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=c).astype("float32"))
N = 24
x = tf.constant(rng.normal(size=(N, 16, 16, 3)).astype("float32"))
y = tf.constant(rng.integers(0, 5, N))
got = mh.diagonal(mh.ggn(model, data=(x, y), loss="cross_entropy"), method="exact").value
got = np.concatenate([np.ravel(g.numpy()) for g in got])

# Oracle: diag(Σ_n J_nᵀ H_z,n J_n) from the Jacobian of the whole batch's outputs (in inference mode
# sample n's outputs depend on sample n alone), in float64 from the float32 Jacobian.
with tf.GradientTape(persistent=True) as tape:
    z = model(x, training=False)
blocks = tape.jacobian(z, model.trainable_variables, experimental_use_pfor=False)
J = np.concatenate([np.reshape(j.numpy(), (N, 5, -1)) for j in blocks], axis=2).astype(np.float64)
p = tf.nn.softmax(tf.cast(z, tf.float64)).numpy()
expected = 0.0
for n in range(N):
    Hz = (np.diag(p[n]) - np.outer(p[n], p[n])) / N
    expected = expected + np.einsum("cp,cd,dp->p", J[n], Hz, J[n])
err = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
assert err < 1e-4, err
print("relative error", err)
"""


def test_exact_ggn_diagonal_of_a_resnet_under_onednn() -> None:
    """Gradients of convolutions and batch norms on a batch of one sample crashed the process under oneDNN."""
    run_under_onednn(RESNET_GGN_DIAGONAL)


def test_variance_by_moments_has_its_exact_hessian() -> None:
    """tf.nn.moments stops the gradient through the mean; the products differentiate through it."""
    x = np.array([1.0, 2.0, 4.0, -0.5])
    n = len(x)
    H = mh.hessian(lambda t: tf.nn.moments(t, [0])[1], tf.constant(x)).dense().numpy()
    np.testing.assert_allclose(H, (2 / n) * (np.eye(n) - np.ones((n, n)) / n), rtol=1e-12, atol=1e-15)
    mean, variance = tf.nn.moments(tf.constant(x), [0])  # the user's tf.nn.moments is back afterwards
    assert float(variance) == pytest.approx(np.var(x)) and tf.nn.moments.__module__.startswith("tensorflow")


def test_subclassed_keras_model_whose_call_takes_no_training_flag() -> None:
    class TwoLayers(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = keras.layers.Dense(3, activation="tanh", dtype="float64")
            self.out = keras.layers.Dense(2, dtype="float64")

        def call(self, x):  # Keras accepts call() without training=
            return self.out(self.hidden(x))

    rng = np.random.default_rng(0)
    x, y = tf.constant(rng.normal(size=(5, 4))), tf.constant(rng.integers(0, 2, 5))
    model = TwoLayers()
    model(x)
    W1, b1 = (v.numpy() for v in model.hidden.weights)
    W2, b2 = (v.numpy() for v in model.out.weights)
    p = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
    expected = hessian_oracle(p, x.numpy(), y.numpy(), "cross_entropy", ["W1", "b1", "W2", "b2"])
    H = mh.hessian(model, data=(x, y), loss="cross_entropy").dense().numpy()
    np.testing.assert_allclose(H, expected, rtol=1e-6, atol=1e-8)
