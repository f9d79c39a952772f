"""Calling a ``tf.function`` through its concrete functions, by their flat tensor inputs.

A call of a ``tf.function`` binds its arguments to the function's signature
and works out their trace types before it runs anything: about 0.3 ms on a
CPU for one argument and 0.03-0.05 ms more for each further tensor.  A
small network's Hessian-vector product takes 1-2 ms, so that is 15-40 % of
it, paid again at every Lanczos step (a product and a Gram-Schmidt pass).

:class:`FlatCall` keeps, per argument signature (the nesting of tuples,
lists and dicts, each tensor's dtype and shape, and the values of Python
constants), the concrete function that ``tf.function`` traced for it, and
calls it with the tensors in the order ``tf.function`` itself would pass
them: 0.07 ms for eleven tensors.  Anything it does not recognize (other
containers, variables, composite tensors, NumPy arrays, a call inside a
trace, a TensorFlow without the concrete functions' flat call) goes
through the ``tf.function`` as usual.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import tensorflow as tf

_CONSTANTS = (bool, int, float, str, type(None))
"""Python values ``tf.function`` treats as part of the signature (traced by value, not passed)."""

_NOT_PASSED_AS_IS = (tf.resource, tf.variant)
"""Tensor dtypes whose values ``tf.function`` handles apart (variables, datasets)."""


class FlatCall:
    """``function(*args)`` for a ``tf.function``, skipping the argument binding where it can.

    Parameters
    ----------
    function : tf.function
        The compiled function; its other attributes stay reachable through this object.
    """

    def __init__(self, function: Any) -> None:
        self.function = function
        self._concrete: dict[Hashable, Any] = {}
        self._flat = True  # until a concrete function turns out not to have the flat call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.function, name)

    def __call__(self, *args: Any) -> Any:
        if not self._flat or not tf.executing_eagerly():
            return self.function(*args)
        tensors: list[tf.Tensor] = []
        key = _signature(args, tensors)
        if key is None:
            return self.function(*args)
        concrete = self._concrete.get(key)
        if concrete is None:
            concrete = self._concrete[key] = self.function.get_concrete_function(*args)
            # A private method of concrete functions: without it (another TensorFlow), every call is a plain call.
            self._flat = callable(getattr(concrete, "_call_flat", None))
            if not self._flat:
                return self.function(*args)
        return concrete._call_flat(tensors, concrete.captured_inputs)


def _signature(value: Any, tensors: list[tf.Tensor]) -> Hashable | None:
    """The signature of ``value``, with its tensors appended to ``tensors`` in ``tf.nest`` order; ``None`` if unknown.

    Tuples (named ones included) and lists in order, dicts by sorted keys
    (as ``tf.nest`` flattens them), tensors by dtype and shape, Python
    constants by value.
    """
    if isinstance(value, tf.Tensor):
        if value.dtype in _NOT_PASSED_AS_IS:
            return None
        tensors.append(value)
        return (value.dtype, tuple(value.shape.as_list()))
    if isinstance(value, (tuple, list)):
        parts = []
        for item in value:
            part = _signature(item, tensors)
            if part is None:
                return None
            parts.append(part)
        return (type(value), tuple(parts))
    if type(value) is dict:
        try:
            keys = sorted(value)
        except TypeError:  # keys that do not sort: tf.nest's own order then applies
            return None
        parts = []
        for k in keys:
            part = _signature(value[k], tensors)
            if part is None:
                return None
            parts.append((k, part))
        return (dict, tuple(parts))
    if isinstance(value, _CONSTANTS):
        return (type(value), value)
    return None
