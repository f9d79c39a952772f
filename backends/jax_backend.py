"""JAX adapter: ``jax.grad``/``jax.jvp``/``jax.vjp`` primitives, ``jax.vmap`` and ``jax.jit``.

Models are functions ``apply_fn(params, x)`` of any pytree ``params``
(nested dicts/lists/tuples, flax-style variable dicts, registered custom
pytrees such as equinox modules), plain scalar functions ``fn(params)``, and
callable pytrees used as stateful models (``model(x)``, equinox style).
Parameter names are the dotted key paths of ``jax.tree_util``
(``"dense.kernel"``, ``"layers.0.w"``); a bare array is ``"params"``.  The
flat vector follows JAX's leaf order, the order of
``jax.flatten_util.ravel_pytree`` (dict keys sorted).

The core's default products (forward-over-reverse HVP, the GGN chain
``v → Jv → H_z Jv → J^T H_z Jv``) are vmapped over the rows of ``V`` and
compiled once per operator by :meth:`JaxBackend.compile`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._backend import Array, Backend, ParameterBinding


def _is_jax_array(x: Any) -> bool:
    # Tracers are jax.Array instances too, so this holds inside jit/vmap.
    return isinstance(x, jax.Array)


def _is_array_like(x: Any) -> bool:
    """An array of any framework (NumPy, torch, TensorFlow, JAX)."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _key_name(key: Any) -> str:
    """One step of a ``jax.tree_util`` key path as it appears in a dotted name."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key).strip(".[]'\"")


def _path_name(path: tuple[Any, ...]) -> str:
    return ".".join(_key_name(k) for k in path) or "params"


def _named_leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Every leaf of ``tree`` with its dotted name, and the tree structure."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(_path_name(path), leaf) for path, leaf in with_path], treedef


def _framework_of(x: Any) -> str:
    return type(x).__module__.split(".")[0]


class _Static:
    """A non-array argument of a compiled function, hashed by value when it can be."""

    __slots__ = ("value", "_key")

    def __init__(self, value: Any) -> None:
        self.value = value
        try:
            hash(value)
            self._key: Hashable = (True, value)
        except TypeError:  # unhashable: the same object means the same trace
            self._key = (False, id(value))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and type(self.value) is type(other.value) and self._key == other._key


def _is_traceable(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


class JaxBackend(Backend):
    """The JAX backend (``backend="jax"``)."""

    name = "jax"
    eager = False

    @property
    def xp(self) -> Any:
        return jnp

    # ------------------------------------------------------------------ detection
    def owns(self, obj: Any) -> bool:
        if _is_jax_array(obj):
            return True
        if callable(obj) and _framework_of(obj) in ("jax", "jaxlib"):
            return True  # a jax.jit-wrapped apply function
        leaves = jax.tree_util.tree_leaves(obj)
        if not leaves or (len(leaves) == 1 and leaves[0] is obj):
            return False
        arrays = [leaf for leaf in leaves if _is_array_like(leaf)]
        # Non-array leaves (activation functions, sizes) are allowed; arrays of
        # another framework or NumPy arrays are not.
        return bool(arrays) and all(_is_jax_array(a) for a in arrays)

    def is_array(self, obj: Any) -> bool:
        return _is_jax_array(obj)

    def to_numpy(self, x: Array) -> np.ndarray:
        return np.asarray(jax.device_get(x))

    def asarray(self, a: np.ndarray, like: Array) -> Array:
        a = np.asarray(a)
        # Floats take the parameters' dtype; labels stay integer (int32 unless x64 is on).
        dtype = like.dtype if a.dtype.kind == "f" else None
        if isinstance(like, jax.core.Tracer):  # inside jit/vmap: no device to read, placement follows the trace
            return jnp.asarray(a, dtype=dtype)
        out = jnp.asarray(a, dtype=dtype)
        devices = like.devices()
        return jax.device_put(out, next(iter(devices))) if len(devices) == 1 else out

    # ------------------------------------------------------------------ parameters
    def _tree_and_call(self, model: Any, weights: Any) -> tuple[Any, Callable[[Any, Any], Any]]:
        """The parameter tree and ``call(tree, x)`` evaluating the model with it."""
        if weights is None:
            # A callable pytree (equinox-style module) is its own parameter tree.
            def call_module(tree: Any, x: Any) -> Any:
                return tree(*x) if isinstance(x, tuple) else tree(x)

            return model, call_module

        def call_function(tree: Any, x: Any) -> Any:
            return model(tree) if x is None else model(tree, x)

        return weights, call_function

    def named_parameters(self, model: Any, weights: Any) -> list[tuple[str, Array]]:
        tree, _ = self._tree_and_call(model, weights)
        named, _ = _named_leaves(tree)
        return [(n, leaf) for n, leaf in named if _is_jax_array(leaf)]

    def bind(self, model: Any, weights: Any, selected: Sequence[str]) -> ParameterBinding:
        tree, call = self._tree_and_call(model, weights)
        named, treedef = _named_leaves(tree)
        leaves = [leaf for _, leaf in named]
        position = {n: i for i, (n, leaf) in enumerate(named) if _is_jax_array(leaf)}
        missing = [n for n in selected if n not in position]
        if missing:
            raise ValueError(f"no parameters named {missing}; the parameters are {list(position)}")
        index = [position[n] for n in selected]
        shapes = [tuple(int(d) for d in leaves[i].shape) for i in index]
        dtypes = [leaves[i].dtype for i in index]
        w = jnp.concatenate([jnp.ravel(leaves[i]) for i in index])
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        bounds = np.cumsum([0] + sizes).tolist()
        unselected = {i for n, i in position.items() if n not in set(selected)}

        def fill(flat: Array, base: list[Any]) -> Any:
            # Static slices: free views under jit.
            out = list(base)
            for k, i in enumerate(index):
                out[i] = jnp.reshape(flat[bounds[k] : bounds[k + 1]], shapes[k])
            return jax.tree_util.tree_unflatten(treedef, out)

        def apply(flat: Array, x: Any) -> Array:
            return call(fill(flat, leaves), x)

        # Vectors over a subset leave the other parameters out (None, an empty subtree).
        tree_base = [None if i in unselected else leaf for i, leaf in enumerate(leaves)]

        def to_tree(flat: Array) -> Any:
            return fill(flat, tree_base)

        def from_tree(v: Any) -> Array:
            return _flatten_by_name(v, list(selected), shapes, dtypes)

        return ParameterBinding(w, list(selected), shapes, apply, to_tree, from_tree)

    # ------------------------------------------------------------------ primitives
    def value_and_grad(self, f: Callable[[Array], Array], w: Array) -> tuple[Array, Array]:
        return jax.value_and_grad(f)(w)

    def jvp(self, f: Callable[[Array], Array], w: Array, v: Array) -> tuple[Array, Array]:
        return jax.jvp(f, (w,), (v,))

    def vjp(self, f: Callable[[Array], Array], w: Array, u: Array) -> tuple[Array, Array]:
        out, pullback = jax.vjp(f, w)
        return out, pullback(u)[0]

    def vmap(self, f: Callable[..., Array], in_axes: tuple[int | None, ...]) -> Callable[..., Array] | None:
        return jax.vmap(f, in_axes=in_axes)

    def compile(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """``jax.jit(f)``, with non-array leaves of the arguments made static.

        Arrays are traced; anything else in the arguments (strings, flags,
        Python numbers inside a batch) becomes part of the cache key, so such
        batches compile once per distinct value instead of failing to trace.
        """

        @functools.partial(jax.jit, static_argnums=(0, 1))
        def run(treedef: Any, static: tuple[tuple[int, _Static], ...], arrays: list[Array]) -> Any:
            leaves = list(arrays)
            for i, item in static:
                leaves.insert(i, item.value)
            return f(*jax.tree_util.tree_unflatten(treedef, leaves))

        @functools.wraps(f)
        def call(*args: Any) -> Any:
            leaves, treedef = jax.tree_util.tree_flatten(args)
            static = tuple((i, _Static(leaf)) for i, leaf in enumerate(leaves) if not _is_traceable(leaf))
            arrays = [leaf for leaf in leaves if _is_traceable(leaf)]
            return run(treedef, static, arrays)

        return call

    def stop_gradient(self, x: Array) -> Array:
        return jax.lax.stop_gradient(x)


def _flatten_by_name(
    tree: Any, names: Sequence[str], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[Any]
) -> Array:
    """Flatten a tree of JAX arrays shaped like the selected parameters, checking names, shapes and dtypes."""
    if _is_array_like(tree) and not isinstance(tree, (np.ndarray, np.generic)):
        raise TypeError(
            f"v is a {_framework_of(tree)}.{type(tree).__name__} but the model is a JAX model; arrays from two "
            "frameworks cannot be mixed: convert v to a JAX array (jnp.asarray)"
        )
    named, _ = _named_leaves(tree)
    arrays: dict[str, Any] = {}
    for name, leaf in named:
        if _is_jax_array(leaf):
            arrays[name] = leaf
        elif isinstance(leaf, (np.ndarray, np.generic)):
            raise TypeError(f"v[{name!r}] is a NumPy array; pass JAX arrays (jnp.asarray) in the tree")
        elif _is_array_like(leaf):
            raise TypeError(
                f"v[{name!r}] is a {_framework_of(leaf)}.{type(leaf).__name__} but the model is a JAX model; "
                "arrays from two frameworks cannot be mixed: convert v to JAX arrays (jnp.asarray)"
            )
        # Other leaves (functions, sizes of an equinox-style module) carry no vector entries.
    if set(arrays) != set(names):
        raise ValueError(
            f"v has entries {sorted(arrays)} but the parameters are {list(names)}; pass a flat vector, "
            "or a tree shaped like the parameters (with None in place of parameters outside params=)"
        )
    parts = []
    for name, shape, dtype in zip(names, shapes, dtypes):
        leaf = arrays[name]
        if tuple(leaf.shape) != tuple(shape):
            raise ValueError(f"v[{name!r}] has shape {tuple(leaf.shape)}, expected {tuple(shape)}")
        if leaf.dtype != dtype:
            raise TypeError(
                f"v[{name!r}] has dtype {np.dtype(leaf.dtype).name} but the parameter is "
                f"{np.dtype(dtype).name}; cast v to the parameters' dtype"
            )
        parts.append(jnp.ravel(leaf))
    return jnp.concatenate(parts)
