"""Products with parameter trees: the compiled route on the tree's entries (JAX, TensorFlow), checked against autodiff.

A tree goes into the compiled product as its pieces and comes out in
pieces (``Backend.rowwise``'s ``on_parts``).  The oracles are the
frameworks' own derivatives written by hand in float64: ``jax.hessian`` and
``jax.jacfwd`` with the closed-form softmax Hessian, and nested
``tf.GradientTape`` Jacobians.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from keras_float64 import float64_layers

import multihess as mh

jax.config.update("jax_enable_x64", True)  # before any array exists: float64 oracles need float64 models

N, D, HID, C = 12, 5, 4, 3


def _data(seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "hidden": {"w": rng.normal(size=(D, HID)), "b": rng.normal(size=HID)},
        "head": {"w": rng.normal(size=(HID, C)), "b": rng.normal(size=C)},
    }
    return params, rng.normal(size=(N, D)), rng.integers(0, C, size=N)


def _apply(p: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"])
    return h @ p["head"]["w"] + p["head"]["b"]


def _jax_setup(seed: int = 0):
    params, x, y = _data(seed)
    p = jax.tree.map(jnp.asarray, params)
    return p, jnp.asarray(x), jnp.asarray(y)


def _mean_ce(z: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))


def _jax_oracles(p: dict, x: jax.Array, y: jax.Array) -> tuple[np.ndarray, np.ndarray, object]:
    """Hessian and GGN of the mean cross-entropy in float64, in the order of ``ravel_pytree``."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(p)
    H = np.asarray(jax.hessian(lambda w: _mean_ce(_apply(unravel(w), x), y))(flat))
    J = np.asarray(jax.jacfwd(lambda w: _apply(unravel(w), x))(flat))  # (N, C, P)
    prob = np.asarray(jax.nn.softmax(_apply(p, x)))
    G = np.zeros_like(H)
    for n in range(N):
        hz = (np.diag(prob[n]) - np.outer(prob[n], prob[n])) / N
        G += J[n].T @ hz @ J[n]
    return H, G, ravel_pytree


def _random_tree(p: dict, ravel: object, seed: int) -> tuple[dict, np.ndarray]:
    """A normal vector shaped like the parameters ``p``, and the same in ``ravel_pytree`` order as a flat array."""
    rng = np.random.default_rng(seed)
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p)
    return v, np.asarray(ravel(v)[0])


def _without_flat_route(op: mh.CurvatureOperator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the flat route fail, so that a product that works took the tree's own."""

    def refuse(v: object) -> None:
        raise AssertionError("a tree product on one batch went through the flat vector")

    monkeypatch.setattr(op.cols, "from_tree", refuse)


def test_jax_tree_products_match_autodiff(monkeypatch: pytest.MonkeyPatch) -> None:
    p, x, y = _jax_setup()
    H_true, G_true, ravel = _jax_oracles(p, x, y)
    v, v_flat = _random_tree(p, ravel, seed=1)
    for op, truth in (
        (mh.hessian(_apply, p, data=(x, y), loss="cross_entropy"), H_true),
        (mh.ggn(_apply, p, data=(x, y), loss="cross_entropy"), G_true),
    ):
        flat_product = np.asarray(op @ op.rows.from_tree(v))
        with monkeypatch.context() as patch:
            _without_flat_route(op, patch)
            out = op @ v
        assert jax.tree.structure(out) == jax.tree.structure(p)
        np.testing.assert_allclose(np.asarray(ravel(out)[0]), truth @ v_flat, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(op.rows.from_tree(out)), flat_product, rtol=1e-12, atol=1e-14)


def test_jax_tree_product_of_a_parameter_subset() -> None:
    p, x, y = _jax_setup()
    H_true, _, ravel = _jax_oracles(p, x, y)
    H = mh.hessian(_apply, p, data=(x, y), loss="cross_entropy", params=["head.w", "head.b"])
    rng = np.random.default_rng(2)
    v = {"hidden": None, "head": {"w": jnp.asarray(rng.normal(size=(HID, C))), "b": jnp.asarray(rng.normal(size=C))}}
    out = H @ v
    assert out["hidden"] == {"w": None, "b": None}  # as to_tree answers: None outside params=
    # ravel_pytree order: head.b, head.w, hidden.b, hidden.w; the head block is the first HID·C + C entries.
    head = C + HID * C
    v_full = np.concatenate([np.asarray(v["head"]["b"]), np.asarray(v["head"]["w"]).ravel()])
    expected = H_true[:head, :head] @ v_full
    got = np.concatenate([np.asarray(out["head"]["b"]), np.asarray(out["head"]["w"]).ravel()])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_jax_tree_product_over_several_batches() -> None:
    # Streamed data sums flat products over the batches: the tree goes that way and is still right.
    p, x, y = _jax_setup()
    H_true, _, ravel = _jax_oracles(p, x, y)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    H = mh.hessian(_apply, p, data=batches, loss="cross_entropy")
    v = jax.tree.map(lambda a: jnp.ones_like(a), p)
    np.testing.assert_allclose(np.asarray(ravel(H @ v)[0]), H_true @ np.asarray(ravel(v)[0]), rtol=1e-10)


def test_jax_tree_with_nan_is_refused_and_a_sum_that_overflows_is_not() -> None:
    p, x, y = _jax_setup()
    H = mh.hessian(_apply, p, data=(x, y), loss="cross_entropy")
    bad = jax.tree.map(lambda a: jnp.zeros_like(a), p)
    bad["head"]["b"] = bad["head"]["b"].at[1].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN or inf"):
        H @ bad
    # Every entry finite, but their sum overflows: the first test fails, the exact one passes, and
    # no error is raised (what the product makes of such a vector is its own matter).
    big = jax.tree.map(lambda a: jnp.full_like(a, 1e308), p)
    H @ big
    with pytest.raises(ValueError, match="shape"):
        H @ {"hidden": p["hidden"], "head": {"w": p["head"]["w"], "b": jnp.ones(C + 1)}}
    with pytest.raises(TypeError, match="NumPy"):
        H @ jax.tree.map(np.asarray, p)


def _keras_setup():
    import keras

    params, x, y = _data(3)
    with float64_layers():
        model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(HID, activation="tanh"), keras.layers.Dense(C)])
    model.set_weights([params["hidden"]["w"], params["hidden"]["b"], params["head"]["w"], params["head"]["b"]])
    return model, tf.constant(x), tf.constant(y)


