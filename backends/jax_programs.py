"""Compiled JAX programs shared between operators that trace to the same program.

Every operator compiles its own products (``jax.jit`` of a closure over its
model, loss and parameter layout), so a second operator on the same model,
at new parameter values, would compile everything again although only the
arguments differ.  Compiling is most of the cost of a first product (for a
small transformer's Hessian-vector product, 4.5 s of compilation after 0.25 s
of tracing).  Tracing, though, is cheap, and it is the only safe way to tell
that two closures compute the same thing: a model function may read globals
or closed-over arrays that changed in between.

So each compiled function traces itself once per argument signature, as
``jax.jit`` would, and looks its program up here: the jaxpr's text, its
constants (small host constants by value, arrays by identity) and the
structure of its outputs.  An equal program found among the recent ones
lends its ``jax.jit`` runner, whose executable is already compiled; otherwise
the new runner is recorded.  Nothing is shared between programs that
differ in any op, shape, dtype, static argument or constant.  What changes
only the lowering (``jax.default_matmul_precision``, the device) needs no
key here: the runner is a ``jax.jit`` function, which compiles anew for it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

RECENT = 8
"""Programs remembered (each keeps its runner, hence its closure, alive)."""

SMALL_CONSTANT = 1 << 20
"""Host constants up to this many bytes are compared by value (traces make them afresh), larger by identity."""

_recent: OrderedDict[Hashable, tuple[Any, list[Any]]] = OrderedDict()
_lock = threading.Lock()  # operators may be built from several threads


def _constant_key(value: Any) -> Hashable:
    if isinstance(value, np.ndarray) and value.nbytes <= SMALL_CONSTANT:
        return ("value", value.dtype.str, value.shape, value.tobytes())
    return ("object", id(value))  # kept alive with the entry, so the id cannot be reused meanwhile


def _constants(jaxpr: Jaxpr, found: list[Any]) -> bool:
    """Collect the constants of every sub-jaxpr (printing shows their names, not their values).

    Returns ``False`` for a program that calls back into Python: the
    callback prints by name only, so two such programs cannot be told apart.
    """
    for eqn in jaxpr.eqns:
        if "callback" in eqn.primitive.name:
            return False
        stack = list(eqn.params.values())
        while stack:
            value = stack.pop()
            if isinstance(value, ClosedJaxpr):
                found.extend(value.consts)
                stack.append(value.jaxpr)
            elif isinstance(value, Jaxpr):
                if not _constants(value, found):
                    return False
            elif isinstance(value, (tuple, list)):
                stack.extend(value)
    return True


def shared_runner(run: Any, args: Sequence[Any]) -> Any:
    """``run`` (a ``jax.jit`` function), or the runner of an equal program traced earlier, for ``args``.

    Traces ``run`` on ``args`` (``jax.jit`` keeps the trace for the call
    that follows).  Arguments that are tracers (a call inside another
    transformation) are not looked up: ``run`` itself is returned.
    """
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(args)):
        return run
    traced = run.trace(*args)
    closed = traced.jaxpr
    constants = list(closed.consts)
    if not _constants(closed.jaxpr, constants):
        return run
    key = (
        str(closed.jaxpr),
        tuple(_constant_key(c) for c in constants),
        jax.tree_util.tree_structure(traced.out_info),
    )
    with _lock:
        found = _recent.get(key)
        if found is not None:
            _recent.move_to_end(key)
            return found[0]
        _recent[key] = (run, constants)
        while len(_recent) > RECENT:
            _recent.popitem(last=False)
    return run


def forget() -> None:
    """Drop every remembered program (their runners and constants)."""
    with _lock:
        _recent.clear()
