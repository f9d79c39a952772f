"""Hutchinson's trace through one compiled call per chunk (JAX, TensorFlow), against dense float64 Hessians.

The compiled product's ``forms`` widens the probes, multiplies them with
their products and sums in one call.  The oracle is ``zᵀ H z`` for the very
probes multihess draws (``draw_probes`` with the operator's ``probe_order``),
with ``H`` from the framework's own autodiff (``jax.hessian``, nested
``tf.GradientTape`` Jacobians) in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from keras_float64 import float64_layers

import multihess as mh
from multihess import _probes
from multihess._probes import draw_probes, probe_order

jax.config.update("jax_enable_x64", True)  # before any array exists: float64 oracles need float64 models

N, D, HID, C = 10, 4, 5, 3
PROBES = 7


def _expected_samples(op: mh.CurvatureOperator, H: np.ndarray, distribution: str, seed: int) -> np.ndarray:
    """``zᵀ H z`` for the probes multihess draws, with ``H`` in the operator's parameter order."""
    Z = draw_probes(np.random.default_rng(seed), PROBES, op.shape[1], distribution, probe_order(op))
    return np.einsum("ki,ij,kj->k", Z, H, Z)


def _without_unfused_products(op: mh.CurvatureOperator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make plain batched products fail, so that a trace that works took the fused route."""

    def refuse(V: object) -> None:
        raise AssertionError("the trace went through separate products and reductions")

    monkeypatch.setattr(op, "_matmat_rows", refuse)


def _jax_problem():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(D, HID))), "w2": jnp.asarray(rng.normal(size=(HID, C)))}
    x, y = jnp.asarray(rng.normal(size=(N, D))), jnp.asarray(rng.integers(0, C, size=N))

    def apply(p: dict, x: jax.Array) -> jax.Array:
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    return apply, params, x, y


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_jax_trace_in_one_call_per_chunk(distribution: str, monkeypatch: pytest.MonkeyPatch) -> None:
    H, dense = _jax_hessian()
    samples = _expected_samples(H, dense, distribution, seed=3)
    with monkeypatch.context() as patch:
        _without_unfused_products(H, patch)
        est = mh.trace(H, num_probes=PROBES, seed=3, distribution=distribution)
        # One probe a chunk (a probe and its product take 16 bytes an entry): the same numbers, in seven calls.
        chunked = mh.trace(H, num_probes=PROBES, seed=3, distribution=distribution, memory_budget=2 * 16 * H.shape[1])
    assert est.value == pytest.approx(samples.mean(), rel=1e-10)
    assert est.std_error == pytest.approx(samples.std(ddof=1) / np.sqrt(PROBES), rel=1e-8)
    assert chunked.value == pytest.approx(samples.mean(), rel=1e-10)


def test_jax_ggn_trace_over_several_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    apply, params, x, y = _jax_problem()
    G = mh.ggn(apply, params, data=[(x[:4], y[:4]), (x[4:], y[4:])], loss="cross_entropy")
    J = np.asarray(jax.jacfwd(lambda w: apply(G.rows.to_tree(w), x))(G.rows.w))  # (N, C, P)
    prob = np.asarray(jax.nn.softmax(apply(params, x)))
    dense = sum(J[n].T @ (np.diag(prob[n]) - np.outer(prob[n], prob[n])) @ J[n] for n in range(N)) / N
    samples = _expected_samples(G, dense, "rademacher", seed=5)
    with monkeypatch.context() as patch:
        _without_unfused_products(G, patch)
        est = mh.trace(G, num_probes=PROBES, seed=5)
    assert est.value == pytest.approx(samples.mean(), rel=1e-10)


def _tensorflow_hessian() -> tuple[mh.CurvatureOperator, np.ndarray]:
    """A Keras MLP's Hessian operator in float64, and its dense Hessian from nested ``tf.GradientTape`` Jacobians."""
    import keras

    rng = np.random.default_rng(1)
    with float64_layers():
        model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(HID, activation="tanh"), keras.layers.Dense(C)])
    x, y = tf.constant(rng.normal(size=(N, D))), tf.constant(rng.integers(0, C, size=N))
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x)))
        grads = inner.gradient(loss, variables)
        flat_grad = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    # Rows of the Hessian in trainable_variables order, which is the operator's order here.
    dense = np.concatenate(
        [tf.reshape(outer.jacobian(flat_grad, v), (flat_grad.shape[0], -1)).numpy() for v in variables], axis=1
    )
    return H, dense


def _jax_hessian() -> tuple[mh.CurvatureOperator, np.ndarray]:
    """The JAX problem's Hessian operator and its dense Hessian from ``jax.hessian``."""
    apply, params, x, y = _jax_problem()
    H = mh.hessian(apply, params, data=(x, y), loss="cross_entropy")

    def loss(w: jax.Array) -> jax.Array:
        z = apply(H.rows.to_tree(w), x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

    return H, np.asarray(jax.hessian(loss)(H.rows.w))


def test_tensorflow_trace_in_one_call_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    H, dense = _tensorflow_hessian()
    samples = _expected_samples(H, dense, "rademacher", seed=2)
    with monkeypatch.context() as patch:
        _without_unfused_products(H, patch)
        est = mh.trace(H, num_probes=PROBES, seed=2)
    assert est.value == pytest.approx(samples.mean(), rel=1e-10)


@pytest.mark.parametrize("framework", ["jax", "tensorflow"])
def test_probes_are_kept_for_the_next_call_with_the_same_seed(framework: str, monkeypatch: pytest.MonkeyPatch) -> None:
    H, dense = _jax_hessian() if framework == "jax" else _tensorflow_hessian()
    n = H.shape[1]
    expected = {seed: _expected_samples(H, dense, "rademacher", seed).mean() for seed in (3, 4, 5)}
    drawn = []
    signs = _probes._rademacher_signs
    monkeypatch.setattr(_probes, "_rademacher_signs", lambda *args: drawn.append(args[1]) or signs(*args))
    monkeypatch.setattr(_probes, "_kept", type(_probes._kept)())  # none kept from other tests
    two = 2 * 2 * 16 * n  # chunks of two probes (a probe and its product, 16 bytes an entry): four chunks
    for seed in (3, 4, 3, 4):
        est = mh.trace(H, num_probes=PROBES, seed=seed, memory_budget=two)
        assert est.value == pytest.approx(expected[seed], rel=1e-10)
    assert drawn == [2, 2, 2, 1] * 2  # the repeated seeds found every chunk: the generator moved on exactly
    # A bound on what is kept: probes over it are drawn again each time, and the numbers stay the same.
    monkeypatch.setattr(_probes, "KEPT_PROBE_BYTES", 2 * n * 8 - 1)  # float64 probes
    drawn.clear()
    for _ in range(2):
        est = mh.trace(H, num_probes=PROBES, seed=5, memory_budget=two)
        assert est.value == pytest.approx(expected[5], rel=1e-10)
    assert drawn == [2, 2, 2, 1, 2, 2, 2] and len(_probes._kept) <= 1  # only the last, single-probe chunk fits