def test_tensorflow_tree_products_match_nested_tapes(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _keras_setup()
    variables = model.trainable_variables
    rng = np.random.default_rng(4)
    v = [tf.constant(rng.normal(size=tuple(w.shape))) for w in variables]

    def loss() -> tf.Tensor:
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x)))

    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = loss()
        g = inner.gradient(value, variables)
    hv = outer.gradient(g, variables, output_gradients=v)  # the Hessian is symmetric: Hᵀv = Hv

    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    with monkeypatch.context() as patch:
        _without_flat_route(H, patch)
        out = H @ v
    assert isinstance(out, list) and len(out) == len(variables)
    for got, want in zip(out, hv):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)

    with tf.GradientTape(persistent=True) as tape:
        z = model(x)
    J = [tape.jacobian(z, w) for w in variables]  # (N, C, *w.shape) each
    jv = sum(tf.tensordot(j, t, axes=len(t.shape)) for j, t in zip(J, v))
    prob = tf.nn.softmax(z)
    hz_jv = prob * (jv - tf.reduce_sum(prob * jv, axis=1, keepdims=True)) / N
    G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    with monkeypatch.context() as patch:
        _without_flat_route(G, patch)
        gv = G @ v
    for got, j in zip(gv, J):
        want = tf.tensordot(hz_jv, j, axes=[[0, 1], [0, 1]])
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)

    bad = [tf.identity(t) for t in v]
    bad[2] = tf.tensor_scatter_nd_update(bad[2], [[0, 0]], tf.constant([np.inf], tf.float64))
    with pytest.raises(ValueError, match="NaN or inf"):
        H @ bad


def test_products_without_the_finiteness_test_match_autodiff(monkeypatch: pytest.MonkeyPatch) -> None:
    # check_finite=False runs the compiled product without its read of the whole vector: same numbers,
    # and a NaN goes through into the product instead of raising.
    p, x, y = _jax_setup()
    H_true, G_true, ravel = _jax_oracles(p, x, y)
    v, v_flat = _random_tree(p, ravel, seed=5)
    for build, truth in ((mh.hessian, H_true), (mh.ggn, G_true)):
        op = build(_apply, p, data=(x, y), loss="cross_entropy", check_finite=False)
        product = op._parts_product()[0]
        monkeypatch.setattr(product, "on_parts", None)  # the checked variant must not be the one called
        with monkeypatch.context() as patch:
            _without_flat_route(op, patch)
            out = op @ v
        np.testing.assert_allclose(np.asarray(ravel(out)[0]), truth @ v_flat, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(op @ ravel(v)[0]), truth @ v_flat, rtol=1e-10, atol=1e-12)
        bad = jax.tree.map(lambda a: a, v)
        bad["hidden"]["w"] = bad["hidden"]["w"].at[0, 0].set(jnp.nan)
        assert np.isnan(np.asarray(ravel(op @ bad)[0])).any()


def test_tensorflow_products_without_the_finiteness_test(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _keras_setup()
    variables = model.trainable_variables
    rng = np.random.default_rng(6)
    v = [tf.constant(rng.normal(size=tuple(w.shape))) for w in variables]
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x)))
        g = inner.gradient(value, variables)
    hv = outer.gradient(g, variables, output_gradients=v)

    H = mh.hessian(model, data=(x, y), loss="cross_entropy", check_finite=False)
    monkeypatch.setattr(H._parts_product()[0], "on_parts", None)
    with monkeypatch.context() as patch:
        _without_flat_route(H, patch)
        out = H @ v
    for got, want in zip(out, hv):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)
    bad = [tf.identity(t) for t in v]
    bad[0] = tf.tensor_scatter_nd_update(bad[0], [[0, 0]], tf.constant([np.nan], tf.float64))
    assert np.isnan(np.concatenate([t.numpy().ravel() for t in H @ bad])).any()
