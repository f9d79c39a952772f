"""A backend on a fourth framework, written from scratch: HIPS autograd on NumPy arrays.

It shows what adding a backend takes: one file implementing the required
half of :class:`multihess.Backend` (no optional hook is overridden) and the
namespace :mod:`autograd_namespace`, then passing the conformance suite::

    python -m multihess.conformance --backend autograd_backend:AutogradBackend

Models are functions ``f(params, x)`` (or scalar functions ``fn(params)``) of
a tree of NumPy arrays: nested dicts, lists and tuples.  Parameter names are
dotted paths (``"layer1.weight"``, ``"0.1"``); a bare array is ``"params"``.
The flat vector follows the tree's order (dict insertion order).

autograd differentiates NumPy code by tracing it with boxes: ``grad`` and
``make_vjp`` run in reverse mode, ``make_jvp`` in forward mode, and both nest
in any order.  Its arrays are NumPy arrays, so dispatch chooses this backend
by its :meth:`AutogradBackend.owns` claiming the NumPy parameters and data
that the built-in backends leave to others.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import autograd
import autograd.core
import autograd.numpy as anp
import autograd_namespace
import numpy as np
from autograd.tracer import getval, isbox

import multihess as mh

Array = Any

# NumPy dtype kinds this backend claims: booleans, integers (labels), floats, complex numbers.
_NUMERIC_KINDS = "biufc"


def _is_numpy_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic)) and x.dtype.kind in _NUMERIC_KINDS


def _is_array(x: Any) -> bool:
    """A NumPy array or an autograd box around one (what traced code sees)."""
    return isbox(x) or _is_numpy_array(x)


def _is_container(x: Any) -> bool:
    return isinstance(x, (dict, list, tuple))


def _named_leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of nested dicts, lists and tuples with its dotted path (a bare leaf is ``"params"``)."""
    if not _is_container(tree):
        return [(prefix or "params", tree)]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out: list[tuple[str, Any]] = []
    for key, value in items:
        out.extend(_named_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _rebuild(tree: Any, leaves: dict[str, Any], prefix: str = "") -> Any:
    """A copy of ``tree`` with the leaves named in ``leaves`` replaced (others kept as they are)."""
    if not _is_container(tree):
        name = prefix or "params"
        return leaves[name] if name in leaves else tree
    if isinstance(tree, dict):
        return type(tree)((k, _rebuild(v, leaves, f"{prefix}.{k}" if prefix else str(k))) for k, v in tree.items())
    items = [_rebuild(v, leaves, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(tree)]
    return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)


@contextlib.contextmanager
def _independent_output_allowed() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Output seems independent of input", category=UserWarning)
        yield


def _describe(x: Any) -> str:
    return type(x).__module__.split(".")[0] + "." + type(x).__name__


class AutogradBackend(mh.Backend):
    """The HIPS autograd backend (``backend="autograd"``): functions of NumPy arrays."""

    name = "autograd"
    eager = True

    @property
    def xp(self) -> Any:
        return autograd_namespace

    # ------------------------------------------------------------------ detection and conversion
    def owns(self, obj: Any) -> bool:
        if _is_array(obj):
            return True
        if not _is_container(obj):
            return False
        arrays = [leaf for _, leaf in _named_leaves(obj) if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]
        return bool(arrays) and all(_is_array(a) for a in arrays)

    def is_array(self, obj: Any) -> bool:
        return _is_array(obj)

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.array(getval(x))

    def asarray(self, a: np.ndarray, like: Array) -> Array:
        a = np.asarray(a)
        # Floats take the parameters' dtype; labels keep their integer dtype.
        return np.array(a, dtype=like.dtype if a.dtype.kind == "f" else a.dtype)

    # ------------------------------------------------------------------ parameters
    def named_parameters(self, model: Any, weights: Any) -> list[tuple[str, Array]]:
        if weights is None:
            raise TypeError(
                f"the autograd backend differentiates functions f(params, x) of NumPy arrays; got a "
                f"{_describe(model)} without params: pass the parameters, as in mh.hessian(f, params, ...)"
            )
        return [(n, leaf) for n, leaf in _named_leaves(weights) if isinstance(leaf, np.ndarray)]

    def bind(self, model: Any, weights: Any, selected: Sequence[str]) -> mh.ParameterBinding:
        named = dict(self.named_parameters(model, weights))
        missing = [n for n in selected if n not in named]
        if missing:
            raise ValueError(f"no parameters named {missing}; the parameters are {list(named)}")
        selected = list(selected)
        shapes = [tuple(int(d) for d in named[n].shape) for n in selected]
        dtypes = [named[n].dtype for n in selected]
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        bounds = np.cumsum([0] + sizes).tolist()
        w = np.concatenate([np.ravel(named[n]) for n in selected]).copy()
        # Copies: products see the values of the moment of binding, whatever the user does to the arrays later.
        fixed = {n: np.array(p) for n, p in named.items() if n not in set(selected)}
        left_out = {n: None for n in fixed}

        def split(flat: Array) -> dict[str, Array]:
            # Slices and reshapes of a box stay on autograd's trace.
            return {n: anp.reshape(flat[bounds[k] : bounds[k + 1]], shapes[k]) for k, n in enumerate(selected)}

        def apply(flat: Array, x: Any) -> Array:
            params = _rebuild(weights, {**fixed, **split(flat)})
            return model(params) if x is None else model(params, x)

        def to_tree(flat: Array) -> Any:
            return _rebuild(weights, {**left_out, **split(flat)})

        def from_tree(tree: Any) -> Array:
            return _flatten_by_name(tree, selected, shapes, dtypes, list(named))

        return mh.ParameterBinding(w, selected, shapes, apply, to_tree, from_tree)

    # ------------------------------------------------------------------ autodiff
    # autograd warns when a function's output does not depend on its input; a zero derivative is a
    # valid answer here (a loss constant in some parameters, the Hessian of a linear function).
    def value_and_grad(self, f: Callable[[Array], Array], w: Array) -> tuple[Array, Array]:
        with _independent_output_allowed():
            return autograd.value_and_grad(f)(w)

    def jvp(self, f: Callable[[Array], Array], w: Array, v: Array) -> tuple[Array, Array]:
        with _independent_output_allowed():
            return autograd.core.make_jvp(f, w)(v)

    def vjp(self, f: Callable[[Array], Array], w: Array, u: Array) -> tuple[Array, Array]:
        with _independent_output_allowed():
            pullback, out = autograd.core.make_vjp(f, w)
            return out, pullback(u)

    def stop_gradient(self, x: Array) -> Array:
        # The value under every box, at every nesting level: no derivative of any order flows through it.
        return getval(x)


def _flatten_by_name(
    tree: Any, selected: list[str], shapes: list[tuple[int, ...]], dtypes: list[np.dtype], parameters: list[str]
) -> Array:
    """Flatten a tree shaped like the selected parameters, checking entries, types, shapes and dtypes."""
    if not _is_container(tree):
        raise TypeError(
            f"v is a {_describe(tree)}; pass a flat NumPy vector or a tree (dict, list, tuple) of NumPy arrays "
            f"shaped like the parameters {selected}"
        )
    given = {}
    for name, leaf in _named_leaves(tree):
        if leaf is None:  # a parameter left out of a block
            continue
        if not _is_array(leaf):
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                raise TypeError(
                    f"v[{name!r}] is a {_describe(leaf)} but the model is an autograd model of NumPy arrays; "
                    "arrays from two frameworks cannot be mixed: convert v to NumPy arrays"
                )
            raise TypeError(f"v[{name!r}] must be a NumPy array, got {_describe(leaf)}")
        given[name] = leaf
    extra = [n for n in given if n not in selected]
    missing = [n for n in selected if n not in given]
    if extra or missing:
        outside = [n for n in extra if n in parameters]
        raise ValueError(
            f"v has entries {list(given)} but the parameters are {selected}"
            + (f"; missing {missing}" if missing else "")
            + (f"; not parameters of this operator: {extra}" if extra else "")
            + (f" ({outside} are outside params=: leave them out or set them to None)" if outside else "")
        )
    parts = []
    for name, shape, dtype in zip(selected, shapes, dtypes):
        leaf = given[name]
        if tuple(leaf.shape) != shape:
            raise ValueError(f"v[{name!r}] has shape {tuple(leaf.shape)}, expected {shape}")
        if leaf.dtype != dtype:
            raise TypeError(
                f"v[{name!r}] has dtype {leaf.dtype} but the parameter is {dtype}; cast v to the parameters' dtype"
            )
        parts.append(anp.ravel(leaf))
    return anp.concatenate(parts)
