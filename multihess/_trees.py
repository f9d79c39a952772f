"""Parameter trees, written once: names, flattening, checks and error messages.

Each backend brings its framework's own pytree tools as ``backend.tree``
(``jax.tree_util``, ``torch.utils._pytree``, ``tf.nest`` with ``keras.tree``
paths); :data:`PYTHON_TREES` serves frameworks without any (plain dicts,
lists, tuples and namedtuples).  A tool set has two functions:

* ``flatten_with_path(tree) -> (list of (path, leaf), treedef)``, a path
  being the tuple of keys from the root (framework key objects or plain
  keys), and
* ``unflatten(treedef, leaves) -> tree``.

On top of these the core names leaves (``"layer.0.weight"``; a bare array is
``"params"``), turns a tree of vectors into one flat array with every check
and message in one place (:func:`flatten_by_name`), and builds the vector
trees of functional models (:class:`TreeLayout`).

Examples
--------
>>> import numpy as np
>>> named, _ = named_leaves(PYTHON_TREES, {"dense": {"w": 1, "b": 2}, "scale": [3]})
>>> named
[('dense.w', 1), ('dense.b', 2), ('scale.0', 3)]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ._arrays import dtype_name, shape

Array = Any


@dataclass(frozen=True)
class TreeTools:
    """A framework's pytree tools, as the core calls them.

    Attributes
    ----------
    flatten_with_path : callable
        ``tree -> (list of (path, leaf), treedef)``.
    unflatten : callable
        ``(treedef, leaves) -> tree``.
    """

    flatten_with_path: Callable[[Any], tuple[list[tuple[tuple[Any, ...], Any]], Any]]
    unflatten: Callable[[Any, Sequence[Any]], Any]


class PythonTrees:
    """Pytree tools for plain Python containers: dicts (in insertion order), lists, tuples, namedtuples.

    ``None`` is an empty subtree, as in JAX: it has no leaves.
    """

    @staticmethod
    def flatten_with_path(tree: Any) -> tuple[list[tuple[tuple[Any, ...], Any]], Any]:
        out: list[tuple[tuple[Any, ...], Any]] = []
        return out, _walk(tree, (), out)

    @staticmethod
    def unflatten(treedef: Any, leaves: Sequence[Any]) -> Any:
        return _build(treedef, iter(leaves))


# Module-level recursion: a recursive closure would be a reference cycle that keeps every
# leaf it saw (whole batches of data) alive until the garbage collector runs.
def _walk(node: Any, path: tuple[Any, ...], out: list[tuple[tuple[Any, ...], Any]]) -> Any:
    """The structure of ``node``, appending its leaves with their paths to ``out``."""
    if node is None:
        return None
    if isinstance(node, dict):
        return (type(node), [(k, _walk(v, path + (k,), out)) for k, v in node.items()])
    if isinstance(node, (list, tuple)):
        return (type(node), [(i, _walk(v, path + (i,), out)) for i, v in enumerate(node)])
    out.append((path, node))
    return "*"


def _build(node: Any, leaves: Iterator[Any]) -> Any:
    """The tree of structure ``node`` with its leaves taken in order from ``leaves``."""
    if node is None:
        return None
    if node == "*":
        return next(leaves)
    kind, children = node
    if issubclass(kind, dict):
        return kind((k, _build(child, leaves)) for k, child in children)
    items = [_build(child, leaves) for _, child in children]
    return kind(*items) if hasattr(kind, "_fields") else kind(items)


PYTHON_TREES = PythonTrees()


def key_name(key: Any) -> str:
    """One step of a path as it reads in a dotted name, for any framework's key objects."""
    if isinstance(key, (str, int)):
        return str(key)
    for attribute in ("key", "idx", "name"):  # DictKey/MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key).strip(".[]'\"")


