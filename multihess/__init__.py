"""multihess: Hessians, Gauss-Newton matrices and their spectra for PyTorch, JAX and TensorFlow.

Importing this package imports no framework; a backend loads when its
framework's objects are first passed in.
"""

from ._api import curvature_effect, finite_difference_hessian, ggn, hessian
from ._backend import Backend, Linearization, ParameterBinding
from ._chain_rule_error import ChainRuleResult, chain_rule_error
from ._diagonal import diagonal
from ._dispatch import get_backend, register_backend
from ._estimate import Estimate
from ._losses import LOSSES
from ._norms import frobenius_norm
from ._operator import CurvatureOperator
from ._report import report
from ._spectral import SpectralDensity, eigvalsh, spectral_density
from ._summary import BlockSummary, summary
from ._trace import trace

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BlockSummary",
    "ChainRuleResult",
    "CurvatureOperator",
    "Estimate",
    "LOSSES",
    "Linearization",
    "ParameterBinding",
    "SpectralDensity",
    "chain_rule_error",
    "curvature_effect",
    "diagonal",
    "eigvalsh",
    "finite_difference_hessian",
    "frobenius_norm",
    "get_backend",
    "ggn",
    "hessian",
    "register_backend",
    "report",
    "spectral_density",
    "summary",
    "trace",
]
