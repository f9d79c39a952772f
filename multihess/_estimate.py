"""The result type of stochastic estimators: a value with its standard error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """An estimate and its standard error.

    Attributes
    ----------
    value : float or Array
        The estimate: a Python float for scalars (trace, norms), a 1-D array of
        the model's framework for diagonals.
    std_error : float or Array
        Standard error of ``value`` (same type and shape); 0 for exact results.
    num_probes : int
        Number of probe vectors (or sampled labels) used; 0 for exact results.
    method : str
        The method that produced it.
    """

    value: Any
    std_error: Any
    num_probes: int
    method: str

    def __float__(self) -> float:
        return float(self.value)

    def __iter__(self):
        # Unpacks as ``value, std_error = estimate``.
        yield self.value
        yield self.std_error
