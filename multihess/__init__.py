"""multihess: Hessians, Gauss-Newton matrices and their spectra for PyTorch, JAX and TensorFlow.

Importing this package imports no framework; a backend loads when its
framework's objects are first passed in.
"""

from ._api import curvature_effect, finite_difference_hessian, ggn, hessian
from ._backend import Backend, Linearization, ParameterBinding
from ._dispatch import get_backend, register_backend
from ._losses import LOSSES
from ._operator import CurvatureOperator

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "CurvatureOperator",
    "LOSSES",
    "Linearization",
    "ParameterBinding",
    "curvature_effect",
    "finite_difference_hessian",
    "get_backend",
    "ggn",
    "hessian",
    "register_backend",
]
