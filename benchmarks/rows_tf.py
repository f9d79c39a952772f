"""TensorFlow rows: multihess beside hand-written ``tf.function`` code on Keras 3 models.

Hand-written products, each a ``tf.function`` traced once and called on the
same batch and vectors:

* HVP: back∘back (a ``GradientTape`` around the gradient's tape) and
  fwd∘back (``tf.autodiff.ForwardAccumulator`` around the gradient's tape).
* GGN: ``J v`` by ``ForwardAccumulator`` or by transposing the VJP (a second
  tape on a zero cotangent), the analytic softmax Hessian, then ``Jᵀ``.
* 10-probe trace: back∘back vectorized over the probes by ``tape.jacobian``
  (``pfor``), back∘back with the gradient kept and a loop over the probes, and
  fwd∘back under ``tf.vectorized_map``.
* Dense last-layer block: ``tape.jacobian`` of the gradient.

Back∘back HVP, the transposed-VJP GGN product and the looped trace run once
more compiled by XLA (``jit_compile=True``), beside multihess with
``TensorFlowBackend(jit_compile=True)``.

All rows run with ``tf.nn.moments`` replaced by a version whose variance is
differentiated through the mean (:func:`moments_through_mean`): TensorFlow's
own stops the gradient there, which keeps first derivatives right but drops
terms of the second, so hand-written Hessians of the LayerNorm transformer
would be about 2 % off.  This is the change a user must make by hand;
multihess makes it itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from harness import Bench, as_numpy, estimate, top_eigenvalue_rows
from models import Model, tf_models

import multihess as mh
from multihess.backends.tensorflow_backend import TensorFlowBackend

XLA = "tf.function(jit_compile=True)"
XLA_BACKEND = "TensorFlowBackend(jit_compile=True)"

PROBES = 10


def models(scale: str, device: str) -> dict[str, Model]:
    return tf_models(scale)


def sync(device: str) -> Callable[[Any], Any]:
    return lambda out: out  # eager TensorFlow returns after the op has run


def moments_through_mean(x: Any, axes: Any, shift: Any = None, keepdims: bool = False, name: Any = None) -> Any:
    """``tf.nn.moments`` without its ``stop_gradient`` on the mean: right second derivatives."""
    import tensorflow as tf

    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(x - mean), axes, keepdims=True)
    if not keepdims:
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance


def run(name: str, spec: Model, bench: Bench) -> None:
    import tensorflow as tf

    original = tf.nn.moments
    tf.nn.moments = moments_through_mean  # read when each tf.function traces, during its first call below
    try:
        _run(name, spec, bench)
    finally:
        tf.nn.moments = original


def _run(name: str, spec: Model, bench: Bench) -> None:
    import tensorflow as tf

    model, x, y = spec.model, spec.x, spec.y
    variables = model.trainable_variables
    primals = [v.value for v in variables]
    shapes = [tuple(v.shape) for v in variables]
    sizes = [int(np.prod(s)) for s in shapes]
    n = sum(sizes)
    rng = np.random.default_rng(0)
    v = tf.constant(rng.standard_normal(n), tf.float32)
    Z = tf.constant(rng.choice([-1.0, 1.0], size=(PROBES, n)), tf.float32)

    def split(flat: tf.Tensor) -> list:
        return [tf.reshape(t, s) for t, s in zip(tf.split(flat, sizes), shapes)]

    def dense_grads(gs: list) -> list:
        return [tf.convert_to_tensor(g) for g in gs]  # embedding gradients come as IndexedSlices

    def concat(ts: list) -> tf.Tensor:
        return tf.concat([tf.reshape(t, [-1]) for t in ts], 0)

    tangents = split(v)

    def loss_of(z: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, z))

    def softmax_hessian(z: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
        prob = tf.nn.softmax(z)
        return prob * (u - tf.reduce_sum(prob * u, axis=1, keepdims=True)) / tf.cast(tf.shape(z)[0], z.dtype)

    @tf.function
    def gradient() -> Any:
        with tf.GradientTape() as tape:
            loss = loss_of(model(x, training=False))
        return dense_grads(tape.gradient(loss, variables))

    bench.add("gradient", "hand-written", "tf.function GradientTape", gradient)

    # --- Hessian-vector products
    @tf.function
    def back_back(t: list) -> Any:
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_of(model(x, training=False))
            g = dense_grads(inner.gradient(loss, variables))
        return dense_grads(outer.gradient(g, variables, output_gradients=t))

    @tf.function
    def fwd_back(t: list) -> Any:
        with tf.autodiff.ForwardAccumulator(primals, t) as acc:
            with tf.GradientTape() as tape:
                loss = loss_of(model(x, training=False))
            g = dense_grads(tape.gradient(loss, variables))
        return dense_grads(acc.jvp(g))  # an embedding's tangent comes as IndexedSlices too

    bench.add("hvp", "hand-written", "tf.function back∘back (nested tapes)", lambda: back_back(tangents), as_numpy)
    bench.add("hvp", "hand-written", "tf.function fwd∘back (ForwardAccumulator)", lambda: fwd_back(tangents), as_numpy)
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    bench.add("hvp", "multihess", "H @ v (operator built once)", lambda: H @ v, as_numpy)
    tree_v = H.rows.to_tree(v)  # a list in trainable_variables order, as the hand-written rows take
    bench.add("hvp", "multihess", "H @ tree (operator built once)", lambda: H @ tree_v, as_numpy)
    H_unchecked = mh.hessian(model, data=(x, y), loss="cross_entropy", check_finite=False)
    bench.add("hvp", "multihess", "H @ tree, check_finite=False", lambda: H_unchecked @ tree_v, as_numpy)

    # --- GGN-vector products
    @tf.function
    def ggn_accumulator(t: list) -> Any:
        with tf.GradientTape() as tape:
            with tf.autodiff.ForwardAccumulator(primals, t) as acc:
                z = model(x, training=False)
            jv = acc.jvp(z)
        return dense_grads(tape.gradient(z, variables, output_gradients=tf.stop_gradient(softmax_hessian(z, jv))))

    @tf.function
    def ggn_transpose(t: list) -> Any:
        with tf.GradientTape(persistent=True) as tape:
            z = model(x, training=False)
        u = tf.zeros_like(z)
        with tf.GradientTape() as dual:
            dual.watch(u)
            jtu = dense_grads(tape.gradient(z, variables, output_gradients=u))  # Jᵀu, linear in u
        jv = dual.gradient(jtu, u, output_gradients=t)
        return dense_grads(tape.gradient(z, variables, output_gradients=softmax_hessian(z, jv)))

    bench.add(
        "ggn", "hand-written", "tf.function ForwardAccumulator J, H_z, Jᵀ", lambda: ggn_accumulator(tangents), as_numpy
    )
    bench.add("ggn", "hand-written", "tf.function transposed-VJP J, H_z, Jᵀ", lambda: ggn_transpose(tangents), as_numpy)
    bench.add("ggn", "multihess", "G @ v (operator built once)", lambda: G @ v, as_numpy)
    bench.add("ggn", "multihess", "G @ tree (operator built once)", lambda: G @ tree_v, as_numpy)
    G_unchecked = mh.ggn(model, data=(x, y), loss="cross_entropy", check_finite=False)
    bench.add("ggn", "multihess", "G @ tree, check_finite=False", lambda: G_unchecked @ tree_v, as_numpy)

    # --- 10-probe traces on the same probes Z; checked against multihess products with Z
    try:
        bench.reference(
            "trace", (as_numpy(H.matmat(tf.transpose(Z))).T * as_numpy(Z)).sum(1), source="multihess H.matmat(Z)"
        )
    except Exception:
        pass

    @tf.function
    def trace_jacobian() -> Any:
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_of(model(x, training=False))
            s = tf.linalg.matvec(Z, concat(dense_grads(inner.gradient(loss, variables))))  # z_iᵀ g for each probe
        jac = outer.jacobian(s, variables)  # rows z_iᵀ H, vectorized by pfor
        return tf.reduce_sum(tf.concat([tf.reshape(j, [PROBES, -1]) for j in jac], 1) * Z, axis=1)

    @tf.function
    def trace_loop() -> Any:
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                loss = loss_of(model(x, training=False))
            g = dense_grads(inner.gradient(loss, variables))
        out = [
            tf.reduce_sum(concat(dense_grads(outer.gradient(g, variables, output_gradients=split(z)))) * z)
            for z in tf.unstack(Z)
        ]
        return tf.stack(out)

    @tf.function
    def trace_vectorized() -> Any:
        return tf.vectorized_map(lambda z: tf.reduce_sum(concat(fwd_back.python_function(split(z))) * z), Z)

    bench.add(
        "trace", "hand-written", "tf.function back∘back, probes by tape.jacobian (pfor)", trace_jacobian, as_numpy
    )
    bench.add("trace", "hand-written", "tf.function back∘back, gradient kept, loop over probes", trace_loop, as_numpy)
    bench.add("trace", "hand-written", "tf.function fwd∘back under tf.vectorized_map", trace_vectorized, as_numpy)
    ref = bench.refs.get("trace")
    if ref is not None:
        bench.reference("trace_estimate", ref.value.mean(), ref.value.std(ddof=1) / np.sqrt(PROBES), ref.source)
    bench.add(
        "trace",
        "multihess",
        "mh.trace(H, 10), Hutchinson",
        lambda: mh.trace(H, num_probes=PROBES, seed=0),
        estimate,
        check_as="trace_estimate",
    )

    # --- exact GGN diagonal and trace (no hand-written TensorFlow equivalent: multihess is the reference)
    bench.add(
        "ggn_diag", "multihess", "mh.diagonal(G, method='exact')", lambda: mh.diagonal(G, method="exact"), estimate
    )
    ref = bench.refs.get("ggn_diag")
    if ref is not None:
        bench.reference("ggn_trace", ref.value.sum(), source=ref.source)
    bench.add("ggn_trace", "multihess", "mh.trace(G, method='exact')", lambda: mh.trace(G, method="exact"), estimate)

    # --- top eigenvalue, checked against Lanczos run to convergence
    top_eigenvalue_rows(bench, H)

    # --- dense Hessian of the last layer's block
    head_vars = spec.head.trainable_variables
    m = sum(int(np.prod(w.shape)) for w in head_vars)

    @tf.function
    def hand_dense() -> Any:
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_of(model(x, training=False))
            g = concat(dense_grads(inner.gradient(loss, head_vars)))
        return tf.concat([tf.reshape(j, [m, -1]) for j in outer.jacobian(g, head_vars)], 1)

    bench.add("dense", "hand-written", "tf.function tape.jacobian of the gradient", hand_dense, as_numpy)
    H_head = mh.hessian(model, data=(x, y), loss="cross_entropy", params=list(head_vars))
    bench.add(
        "dense",
        "multihess",
        "mh.hessian(..., params=head variables).dense(), operator built once",
        H_head.dense,
        as_numpy,
    )
    bench.add(
        "build",
        "multihess",
        "mh.hessian(...) @ v, operator built per call",
        lambda: mh.hessian(model, data=(x, y), loss="cross_entropy") @ v,
        as_numpy,
        check_as="hvp",
    )

    # --- XLA on both sides, last: once XLA has run, TensorFlow's own kernels ran slower in the same process
    # (the transformer's density took 1.7 times as long after these rows).  XLA compiles away the flat
    # parameter vector's joins and cuts, which TensorFlow's graphs copy.
    back_back_xla = tf.function(back_back.python_function, jit_compile=True)
    ggn_transpose_xla = tf.function(ggn_transpose.python_function, jit_compile=True)
    trace_loop_xla = tf.function(trace_loop.python_function, jit_compile=True)
    xla = TensorFlowBackend(jit_compile=True)
    H_xla = mh.hessian(model, data=(x, y), loss="cross_entropy", backend=xla)
    G_xla = mh.ggn(model, data=(x, y), loss="cross_entropy", backend=xla)
    bench.add("hvp", "hand-written", f"{XLA} back∘back (nested tapes)", lambda: back_back_xla(tangents), as_numpy)
    bench.add("hvp", "multihess", f"H @ tree, {XLA_BACKEND}", lambda: H_xla @ tree_v, as_numpy)
    bench.add("ggn", "hand-written", f"{XLA} transposed-VJP J, H_z, Jᵀ", lambda: ggn_transpose_xla(tangents), as_numpy)
    bench.add("ggn", "multihess", f"G @ tree, {XLA_BACKEND}", lambda: G_xla @ tree_v, as_numpy)
    bench.add("trace", "hand-written", f"{XLA} back∘back, gradient kept, loop over probes", trace_loop_xla, as_numpy)
    bench.add(
        "trace",
        "multihess",
        f"mh.trace(H, 10), {XLA_BACKEND}",
        lambda: mh.trace(H_xla, num_probes=PROBES, seed=0),
        estimate,
        check_as="trace_estimate",
    )
