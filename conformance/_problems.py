"""The conformance problems, written once and run through any backend.

Each problem is ``f(params, x)`` (or a scalar ``fn(params)``) using only
Python operators (``x @ W + b``, ``*``, ``abs``) and the backend's array-API
namespace ``xp`` (``exp``, ``sum``), so the same code runs in
PyTorch, JAX, TensorFlow or a third party's framework.  Parameters are a flat
dict ``name -> array``.  Weights and data come from one NumPy seed, so a seed
means the same numbers in every framework; the float32 problems use the
float32-rounded numbers, and their oracles are computed from those in
float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import mh
from ._oracles import Reference, Tolerance, assert_close, tolerance

__all__ = [
    "LOSS_PROBLEMS",
    "PROBLEM_NAMES",
    "Problem",
    "Tolerance",
    "assert_close",
    "make_problem",
    "make_reference",
    "probes",
    "tolerance",
]

Array = Any

PROBLEM_NAMES: tuple[str, ...] = ("linear_regression", "softmax_regression", "tanh_mlp", "relu_mlp", "input_function")
LOSS_PROBLEMS: tuple[str, ...] = tuple(n for n in PROBLEM_NAMES if n != "input_function")
DTYPES: tuple[str, ...] = ("float64", "float32")

N_SAMPLES = 8
# ReLU pre-activations are kept this far from their kink, so finite differences stay in one linear region.
RELU_MARGIN = 0.05


def probes(n: int, k: int, seed: int) -> np.ndarray:
    """``(n, k)`` standard normal probe vectors from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).standard_normal((n, k))


