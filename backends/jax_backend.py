"""JAX adapter: ``jax.grad``/``jax.jvp``/``jax.vjp`` primitives, ``jax.vmap`` and ``jax.jit``.

Models are functions ``apply_fn(params, x)`` of any pytree ``params``
(nested dicts/lists/tuples, flax-style variable dicts, registered custom
pytrees such as equinox modules), plain scalar functions ``fn(params)``, and
callable pytrees used as stateful models (``model(x)``, equinox style).
The parameters are the tree's arrays, except for flax models: an
``nnx.Module``'s ``nnx.Param`` leaves, and the ``"params"`` collection of a
linen variables dict with other collections (``"batch_stats"``).
Parameter names are the dotted key paths of ``jax.tree_util``
(``"dense.kernel"``, ``"layers.0.w"``); a bare array is ``"params"``.  The
flat vector follows JAX's leaf order, the order of
``jax.flatten_util.ravel_pytree`` (dict keys sorted).

The core's default products (forward-over-reverse HVP, the GGN chain
``v → Jv → H_z Jv → J^T H_z Jv``) are vmapped over the rows of ``V`` and
compiled once per operator by :meth:`JaxBackend.compile`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._backend import Array, Backend, ParameterBinding
from .._trees import TreeLayout, TreeTools, framework_of, named_leaves, split_flat, vector_trees
from .jax_programs import shared_runner


def _is_jax_array(x: Any) -> bool:
    # Tracers are jax.Array instances too, so this holds inside jit/vmap.
    return isinstance(x, jax.Array)


def _flax_parameters(tree: Any, named: list[tuple[str, Array]]) -> list[tuple[str, Array]]:
    """The trainable arrays of a flax model, by flax's own conventions; every array otherwise.

    An ``nnx.Module`` holds its batch statistics, caches and RNG state as arrays
    of the same pytree: only its ``nnx.Param`` leaves are parameters.  A linen
    variables dict (``{"params": ..., "batch_stats": ...}``) keeps them in the
    ``"params"`` collection.  ``params=`` still selects among these.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(tree, nnx.Module):
        trainable = {id(leaf) for leaf in jax.tree_util.tree_leaves(nnx.state(tree, nnx.Param))}
        return [(n, leaf) for n, leaf in named if id(leaf) in trainable]
    if "flax" in sys.modules and isinstance(tree, Mapping) and "params" in tree and len(tree) > 1:
        return [(n, leaf) for n, leaf in named if n.startswith("params.")]
    return named