def named_leaves(tools: Any, tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Every leaf of ``tree`` with its dotted name, in the tools' leaf order, and the tree structure."""
    with_path, treedef = tools.flatten_with_path(tree)
    return [(".".join(key_name(k) for k in path) or "params", leaf) for path, leaf in with_path], treedef


def all_leaves(tree: Any) -> list[Any]:
    """Every leaf of nested dicts, lists and tuples (the arrays of a batch)."""
    return [leaf for _, leaf in PYTHON_TREES.flatten_with_path(tree)[0]]


def framework_of(x: Any) -> str:
    """The top-level module of an object's type: ``"torch"``, ``"jax"``, ``"numpy"``."""
    return type(x).__module__.split(".")[0]


def flatten_by_name(
    backend: Any,
    leaves: dict[str, Any],
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[str],
) -> Array:
    """Entries of a vector tree keyed by parameter name, checked and concatenated in the order of ``names``.

    Every mismatch gets one message, whatever the framework: missing or
    extra entries, NumPy arrays or arrays of another framework, wrong
    shapes, wrong dtypes.  ``dtypes`` are NumPy-style names.
    """
    xp = backend.xp
    parts = [xp.reshape(leaf, (-1,)) for leaf in checked_by_name(backend, leaves, names, shapes, dtypes)]
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def checked_by_name(
    backend: Any,
    leaves: dict[str, Any],
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[str],
) -> list[Array]:
    """The entries of :func:`flatten_by_name`, checked the same way, in the order of ``names`` and not joined."""
    if set(leaves) != set(names):
        raise ValueError(
            f"v has entries {sorted(leaves)} but the parameters are {list(names)}; pass a flat vector, "
            "or a tree shaped like the parameters (with None in place of parameters outside params=)"
        )
    parts = []
    for name, want_shape, want_dtype in zip(names, shapes, dtypes):
        leaf = leaves[name]
        if framework_of(leaf) == "numpy":
            raise TypeError(f"v[{name!r}] is a NumPy array; pass {backend.name} arrays in the tree")
        if not backend.is_array(leaf):
            raise TypeError(
                f"v[{name!r}] is a {framework_of(leaf)}.{type(leaf).__name__} but the model is a {backend.name} "
                f"model; arrays from two frameworks cannot be mixed: convert v to {backend.name} arrays"
            )
        if shape(leaf) != tuple(want_shape):
            raise ValueError(f"v[{name!r}] has shape {shape(leaf)}, expected {tuple(want_shape)}")
        if dtype_name(leaf) != want_dtype:
            raise TypeError(
                f"v[{name!r}] has dtype {dtype_name(leaf)} but the parameter is {want_dtype}; "
                "cast v to the parameters' dtype"
            )
        parts.append(leaf)
    return parts


def check_not_foreign(backend: Any, v: Any) -> None:
    """Reject a whole vector of another framework (or NumPy) before looking inside it as a tree."""
    if hasattr(v, "shape") and hasattr(v, "dtype") and not backend.is_array(v):
        raise TypeError(
            f"v is a {framework_of(v)}.{type(v).__name__} but the model is a {backend.name} model; arrays from "
            f"two frameworks cannot be mixed: convert v to a {backend.name} array"
        )


@dataclass
class TreeLayout:
    """Where the parameters of a functional model sit in its tree, and the vector trees built from that.

    Attributes
    ----------
    tools : pytree tools
        The backend's ``tree``.
    treedef : Any
        The structure of the parameter tree.
    leaves : list
        Every leaf of the tree (parameters and other leaves: sizes, functions).
    position : dict of str to int
        Leaf index of each parameter, by name.
    """

    tools: Any
    treedef: Any
    leaves: list[Any]
    position: dict[str, int]

    @classmethod
    def of(cls, tools: Any, tree: Any, is_parameter: Callable[[Any], bool]) -> TreeLayout:
        named, treedef = named_leaves(tools, tree)
        position = {name: i for i, (name, leaf) in enumerate(named) if is_parameter(leaf)}
        return cls(tools, treedef, [leaf for _, leaf in named], position)

    def check_selected(self, selected: Sequence[str]) -> None:
        missing = [n for n in selected if n not in self.position]
        if missing:
            raise ValueError(f"no parameters named {missing}; the parameters are {list(self.position)}")

    def filled(self, parts: dict[str, Any], others: Any = "keep") -> Any:
        """The tree with the parameters in ``parts`` replaced; the other parameters kept, or ``None``."""
        leaves = list(self.leaves)
        for name, i in self.position.items():
            if name in parts:
                leaves[i] = parts[name]
            elif others is None:
                leaves[i] = None
        return self.tools.unflatten(self.treedef, leaves)

    def entries(self, backend: Any, v: Any) -> dict[str, Any]:
        """The entries of a vector tree shaped like the parameters, by name (``None`` entries left out)."""
        check_not_foreign(backend, v)
        named, _ = named_leaves(self.tools, v)
        # Non-array leaves (sizes, functions of a module) carry no vector entries.
        return {name: leaf for name, leaf in named if leaf is not None and hasattr(leaf, "shape")}


def split_flat(
    xp: Any,
    flat: Array,
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    split: Callable[[Array, list[int]], Sequence[Array]] | None = None,
) -> dict[str, Array]:
    """The parameters' parts of a flat vector, by name.

    By default static slices.  Each slice's backward pass writes a zero
    vector as long as ``flat`` (in eager PyTorch and TensorFlow, and in
    JAX unless the compiler folds them), so backends pass the framework's
    ``split`` (``split(flat, sizes)``): one backward concatenation instead
    of one full-length vector per parameter.
    """
    sizes = [math.prod(int(d) for d in dims) for dims in shapes]
    if split is not None:
        pieces = split(flat, sizes)
    else:
        offsets = [0, *itertools.accumulate(sizes)]
        pieces = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return {name: xp.reshape(piece, tuple(dims)) for name, dims, piece in zip(names, shapes, pieces)}


def vector_trees(
    backend: Any, layout: TreeLayout, selected: Sequence[str], chosen: Sequence[Array]
) -> tuple[Callable[[Array], Any], Callable[[Any], Array], Callable[[Any], list[Array]], Callable[[Sequence], Any]]:
    """``to_tree``, ``from_tree``, ``parts_of`` and ``from_parts`` of a functional model's binding.

    The contract of ``Backend.bind``: ``to_tree`` answers in the structure
    of the parameter tree with ``None`` in place of parameters outside
    ``selected``; ``from_tree`` reads such a tree back, with every check of
    :func:`flatten_by_name`.  ``parts_of`` and ``from_parts`` do the same
    with the entries kept apart, in the order of ``selected``.
    """
    names = list(selected)
    shapes = [shape(p) for p in chosen]
    dtypes = [dtype_name(p) for p in chosen]

    def to_tree(flat: Array) -> Any:
        return layout.filled(split_flat(backend.xp, flat, names, shapes), others=None)

    def from_tree(v: Any) -> Array:
        return flatten_by_name(backend, layout.entries(backend, v), names, shapes, dtypes)

    dtype_objects = [p.dtype for p in chosen]
    known: dict[Any, list[int]] = {}  # tree structure → where the selected entries sit among its leaves

    def parts_of(v: Any) -> list[Array]:
        # A structure seen before and checked leaves in the expected places need no names: one flatten and
        # attribute comparisons (a few µs, where naming every leaf takes tens of µs, per product).
        with_path, treedef = layout.tools.flatten_with_path(v)
        where = _lookup(known, treedef)
        if where is not None:
            parts = [with_path[i][1] for i in where]
            if all(
                backend.is_array(p) and p.dtype == d and tuple(shape(p)) == s
                for p, d, s in zip(parts, dtype_objects, shapes)
            ):
                return parts
        parts = checked_by_name(backend, layout.entries(backend, v), names, shapes, dtypes)
        ids = {id(leaf): i for i, (_, leaf) in enumerate(with_path)}
        if len(ids) == len(with_path) and all(id(p) in ids for p in parts) and len(known) < 8:
            _remember(known, treedef, [ids[id(p)] for p in parts])
        return parts

    def from_parts(parts: Sequence[Array]) -> Any:
        return layout.filled(dict(zip(names, parts)), others=None)

    return to_tree, from_tree, parts_of, from_parts


def _lookup(known: dict[Any, list[int]], treedef: Any) -> list[int] | None:
    """``known[treedef]``, or ``None`` for a structure not seen or not hashable (plain Python containers)."""
    try:
        return known.get(treedef)
    except TypeError:
        return None


def _remember(known: dict[Any, list[int]], treedef: Any, where: list[int]) -> None:
    try:
        known[treedef] = where
    except TypeError:
        pass
