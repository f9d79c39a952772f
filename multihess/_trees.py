"""Flattening of plain Python containers (dicts, lists, tuples) into named leaves.

Used by backends for parameter trees that their framework has no tree
utilities for, and by the core to look at every array in a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def named_leaves(tree: Any, is_leaf: Callable[[Any], bool], prefix: str = "") -> list[tuple[str, Any]]:
    """Leaves of nested dicts/lists/tuples with dotted names (``"layer.0.weight"``).

    A bare leaf gets the name ``"params"``.
    """
    if is_leaf(tree):
        return [(prefix or "params", tree)]
    if isinstance(tree, dict):
        items = list(tree.items())
    elif isinstance(tree, (list, tuple)):
        items = list(enumerate(tree))
    else:
        return []
    out: list[tuple[str, Any]] = []
    for key, value in items:
        out.extend(named_leaves(value, is_leaf, f"{prefix}.{key}" if prefix else str(key)))
    return out


def rebuild(tree: Any, is_leaf: Callable[[Any], bool], leaves: dict[str, Any], prefix: str = "") -> Any:
    """A copy of ``tree`` with the leaves named in ``leaves`` replaced."""
    if is_leaf(tree):
        return leaves.get(prefix or "params", tree)
    if isinstance(tree, dict):
        return type(tree)(
            (k, rebuild(v, is_leaf, leaves, f"{prefix}.{k}" if prefix else str(k))) for k, v in tree.items()
        )
    if isinstance(tree, (list, tuple)):
        items = [rebuild(v, is_leaf, leaves, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(tree)]
        return type(tree)(items) if not hasattr(tree, "_fields") else type(tree)(*items)
    return tree


def all_leaves(tree: Any) -> list[Any]:
    """Every non-container object in nested dicts/lists/tuples."""
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in all_leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in all_leaves(v)]
    return [tree]
