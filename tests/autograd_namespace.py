"""The array-API namespace of the autograd backend: the standard's names the core uses, over ``autograd.numpy``.

HIPS autograd traces NumPy code by wrapping arrays in boxes and
``numpy`` in ``autograd.numpy``; a plain NumPy function applied to a box
leaves the trace (``array_api_compat.numpy`` calls plain ``numpy``, so a loss
written with it could not be differentiated).  Every function here calls
``autograd.numpy`` and so works on NumPy arrays and on autograd's boxes
alike, at every order of differentiation.  Functions the core does not
differentiate through (dtype tests, ``zeros``, ``arange``) are plain NumPy.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import autograd.numpy as anp
import numpy as np
from autograd.tracer import isbox

float16 = np.float16
float32 = np.float32
float64 = np.float64
int32 = np.int32
int64 = np.int64
bool = np.bool_  # noqa: A001 - the standard's name

# NumPy dtype kinds (``dtype.kind``) of the standard's dtype categories.
_KINDS = {
    "bool": "b",
    "signed integer": "i",
    "unsigned integer": "u",
    "integral": "iu",
    "real floating": "f",
    "complex floating": "c",
    "numeric": "iufc",
}


def isdtype(dtype: Any, kind: str | tuple[str, ...]) -> builtins.bool:
    """Whether ``dtype`` is of ``kind`` (``"real floating"``, ``"integral"``, ...) or one of several kinds."""
    if isinstance(kind, tuple):
        return builtins.any(isdtype(dtype, k) for k in kind)
    if not isinstance(kind, str):  # a dtype itself
        return np.dtype(dtype) == np.dtype(kind)
    return np.dtype(dtype).kind in _KINDS[kind]


def asarray(obj: Any, dtype: Any = None, device: Any = None, copy: builtins.bool | None = None) -> Any:
    if isbox(obj):  # a box stays a box: a NumPy copy would cut it from the trace
        return obj if dtype is None else astype(obj, dtype)
    return np.array(obj, dtype=dtype, copy=True) if copy else np.asarray(obj, dtype=dtype)


def astype(x: Any, dtype: Any, copy: builtins.bool = True, device: Any = None) -> Any:
    return x.astype(dtype)  # a box's astype is differentiable


def zeros(shape: int | Sequence[int], dtype: Any = None, device: Any = None) -> np.ndarray:
    return np.zeros(shape, dtype=dtype or np.float64)


def ones(shape: int | Sequence[int], dtype: Any = None, device: Any = None) -> np.ndarray:
    return np.ones(shape, dtype=dtype or np.float64)


def zeros_like(x: Any, dtype: Any = None, device: Any = None) -> Any:
    return anp.zeros_like(x, dtype=dtype)


def arange(start: int, stop: int | None = None, step: int = 1, dtype: Any = None, device: Any = None) -> np.ndarray:
    return np.arange(start, stop, step, dtype=dtype) if stop is not None else np.arange(start, dtype=dtype)


def sum(x: Any, axis: Any = None, dtype: Any = None, keepdims: builtins.bool = False) -> Any:  # noqa: A001
    x = x if dtype is None else astype(x, dtype)
    return anp.sum(x, axis=axis, keepdims=keepdims)


def max(x: Any, axis: Any = None, keepdims: builtins.bool = False) -> Any:  # noqa: A001
    return anp.max(x, axis=axis, keepdims=keepdims)


def all(x: Any, axis: Any = None, keepdims: builtins.bool = False) -> Any:  # noqa: A001
    return anp.all(x, axis=axis, keepdims=keepdims)


def isfinite(x: Any) -> Any:
    return anp.isfinite(x)


def abs(x: Any) -> Any:  # noqa: A001
    return anp.abs(x)


def exp(x: Any) -> Any:
    return anp.exp(x)


def log(x: Any) -> Any:
    return anp.log(x)


def sqrt(x: Any) -> Any:
    return anp.sqrt(x)


def logaddexp(x1: Any, x2: Any) -> Any:
    return anp.logaddexp(x1, x2)


def where(condition: Any, x1: Any, x2: Any) -> Any:
    return anp.where(condition, x1, x2)


def reshape(x: Any, shape: Sequence[int], copy: Any = None) -> Any:
    return anp.reshape(x, tuple(shape))


def expand_dims(x: Any, axis: int = 0) -> Any:
    return anp.expand_dims(x, axis)


def stack(arrays: Sequence[Any], axis: int = 0) -> Any:
    return anp.stack(list(arrays), axis=axis)


def concat(arrays: Sequence[Any], axis: int | None = 0) -> Any:
    arrays = list(arrays)
    if axis is None:
        return anp.concatenate([anp.ravel(a) for a in arrays])
    return anp.concatenate(arrays, axis=axis)


def moveaxis(x: Any, source: int, destination: int) -> Any:
    return anp.moveaxis(x, source, destination)


def permute_dims(x: Any, axes: Sequence[int]) -> Any:
    return anp.transpose(x, tuple(axes))


def matrix_transpose(x: Any) -> Any:
    return anp.swapaxes(x, -1, -2)


def matmul(x1: Any, x2: Any) -> Any:
    return anp.matmul(x1, x2)


def vecdot(x1: Any, x2: Any, axis: int = -1) -> Any:
    return anp.sum(x1 * x2, axis=axis)


class linalg:  # noqa: N801 - the standard's extension name
    """The part of the ``linalg`` extension the core uses."""

    @staticmethod
    def vector_norm(x: Any, axis: Any = None, keepdims: builtins.bool = False, ord: Any = 2) -> Any:  # noqa: A002
        if ord != 2:
            raise NotImplementedError(f"vector_norm with ord={ord!r}: only the 2-norm is needed")
        return anp.sqrt(anp.sum(x * x, axis=axis, keepdims=keepdims))

    @staticmethod
    def matmul(x1: Any, x2: Any) -> Any:
        return anp.matmul(x1, x2)
