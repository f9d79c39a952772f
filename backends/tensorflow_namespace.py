"""The array-API namespace of the TensorFlow backend: exactly what the core uses, over ``tf``.

TensorFlow has no array-API namespace of its own (``tf.experimental.numpy``
follows NumPy's promotion rules and names, not the standard's), so this
module maps the standard's names the core calls onto TensorFlow ops.  Every
function keeps the dtype of its inputs and works eagerly and inside
``tf.function``.  A function the core starts to use must be added here; the
conformance suite runs the core through this module.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

float16 = tf.float16
bfloat16 = tf.bfloat16
float32 = tf.float32
float64 = tf.float64
int32 = tf.int32
int64 = tf.int64
bool = tf.bool  # noqa: A001 - the standard's name

_KINDS = {
    "real floating": lambda d: d.is_floating,
    "integral": lambda d: d.is_integer,
    "signed integer": lambda d: d.is_integer and not d.is_unsigned,
    "unsigned integer": lambda d: d.is_integer and d.is_unsigned,
    "bool": lambda d: d == tf.bool,
    "numeric": lambda d: (d.is_floating or d.is_integer or d.is_complex) and d != tf.bool,
}


def isdtype(dtype: Any, kind: str) -> builtins.bool:
    """Whether ``dtype`` is of ``kind`` (``"real floating"``, ``"integral"``, ...)."""
    return builtins.bool(_KINDS[kind](tf.as_dtype(dtype)))


def asarray(obj: Any, dtype: Any = None, device: Any = None, copy: Any = None) -> tf.Tensor:
    return tf.convert_to_tensor(obj, dtype=dtype)


def astype(x: Any, dtype: Any, copy: builtins.bool = True) -> tf.Tensor:
    return tf.cast(x, dtype)


def zeros(shape: Sequence[int], dtype: Any = None, device: Any = None) -> tf.Tensor:
    return tf.zeros(shape, dtype=dtype or tf.float32)


def zeros_like(x: Any, dtype: Any = None, device: Any = None) -> tf.Tensor:
    return tf.zeros_like(x, dtype=dtype)


def arange(start: int, stop: int | None = None, step: int = 1, dtype: Any = None, device: Any = None) -> tf.Tensor:
    return tf.range(start, stop, step, dtype=dtype or tf.int64)


def sum(x: Any, axis: Any = None, dtype: Any = None, keepdims: builtins.bool = False) -> tf.Tensor:  # noqa: A001
    x = x if dtype is None else tf.cast(x, dtype)
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


def max(x: Any, axis: Any = None, keepdims: builtins.bool = False) -> tf.Tensor:  # noqa: A001
    return tf.reduce_max(x, axis=axis, keepdims=keepdims)


def all(x: Any, axis: Any = None, keepdims: builtins.bool = False) -> tf.Tensor:  # noqa: A001
    return tf.reduce_all(tf.cast(x, tf.bool), axis=axis, keepdims=keepdims)


def isfinite(x: Any) -> tf.Tensor:
    return tf.math.is_finite(x)


def abs(x: Any) -> tf.Tensor:  # noqa: A001
    return tf.abs(x)


def exp(x: Any) -> tf.Tensor:
    return tf.exp(x)


def log(x: Any) -> tf.Tensor:
    return tf.math.log(x)


def sqrt(x: Any) -> tf.Tensor:
    return tf.sqrt(x)


def logaddexp(x1: Any, x2: Any) -> tf.Tensor:
    big = tf.maximum(x1, x2)
    return big + tf.math.log1p(tf.exp(-tf.abs(x1 - x2)))


def where(condition: Any, x1: Any, x2: Any) -> tf.Tensor:
    return tf.where(condition, x1, x2)


def reshape(x: Any, shape: Sequence[int], copy: Any = None) -> tf.Tensor:
    return tf.reshape(x, shape)


def expand_dims(x: Any, axis: int = 0) -> tf.Tensor:
    return tf.expand_dims(x, axis)


def stack(arrays: Sequence[Any], axis: int = 0) -> tf.Tensor:
    arrays = list(arrays)
    # One array (every matvec) needs no copy: a new axis is a view.
    return tf.expand_dims(arrays[0], axis) if len(arrays) == 1 else tf.stack(arrays, axis=axis)


def concat(arrays: Sequence[Any], axis: int = 0) -> tf.Tensor:
    return tf.concat(list(arrays), axis=axis)


def moveaxis(x: Any, source: int, destination: int) -> tf.Tensor:
    rank = len(x.shape)
    perm = list(range(rank))
    perm.insert(destination % rank, perm.pop(source % rank))
    return tf.transpose(x, perm)


def permute_dims(x: Any, axes: Sequence[int]) -> tf.Tensor:
    return tf.transpose(x, list(axes))


def matrix_transpose(x: Any) -> tf.Tensor:
    return tf.linalg.matrix_transpose(x)


def matmul(x1: Any, x2: Any) -> tf.Tensor:
    return tf.linalg.matmul(x1, x2)


def vecdot(x1: Any, x2: Any, axis: int = -1) -> tf.Tensor:
    return tf.reduce_sum(x1 * x2, axis=axis)


class linalg:  # noqa: N801 - the standard's extension name
    """The part of the ``linalg`` extension the core uses."""

    @staticmethod
    def vector_norm(x: Any, axis: Any = None, keepdims: builtins.bool = False, ord: Any = 2) -> tf.Tensor:  # noqa: A002
        return tf.norm(x, ord=ord, axis=axis, keepdims=keepdims)

    @staticmethod
    def matmul(x1: Any, x2: Any) -> tf.Tensor:
        return tf.linalg.matmul(x1, x2)

    @staticmethod
    def qr(x: Any, mode: str = "reduced") -> tuple[tf.Tensor, tf.Tensor]:
        """Householder QR on the device (the sketches' range bases), ``(Q, R)`` as the standard orders them."""
        if mode not in ("reduced", "complete"):
            raise ValueError(f"mode must be 'reduced' or 'complete', got {mode!r}")
        q, r = tf.linalg.qr(x, full_matrices=mode == "complete")
        return q, r
