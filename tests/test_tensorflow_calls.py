"""Compiled TensorFlow functions called by their flat tensors (``backends/tensorflow_calls.py``).

Every result is checked against NumPy float64 computed from the same
inputs, or against a closed-form derivative; the counts check which route a
call took (the concrete function's flat call, or the ``tf.function`` itself).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import collections  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")

import multihess as mh  # noqa: E402
from multihess.backends.tensorflow_calls import FlatCall  # noqa: E402

Pair = collections.namedtuple("Pair", ["first", "second"])


class Counted:
    """A ``tf.function`` whose plain calls and traces are counted."""

    def __init__(self, python_function) -> None:
        self.traces = 0
        self.plain_calls = 0

        def traced(*args):
            self.traces += 1
            return python_function(*args)

        self.function = tf.function(traced)

    def __call__(self, *args):
        self.plain_calls += 1
        return self.function(*args)

    def get_concrete_function(self, *args):
        return self.function.get_concrete_function(*args)


def combine(w, batch, scale):
    """``scale · (w["b"] @ x + Σ parts)`` over a dict, a tuple, a list, a named tuple and a Python number."""
    x, pair = batch
    total = tf.linalg.matvec(w["b"], x) + w["a"]
    for part in pair.first:
        total = total + part
    return scale * (total + 2.0 * pair.second)


def numpy_combine(w, batch, scale):
    x, pair = batch
    return scale * (w["b"] @ x + w["a"] + sum(pair.first) + 2.0 * pair.second)


def arguments(seed: int, scale: float):
    rng = np.random.default_rng(seed)
    host = {
        "w": {"b": rng.standard_normal((3, 4)), "a": rng.standard_normal(3)},
        "x": rng.standard_normal(4),
        "parts": [rng.standard_normal(3) for _ in range(2)],
        "second": rng.standard_normal(3),
    }
    as_tf = lambda a: tf.constant(a, tf.float64)  # noqa: E731
    w = {k: as_tf(v) for k, v in host["w"].items()}
    batch = (as_tf(host["x"]), Pair([as_tf(p) for p in host["parts"]], as_tf(host["second"])))
    expected = numpy_combine(host["w"], (host["x"], Pair(host["parts"], host["second"])), scale)
    return (w, batch, scale), expected


def test_nested_arguments_go_through_the_flat_call_and_match_numpy() -> None:
    counted = Counted(combine)
    call = FlatCall(counted)
    for seed in range(3):  # new values, same signature: one trace, no plain call
        args, expected = arguments(seed, 0.5)
        np.testing.assert_allclose(call(*args).numpy(), expected, rtol=1e-12)
    assert (counted.traces, counted.plain_calls) == (1, 0)
    # A new Python constant is a new signature (tf.function traces by value): the constant is not stale.
    args, expected = arguments(3, 2.0)
    np.testing.assert_allclose(call(*args).numpy(), expected, rtol=1e-12)
    assert (counted.traces, counted.plain_calls) == (2, 0)
    # A new shape too.
    w = {"b": tf.ones((2, 5), tf.float64), "a": tf.zeros(2, tf.float64)}
    batch = (tf.ones(5, tf.float64), Pair([tf.ones(2, tf.float64)], tf.ones(2, tf.float64)))
    np.testing.assert_allclose(call(w, batch, 1.0).numpy(), [8.0, 8.0])
    assert (counted.traces, counted.plain_calls) == (3, 0)


def test_dict_keys_are_passed_in_sorted_order_as_tf_nest_flattens_them() -> None:
    # Two tensors of the same shape: a call that passed them in insertion order would swap them.
    call = FlatCall(tf.function(lambda d: d["z"] - 2.0 * d["a"]))
    out = call({"z": tf.constant([5.0]), "a": tf.constant([1.0])})
    np.testing.assert_allclose(out.numpy(), [3.0])


@pytest.mark.parametrize(
    "unusual",
    ["variable", "numpy", "ordered_dict"],
)
def test_arguments_it_does_not_recognize_take_the_plain_call(unusual: str) -> None:
    counted = Counted(lambda d: d["v"] * 3.0)
    call = FlatCall(counted)
    value = np.array([1.0, -2.0], dtype=np.float32)
    arg = {
        "variable": {"v": tf.Variable(value)},
        "numpy": {"v": value},
        "ordered_dict": collections.OrderedDict(v=tf.constant(value)),
    }[unusual]
    np.testing.assert_allclose(call(arg).numpy(), 3.0 * value)
    assert counted.plain_calls == 1


def test_a_call_inside_a_trace_takes_the_plain_call() -> None:
    counted = Counted(lambda v: v * v)
    call = FlatCall(counted)
    outer = tf.function(lambda v: call(v) + 1.0)
    np.testing.assert_allclose(outer(tf.constant([3.0])).numpy(), [10.0])
    assert counted.plain_calls == 1


def test_the_flat_call_is_recorded_by_an_enclosing_tape() -> None:
    # d/dv Σ sin(v)·v = cos(v)·v + sin(v): the outer tape must see through the flat call.
    call = FlatCall(tf.function(lambda v: tf.reduce_sum(tf.sin(v) * v)))
    v = tf.constant([0.3, -1.2, 2.0], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(v)
        value = call(v)
    host = v.numpy()
    np.testing.assert_allclose(value.numpy(), np.sum(np.sin(host) * host), rtol=1e-12)
    np.testing.assert_allclose(tape.gradient(value, v).numpy(), np.cos(host) * host + np.sin(host), rtol=1e-12)


def test_products_take_the_flat_call() -> None:
    """A Hessian's products run the concrete function traced first, with new vectors each time."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 4))
    A = A @ A.T
    A_t = tf.constant(A)
    H = mh.hessian(lambda p: 0.5 * tf.tensordot(p, tf.linalg.matvec(A_t, p), 1), tf.constant(rng.standard_normal(4)))
    fused = H._hvp.on_parts  # the compiled call behind H @ v: the product and the finiteness of v
    assert isinstance(fused, FlatCall)
    for _ in range(3):
        v = rng.standard_normal(4)
        np.testing.assert_allclose(np.asarray(H @ tf.constant(v)), A @ v, rtol=1e-12)
    # Filled only by the flat route; a plain call would have left it empty.
    assert len(fused._concrete) == 1
    assert fused.function.experimental_get_tracing_count() == 1