def _is_array_like(x: Any) -> bool:
    """An array of any framework (NumPy, torch, TensorFlow, JAX)."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


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


def _on_common_devices(arrays: list[Any], replicas: dict[int, tuple[Any, Any]]) -> list[Any]:
    """The arrays, with those on one device replicated over the devices of a sharded one (a sharded batch).

    jit needs every argument on the same devices.  Parameters are replicated
    once and kept (``replicas``, by identity); vectors, new at each call,
    are replicated each time.  Nothing changes when no argument is sharded.
    """
    widest = max((a.devices() for a in arrays if isinstance(a, jax.Array)), key=len, default=set())
    if len(widest) < 2:
        return arrays
    mesh = jax.sharding.Mesh(np.array(sorted(widest, key=lambda d: d.id)), ("devices",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out = []
    for a in arrays:
        if not isinstance(a, jax.Array) or len(a.devices()) > 1:
            out.append(a)
            continue
        kept = replicas.get(id(a))
        if kept is None or kept[0] is not a:
            kept = (a, jax.device_put(a, replicated))
            if a.size > 1024:  # parameters: worth keeping; small arrays are cheaper to copy again
                replicas[id(a)] = kept
        out.append(kept[1])
    return out


def _dense_matrix(f: Callable[[Array, Any, Array], Array], w: Array, batch: Any, chunk: int) -> Array:
    """The matrix whose column ``j`` is ``f(w, batch, e_j)``, ``chunk`` columns at a time (meant to be jitted).

    ``f`` is linear in its vector, so it equals its own linearization at
    zero: ``jax.linearize`` evaluates the part that does not depend on the
    vector (the forward pass and the gradient) once and keeps what the
    linear part reads, and ``lax.map`` runs the linear part on each chunk
    of unit vectors, made on the device.  A loop of batched products would
    redo the forward pass for every chunk.
    """
    n = int(w.shape[0])
    _, linear = jax.linearize(lambda v: f(w, batch, v), jnp.zeros_like(w))
    rows_of = jax.vmap(linear)
    chunk = max(1, min(chunk, n))
    count = -(-n // chunk)
    columns = jnp.arange(n)

    def block(first: Array) -> Array:
        units = (first + jnp.arange(chunk))[:, None] == columns[None, :]  # rows past n are zero
        return rows_of(units.astype(w.dtype))

    blocks = jax.lax.map(block, jnp.arange(count) * chunk)
    return jnp.matrix_transpose(jnp.reshape(blocks, (count * chunk, -1))[:n])


class JaxBackend(Backend):
    """The JAX backend (``backend="jax"``)."""

    name = "jax"
    eager = False
    tree = TreeTools(jax.tree_util.tree_flatten_with_path, jax.tree_util.tree_unflatten)

    def __init__(self) -> None:
        # Parameters replicated over the devices of sharded batches, by identity (see _on_common_devices).
        self._replicas: dict[int, tuple[Any, Any]] = {}

    @property
    def xp(self) -> Any:
        return jnp

    # ------------------------------------------------------------------ detection
    def owns(self, obj: Any) -> bool:
        if _is_jax_array(obj):
            return True
        if callable(obj) and framework_of(obj) in ("jax", "jaxlib"):
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
        """``x`` on the host as NumPy; bfloat16 comes back as float32 (exactly), as in every backend.

        JAX would hand out ``ml_dtypes.bfloat16`` arrays, which NumPy's own
        routines (``linalg``, ``finfo``) do not take.
        """
        if x.dtype == jnp.bfloat16:
            x = x.astype(jnp.float32)
        return np.asarray(jax.device_get(x))

    def asarray(self, a: np.ndarray | Array, like: Array) -> Array:
        if _is_jax_array(a):
            # Sharded data (a batch split over devices) stays as it is: jit places the computation.
            if isinstance(like, jax.core.Tracer) or len(a.devices()) > 1 or a.devices() == like.devices():
                return a
            return jax.device_put(a, next(iter(like.devices())))
        a = np.asarray(a)
        # Floats take the parameters' dtype; labels stay integer (int32 unless x64 is on).
        dtype = like.dtype if a.dtype.kind == "f" else None
        out = jnp.asarray(a, dtype=dtype)
        # Inside jit/vmap placement follows the trace; beside an uncommitted or sharded array, an
        # uncommitted result goes wherever the computation runs.
        if isinstance(like, jax.core.Tracer) or not like.committed or len(like.devices()) > 1:
            return out
        return jax.device_put(out, next(iter(like.devices())))

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
        named, _ = named_leaves(self.tree, tree)
        arrays = [(n, leaf) for n, leaf in named if _is_jax_array(leaf)]
        return _flax_parameters(tree, arrays)

    def bind(self, model: Any, weights: Any, selected: Sequence[str]) -> ParameterBinding:
        tree, call = self._tree_and_call(model, weights)
        layout = TreeLayout.of(self.tree, tree, _is_jax_array)
        layout.check_selected(selected)
        chosen = [layout.leaves[layout.position[n]] for n in selected]
        w = jnp.concatenate([jnp.ravel(p) for p in chosen])
        shapes = [tuple(int(d) for d in p.shape) for p in chosen]

        # The selected leaves are replaced at every call: without them the layout (which compiled
        # programs keep, possibly beyond this binding) holds no parameter values.
        chosen_at = {layout.position[n] for n in selected}
        frame = dataclasses.replace(layout, leaves=[None if i in chosen_at else a for i, a in enumerate(layout.leaves)])

        def apply(flat: Array, x: Any) -> Array:
            # lax.split, not slices: the derivative of a split is one concatenation, where each slice's is
            # a zero-padded copy of the whole vector (measured, HVPs 5-20 % faster with many parameters).
            return call(frame.filled(split_flat(jnp, flat, selected, shapes, jax.lax.split)), x)

        trees = vector_trees(self, layout, selected, chosen)
        return ParameterBinding(w, list(selected), shapes, apply, *trees, w_pieces=list(chosen))

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
        Each argument signature is traced once and run by the compiled
        program of an earlier operator when that traced to the same program
        (see :mod:`.jax_programs`): a new operator on the same model at new
        parameter values compiles nothing.
        """

        @functools.partial(jax.jit, static_argnums=(0, 1))
        def run(treedef: Any, static: tuple[tuple[int, _Static], ...], arrays: list[Array]) -> Any:
            leaves = list(arrays)
            for i, item in static:
                leaves.insert(i, item.value)
            return f(*jax.tree_util.tree_unflatten(treedef, leaves))

        runners: dict[Hashable, Any] = {}

        @functools.wraps(f)
        def call(*args: Any) -> Any:
            leaves, treedef = jax.tree_util.tree_flatten(args)
            static = tuple((i, _Static(leaf)) for i, leaf in enumerate(leaves) if not _is_traceable(leaf))
            arrays = _on_common_devices([leaf for leaf in leaves if _is_traceable(leaf)], self._replicas)
            signature = (treedef, static, tuple((a.shape, a.dtype, getattr(a, "weak_type", False)) for a in arrays))
            runner = runners.get(signature)
            if runner is None:
                runner = runners[signature] = shared_runner(run, (treedef, static, arrays))
            return runner(treedef, static, arrays)

        return call

    def rowwise(self, f: Callable[[Array, Any, Array], Array]) -> Callable[[Array, Any, Array], Array]:
        """The core's compiled products (see :meth:`Backend.rowwise`), with ``dense`` for dense matrices."""
        rows_product = super().rowwise(f)
        rows_product.dense = self.compile(functools.partial(_dense_matrix, f))  # type: ignore[attr-defined]
        return rows_product

    def stop_gradient(self, x: Array) -> Array:
        return jax.lax.stop_gradient(x)

    def per_sample_squares(
        self, f: Callable[[Array, Any], Array], per_cotangent: bool = False
    ) -> Callable[[Array, Any, Callable[[Array], Array], int], Array]:
        """Squared per-sample products from the jaxpr of ``f`` (see :mod:`.jax_per_sample`).

        Parameters read once by a matrix product (one row per sample, or a
        sequence of rows), a convolution, an added bias, a multiplying or
        dividing scale or an embedding lookup take a structured route; every
        other read entry takes the generic route, restricted to those entries.
        """
        from .._per_sample import generic_squares
        from .jax_per_sample import per_sample_squares

        return per_sample_squares(self, f, per_cotangent, generic_squares)
