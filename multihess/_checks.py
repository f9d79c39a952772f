"""Argument checks shared by the estimators, spectra and norms: one clear error per kind of mistake.

Each check returns the value in the type the caller needs, or raises an
error that names the argument, what was wrong and how to fix it.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ._operator import CurvatureOperator, as_operator

MEMORY_BUDGET = 2**30
"""Default bound, in bytes, on the probe and product blocks held at once (1 GiB)."""


def check_operator(op: Any, what: str, symmetric: bool = True) -> CurvatureOperator:
    """``op`` as a curvature operator (a symmetric one when ``symmetric``), or a clear error.

    Accepts what :func:`~multihess._operator.as_operator` accepts: an
    operator, a square framework matrix, or an object with the operator
    interface.
    """
    op = as_operator(op, what)
    if symmetric and not op.is_symmetric:
        raise ValueError(
            f"{what} needs a symmetric operator, but this one is a cross block of shape {op.shape} "
            "(rows and columns are different parameters); build it without col_params="
        )
    return op


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """An integer argument of at least ``minimum``, or a clear error.

    >>> check_count(3, "k")
    3
    >>> check_count(0, "k")
    Traceback (most recent call last):
    ...
    ValueError: k must be at least 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int (at least {minimum}), got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``, or a clear error listing them.

    >>> check_choice("xtrace", "method", ("hutchinson", "xtrace"))
    'xtrace'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name}={value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def check_positive(value: Any, name: str) -> float:
    """A positive finite number, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def make_rng(seed: Any) -> np.random.Generator:
    """``numpy.random.default_rng(seed)`` for an int seed (or ``None``), or a clear error."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int (or None for fresh randomness), got {type(seed).__name__}")
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng(seed)


def check_memory_budget(value: Any) -> int:
    """The memory budget in bytes (default :data:`MEMORY_BUDGET`), or a clear error.

    >>> check_memory_budget(None) == MEMORY_BUDGET
    True
    """
    if value is None:
        return MEMORY_BUDGET
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"memory_budget must be an int number of bytes, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {value}")
    return int(value)