@dataclass
class Problem:
    """One conformance problem bound to a backend.

    Attributes
    ----------
    name, backend, dtype : str
    model : callable
        ``f(params, x)``, or ``fn(params)`` for the input function.
    weights : dict of str to framework array
    data : (x, y) or None
        Framework arrays (labels stay integer).
    loss : str or None
    layers : dict of str to list of str
        Layer name to the names of its parameters.
    reference : Reference
        The problem in float64 NumPy, for the oracles.
    """

    name: str
    backend: str
    dtype: str
    model: Any
    weights: Any
    data: Any | None
    loss: str | None
    layers: dict[str, list[str]]
    reference: Reference = field(repr=False)
    _operators: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ operators
    def _operator(self, kind: Callable[..., Any], kw: dict[str, Any]) -> Any:
        # Operators are cached per problem and arguments: compiling backends
        # then trace each product once for the whole suite.
        key = f"{kind.__name__}:{sorted(kw.items())!r}"
        cacheable = all(_plain(v) for v in kw.values())
        if cacheable and key in self._operators:
            return self._operators[key]
        extra = {} if self.data is None else {"data": self.data, "loss": self.loss}
        op = kind(self.model, self.weights, backend=self.backend, **extra, **kw)
        if cacheable:
            self._operators[key] = op
        return op

    def hessian(self, **kw: Any) -> Any:
        """``mh.hessian`` of this problem (``params=``, ``col_params=`` ... pass through)."""
        return self._operator(mh.hessian, kw)

    def ggn(self, **kw: Any) -> Any:
        """``mh.ggn`` of this problem."""
        return self._operator(mh.ggn, kw)

    def curvature_effect(self, **kw: Any) -> Any:
        """``mh.curvature_effect`` (``H − G``) of this problem."""
        return self._operator(mh.curvature_effect, kw)

    def finite_difference_hessian(self, **kw: Any) -> Any:
        """``mh.finite_difference_hessian`` of this problem."""
        return self._operator(mh.finite_difference_hessian, kw)

    # ------------------------------------------------------------------ arrays
    def to_backend(self, a: np.ndarray) -> Array:
        """A framework array of this problem's backend: floats in its dtype, integers stay integers."""
        return _asarray(self.backend, np.asarray(a), self.dtype)

    def to_numpy(self, x: Array) -> np.ndarray:
        """A framework array as float64 NumPy."""
        return np.asarray(mh.get_backend(self.backend).to_numpy(x), dtype=np.float64)

    @property
    def names(self) -> list[str]:
        """Parameter names in the order the operators of the whole model use."""
        return [n for n, _ in mh.get_backend(self.backend).named_parameters(self.model, self.weights)]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each parameter, by name."""
        return self.reference.shapes

    @property
    def size(self) -> int:
        """Number of parameters."""
        return int(self.reference.theta.size)

    # ------------------------------------------------------------------ oracles
    def _order(self, names: list[str] | None) -> list[str]:
        return self.names if names is None else list(names)

    def oracle_hessian(self, names: list[str] | None = None, col_names: list[str] | None = None) -> np.ndarray:
        """Dense float64 Hessian, rows in the order of ``names`` (default: the operators' order).

        ``col_names`` gives the columns of an off-diagonal block (default ``names``).
        """
        rows = self._order(names)
        return self.reference.reorder(self.reference.hessian(), rows, rows if col_names is None else list(col_names))

    def oracle_ggn(self, names: list[str] | None = None, col_names: list[str] | None = None) -> np.ndarray:
        """Dense float64 GGN ``Σ_n J_nᵀ H_z J_n``, ordered as in :meth:`oracle_hessian`."""
        rows = self._order(names)
        return self.reference.reorder(self.reference.ggn(), rows, rows if col_names is None else list(col_names))

    def oracle_gradient(self, names: list[str] | None = None) -> np.ndarray:
        """Float64 gradient of the loss (or of the input function), in the order of ``names``."""
        return self.reference.reorder(self.reference.gradient(), self._order(names))

    def oracle_sqrt_hz_jacobians(self, names: list[str] | None = None) -> np.ndarray:
        """``J_nᵀ S_n`` per sample, shape ``(N, C, n)``: ``G = Σ_n Σ_c`` outer products of its rows."""
        rows = _flat_positions(self.reference, self._order(names))
        return self.reference.sqrt_hz_jacobians()[:, :, rows]


def _flat_positions(ref: Reference, names: list[str]) -> np.ndarray:
    """Canonical flat positions of the parameters ``names``, in that order."""
    return ref.reorder(np.arange(ref.theta.size), names)


def _plain(value: Any) -> bool:
    """Whether an argument is plain data (then the operator can be cached under its repr)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


# ----------------------------------------------------------------------
# Framework arrays from NumPy
# ----------------------------------------------------------------------
def _asarray(backend: str, a: np.ndarray, dtype: str) -> Array:
    """A framework array made by the backend's namespace (``xp.asarray``); floats cast to ``dtype``."""
    if a.dtype.kind == "f":
        a = a.astype(dtype)
    impl = mh.get_backend(backend)
    if impl.name == "jax":
        import jax
        import jax.numpy as jnp

        if a.dtype == np.float64 and jnp.asarray(a).dtype != np.float64:
            raise RuntimeError("float64 problems need JAX's x64 mode: jax.config.update('jax_enable_x64', True)")
        # Placed on the default device explicitly, like the arrays the library makes with
        # asarray: JAX compiles separately for committed and uncommitted arguments.
        return jax.device_put(jnp.asarray(a), jax.devices()[0])
    return impl.xp.asarray(a, copy=True)


# ----------------------------------------------------------------------
# The problems
# ----------------------------------------------------------------------
def _draw(name: str, seed: int) -> Reference:
    """The float64 NumPy problem for ``name`` and ``seed``."""
    rng = np.random.default_rng(seed)
    n = N_SAMPLES
    if name == "linear_regression":
        d, c = 3, 2
        params = _linear_params(rng, d, c)
        return Reference("linear", params, rng.standard_normal((n, d)), rng.standard_normal((n, c)), "mse")
    if name == "softmax_regression":
        d, c = 4, 3
        params = _linear_params(rng, d, c)
        return Reference("linear", params, rng.standard_normal((n, d)), rng.integers(0, c, n), "cross_entropy")
    if name == "tanh_mlp":
        d, h, c = 3, 5, 3
        params = _mlp_params(rng, d, h, c)
        return Reference("tanh_mlp", params, rng.standard_normal((n, d)), rng.integers(0, c, n), "cross_entropy")
    if name == "relu_mlp":
        d, h, c = 3, 6, 2
        # Redraw until no pre-activation is near its kink (deterministic for a seed).
        for _ in range(1000):
            params = _mlp_params(rng, d, h, c)
            x = rng.standard_normal((n, d))
            pre = x @ params["layer1.weight"] + params["layer1.bias"]
            if np.min(np.abs(pre)) > RELU_MARGIN and np.all((pre > 0).any(axis=0)):
                return Reference("relu_mlp", params, x, rng.standard_normal((n, c)), "mse")
        raise RuntimeError(f"no ReLU problem with margin {RELU_MARGIN} for seed {seed}")
    if name == "input_function":
        params = {"u": rng.standard_normal(3), "V": rng.standard_normal((2, 2))}
        return Reference("input_function", params, coupling=rng.standard_normal(3))
    raise ValueError(f"unknown problem {name!r}; the problems are {PROBLEM_NAMES}")


def _linear_params(rng: np.random.Generator, d: int, c: int) -> dict[str, np.ndarray]:
    return {"layer1.weight": rng.standard_normal((d, c)) / np.sqrt(d), "layer1.bias": 0.1 * rng.standard_normal(c)}


def _mlp_params(rng: np.random.Generator, d: int, h: int, c: int) -> dict[str, np.ndarray]:
    return {
        "layer1.weight": rng.standard_normal((d, h)) / np.sqrt(d),
        "layer1.bias": 0.5 * rng.standard_normal(h),
        "layer2.weight": rng.standard_normal((h, c)) / np.sqrt(h),
        "layer2.bias": 0.1 * rng.standard_normal(c),
    }


def _rounded(ref: Reference, dtype: str) -> Reference:
    """The reference with every float rounded to ``dtype`` and held in float64."""

    def cast(a: np.ndarray | None) -> np.ndarray | None:
        if a is None or a.dtype.kind != "f":
            return a
        return a.astype(dtype).astype(np.float64)

    params = {k: cast(v) for k, v in ref.params.items()}
    return Reference(ref.kind, params, cast(ref.x), cast(ref.y), ref.loss, cast(ref.coupling))


def _model(kind: str, backend: str, coupling: Array | None) -> Callable[..., Array]:
    """The model in array-API style, using only operators and the backend's namespace ``xp``."""
    xp = mh.get_backend(backend).xp

    def relu(a: Array) -> Array:
        return (a + abs(a)) / 2

    def tanh(a: Array) -> Array:
        return 1 - 2 / (xp.exp(2 * a) + 1)

    if kind == "linear":

        def linear(p: dict[str, Array], x: Array) -> Array:
            return x @ p["layer1.weight"] + p["layer1.bias"]

        return linear
    if kind in ("tanh_mlp", "relu_mlp"):
        act = tanh if kind == "tanh_mlp" else relu

        def mlp(p: dict[str, Array], x: Array) -> Array:
            hidden = act(x @ p["layer1.weight"] + p["layer1.bias"])
            return hidden @ p["layer2.weight"] + p["layer2.bias"]

        return mlp

    def input_function(p: dict[str, Array]) -> Array:
        # ¼ Σ u⁴ + (a·u) · ½ Σ V² + ⅙ Σ V³
        u, v = p["u"], p["V"]
        return xp.sum(u * u * u * u) / 4 + xp.sum(u * coupling) * xp.sum(v * v) / 2 + xp.sum(v * v * v) / 6

    return input_function


def _layers(ref: Reference) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in ref.names:
        out.setdefault(name.split(".")[0], []).append(name)
    return out


def make_reference(name: str, dtype: str = "float64", seed: int = 0) -> Reference:
    """The NumPy float64 description of a problem (values rounded to ``dtype``), for the oracles."""
    return _rounded(_draw(name, seed), dtype)


@functools.cache
def make_problem(name: str, backend: str, dtype: str = "float64", seed: int = 0) -> Problem:
    """The problem ``name`` in ``backend`` and ``dtype``, with weights and data drawn from ``seed``.

    The same arguments give the same object (operators built on it are
    cached too); do not modify it.
    """
    if name not in PROBLEM_NAMES:
        raise ValueError(f"unknown problem {name!r}; the problems are {PROBLEM_NAMES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    ref = make_reference(name, dtype, seed)
    convert = functools.partial(_asarray, backend, dtype=dtype)
    weights = {k: convert(v) for k, v in ref.params.items()}
    coupling = None if ref.coupling is None else convert(ref.coupling)
    data = None if ref.x is None else (convert(ref.x), convert(ref.y))
    return Problem(
        name=name,
        backend=backend,
        dtype=dtype,
        model=_model(ref.kind, backend, coupling),
        weights=weights,
        data=data,
        loss=ref.loss,
        layers=_layers(ref),
        reference=ref,
    )
