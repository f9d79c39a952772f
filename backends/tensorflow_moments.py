"""Second derivatives through ``tf.nn.moments``, which TensorFlow's own version loses.

``tf.nn.moments`` computes the variance as ``mean((x − stop_gradient(mean))²)``.
The value and the gradient are right (the dropped term, ``−2 mean(x − m) dm``,
is zero), but the Hessian misses the terms through the mean: for
``f(x) = var(x)`` of ``n`` entries TensorFlow differentiates to ``(2/n) I``
instead of ``(2/n)(I − 11ᵀ/n)``.  Keras's ``LayerNormalization`` (and
``keras.ops.moments``, group normalization, training-mode batch
normalization) reach it through ``tf.nn.moments``: measured, an HVP of a
``Dense → LayerNormalization → Dense`` network 18 % off finite differences.

While a model is evaluated for a product, :func:`exact_moments` puts a
version without the ``stop_gradient`` in ``tf.nn.moments``' place: the same
values (to rounding), and derivatives of every order.  Code that imported
the function itself (``from tensorflow.nn import moments``) keeps the
original.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow as tf


def moments(
    x: Any, axes: Sequence[int], shift: Any = None, keepdims: bool = False, name: str | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """``tf.nn.moments`` with the variance differentiated through the mean as well."""
    del shift  # unused by tf.nn.moments too
    with tf.name_scope(name or "moments"):
        x = tf.convert_to_tensor(x)
        # float16 statistics in float32, as tf.nn.moments computes them.
        y = tf.cast(x, tf.float32) if x.dtype == tf.float16 else x
        mean = tf.reduce_mean(y, axes, keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(y, mean), axes, keepdims=True)
        if not keepdims:
            mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        if x.dtype == tf.float16:
            mean, variance = tf.cast(mean, tf.float16), tf.cast(variance, tf.float16)
        return mean, variance


@contextlib.contextmanager
def exact_moments() -> Iterator[None]:
    """``tf.nn.moments`` is :func:`moments` inside the block (nested blocks restore what they found)."""
    previous = tf.nn.moments
    tf.nn.moments = moments
    try:
        yield
    finally:
        tf.nn.moments = previous


def with_exact_moments(apply: Callable[..., Any]) -> Callable[..., Any]:
    """``apply`` evaluated under :func:`exact_moments` (traced into a graph once, or run eagerly each call)."""

    @functools.wraps(apply)
    def wrapped(*args: Any) -> Any:
        with exact_moments():
            return apply(*args)

    return wrapped
