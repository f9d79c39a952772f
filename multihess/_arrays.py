"""Array helpers written once against an array-API namespace ``xp``.

The array half of the backend protocol is a namespace (``backend.xp``):
``array_api_compat``'s for PyTorch and NumPy-array frameworks, ``jax.numpy``
for JAX, a small module of its own for TensorFlow.  What the array API does
not name (a logistic sigmoid, one-hot codes, a host-side finiteness test, a
dtype's NumPy name) is written here, once, on top of it.

Examples
--------
>>> import numpy as np
>>> import array_api_compat.numpy as xp
>>> shape(np.zeros((2, 3)))
(2, 3)
>>> dtype_name(np.zeros(1, dtype=np.float32))
'float32'
>>> float(softplus(xp, np.array(1000.0)))
1000.0
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any
"""A framework array: ``torch.Tensor``, ``jax.Array``, ``tf.Tensor``, or a NumPy array."""

Namespace = Any
"""An array-API namespace (``xp``)."""


def shape(x: Array) -> tuple[int, ...]:
    """Shape of ``x`` as a tuple of Python ints (TensorFlow's dimensions included)."""
    return tuple(int(d) for d in x.shape)


def dtype_name(x: Array) -> str:
    """NumPy-style name of the dtype of ``x``: ``"float32"``, ``"bfloat16"``, ``"int64"``."""
    dtype = x.dtype
    name = getattr(dtype, "name", None)
    if isinstance(name, str):  # NumPy, JAX and TensorFlow dtypes
        return name
    if isinstance(dtype, str):  # Keras variables report a string
        return dtype
    return str(dtype).rsplit(".", 1)[-1]  # torch.float32 -> float32


def device_name(x: Array) -> str:
    """The device ``x`` lives on, as its framework names it (``"cpu"``, ``"cuda:0"``, ``"TFRT_CPU_0"``)."""
    try:
        device = x.device
    except Exception:  # a JAX array sharded over several devices has no single device
        return ",".join(sorted(str(d) for d in x.devices()))
    if isinstance(device, str):  # TensorFlow: "/job:localhost/replica:0/task:0/device:CPU:0"
        return device.rsplit("device:", 1)[-1].lower() or "cpu"
    return str(device)


def itemsize(x: Array) -> int:
    """Bytes per entry of ``x`` (2 for types NumPy does not know, such as bfloat16)."""
    try:
        return int(np.dtype(dtype_name(x)).itemsize)
    except TypeError:
        return 2


def machine_epsilon(x: Array) -> float:
    """Machine epsilon of the dtype of ``x`` (bfloat16's where NumPy does not know the type)."""
    name = dtype_name(x)
    if name == "bfloat16":
        return 2.0**-7
    return float(np.finfo(np.dtype(name)).eps)


def is_floating(xp: Namespace, x: Array) -> bool:
    """Whether ``x`` has a real floating dtype."""
    return bool(xp.isdtype(x.dtype, "real floating"))


def all_finite(xp: Namespace, x: Array) -> bool:
    """Whether every entry of ``x`` is finite (one host read, two for a non-finite sum).

    A finite sum proves every entry finite and needs no boolean array; only
    a non-finite sum (NaN or inf, or finite entries that overflow) needs the
    full test.
    """
    if not is_floating(xp, x):
        return True
    if bool(xp.isfinite(xp.sum(x))):
        return True
    return bool(xp.all(xp.isfinite(x)))


def sigmoid(xp: Namespace, x: Array) -> Array:
    """The logistic function, ``exp(-softplus(-x))``: no overflow for any ``x``."""
    return xp.exp(-softplus(xp, -x))


def softplus(xp: Namespace, x: Array) -> Array:
    """``log(1 + exp(x))``, computed stably as ``logaddexp(x, 0)``."""
    return xp.logaddexp(x, xp.zeros_like(x))


def one_hot(backend: Any, labels: Array, num_classes: int, like: Array) -> Array:
    """One-hot codes of integer ``labels`` along a new last axis, in the dtype of ``like``.

    The class indices are made by ``backend.asarray`` so that they sit on the
    labels' device (the array API's ``arange`` would need a device object,
    which not every framework gives).
    """
    xp = backend.xp
    classes = xp.astype(backend.asarray(np.arange(num_classes), labels), labels.dtype)
    return xp.astype(xp.expand_dims(labels, axis=-1) == classes, like.dtype)
