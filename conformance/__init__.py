"""The conformance suite: small problems every backend must get right, checked against NumPy float64 oracles.

Run it against one or more backends (built-in or registered by a third party)::

    python -m multihess.conformance --backend torch --backend jax

or, from a source checkout, ``python -m pytest conformance --backend=torch``.
Every problem is written once in array-API style and differentiated by each
backend; the oracles (closed forms, finite differences of hand-written
gradients) use NumPy only.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def _library() -> ModuleType:
    """The package this suite belongs to.

    Installed, this folder is a subpackage and the library is its parent.
    Collected by pytest from a source checkout, the folder is imported as a
    top-level package of its own; the library is then the installed one.
    """
    try:
        return importlib.import_module("..", __name__)
    except (ImportError, ValueError):
        return importlib.import_module("multihess")


mh = _library()
"""The library under test (``import multihess as mh`` without naming the package)."""

__all__ = ["mh"]
