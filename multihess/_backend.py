"""The backend protocol: everything the core asks of a framework.

A backend adapts one autodiff framework (PyTorch, JAX, TensorFlow, or a third
party's) to the core.  The core works on *flat* parameter vectors: a backend
turns the user's model or parameter tree into a 1-D array ``w`` plus a
function ``apply(w, x)`` that is differentiable in ``w``, and offers the
autodiff primitives (gradient, JVP, VJP) on functions of such vectors.  The
operators, losses, estimators and Lanczos are written once, in the core,
against this class.

Three hooks have default implementations written with the primitives and may
be overridden where a framework has a faster route: :meth:`Backend.hvp_function`,
:meth:`Backend.linearize` and :meth:`Backend.vmap`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = Any
"""A framework array: ``torch.Tensor``, ``jax.Array`` or ``tf.Tensor``."""


@dataclass
class ParameterBinding:
    """The parameters of one model, seen as one flat vector.

    Attributes
    ----------
    w : Array
        The selected parameters, concatenated into a 1-D array (a copy made
        once, on the parameters' device and in their dtype).
    names : list of str
        Names of the selected parameters, in the order they appear in ``w``.
    shapes : list of tuple of int
        Shape of each selected parameter.
    apply : callable
        ``apply(w, x) -> outputs``; the model evaluated with the selected
        parameters taken from the flat vector ``w`` and every other parameter
        held fixed.  Differentiable in ``w``.  For a plain scalar function
        ``fn(params)`` the batch ``x`` is ``None``.
    to_tree : callable
        Turns a flat vector into the structure the user passes parameters in
        (a dict for an ``nn.Module``, a list for a Keras model, the pytree of
        ``params`` for ``f(params, x)``).
    from_tree : callable
        The inverse of ``to_tree``; raises ``ValueError`` when the tree does
        not match the parameters.
    """

    w: Array
    names: list[str]
    shapes: list[tuple[int, ...]]
    apply: Callable[[Array, Any], Array]
    to_tree: Callable[[Array], Any]
    from_tree: Callable[[Any], Array]
    sizes: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]

    @property
    def size(self) -> int:
        """Number of entries of ``w``."""
        return int(sum(self.sizes))

    def offsets(self) -> dict[str, slice]:
        """Slice of ``w`` taken by each named parameter."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out


@dataclass
class Linearization:
    """A function linearized at one point: its value and its two derivatives.

    Attributes
    ----------
    out : Array
        ``f(w)``.
    jvp : callable
        ``v -> J v`` for a vector ``v`` shaped like ``w``.
    vjp : callable
        ``u -> J^T u`` for a cotangent ``u`` shaped like ``out``.
    jvp_batched, vjp_batched : callable
        The same on a stack of vectors along a new leading axis.
    """

    out: Array
    jvp: Callable[[Array], Array]
    vjp: Callable[[Array], Array]
    jvp_batched: Callable[[Array], Array]
    vjp_batched: Callable[[Array], Array]


class Backend(abc.ABC):
    """An autodiff framework, as the core sees it.

    Subclasses set :attr:`name` (what ``backend=`` accepts) and
    :attr:`module_name` (the top-level module whose presence in
    ``sys.modules`` makes the backend a candidate during dispatch), and
    implement the abstract methods.  They must import their framework only
    when instantiated, so that ``import multihess`` imports none.
    """

    name: str = ""
    module_name: str = ""

    # ------------------------------------------------------------------
    # Detection and conversion
    # ------------------------------------------------------------------
    @abc.abstractmethod
    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` (a model, an array, or a tree of arrays) belongs here."""

    @abc.abstractmethod
    def is_array(self, obj: Any) -> bool:
        """Whether ``obj`` is an array of this framework."""

    @abc.abstractmethod
    def to_numpy(self, x: Array) -> np.ndarray:
        """Copy an array to host memory as a NumPy array."""

    @abc.abstractmethod
    def from_numpy(self, a: np.ndarray, like: Array) -> Array:
        """Make a framework array from NumPy data with the dtype and device of ``like``.

        Integer NumPy data keeps an integer dtype (for labels); only the
        device of ``like`` is used then.
        """

    @abc.abstractmethod
    def dtype_name(self, x: Array) -> str:
        """NumPy-style name of the dtype of ``x``, e.g. ``"float32"``."""

    # ------------------------------------------------------------------
    # Parameters
    # ------------------------------------------------------------------
    @abc.abstractmethod
    def named_parameters(self, model: Any, weights: Any) -> list[tuple[str, Array]]:
        """The trainable parameters of ``model`` (or of the tree ``weights``) by name.

        ``weights`` is ``None`` for a stateful model (``nn.Module``, Keras
        model, ``tf.Module``) and the parameter tree for ``f(params, x)`` and
        plain functions ``fn(params)``.
        """

    @abc.abstractmethod
    def bind(self, model: Any, weights: Any, selected: Sequence[str]) -> ParameterBinding:
        """Bind the parameters named in ``selected`` into a flat vector.

        Parameters that are not selected stay fixed at their current values.
        When ``model`` is a plain function and the data carries no inputs,
        ``apply(w, None)`` calls ``model(params)``.
        """

    # ------------------------------------------------------------------
    # Autodiff primitives on functions of one array
    # ------------------------------------------------------------------
    @abc.abstractmethod
    def value_and_grad(self, f: Callable[[Array], Array], w: Array) -> tuple[Array, Array]:
        """Value and gradient of the scalar function ``f`` at ``w``."""

    @abc.abstractmethod
    def jvp(self, f: Callable[[Array], Array], w: Array, v: Array) -> tuple[Array, Array]:
        """``(f(w), J v)``: forward-mode product."""

    @abc.abstractmethod
    def vjp(self, f: Callable[[Array], Array], w: Array, u: Array) -> tuple[Array, Array]:
        """``(f(w), J^T u)``: reverse-mode product."""

    # ------------------------------------------------------------------
    # Optional hooks (defaults are written with the primitives above)
    # ------------------------------------------------------------------
    def vmap(self, f: Callable[..., Array], in_axes: tuple[int | None, ...]) -> Callable[..., Array] | None:
        """Vectorize ``f`` over the axes given (``None`` = not mapped), or ``None``.

        Returning ``None`` makes the core fall back to a Python loop.
        """
        return None

    def compile(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """Compile ``f`` once for repeated calls with arrays of one shape (default: as is)."""
        return f

    def hvp_function(self, loss: Callable[[Array, Any], Array]) -> Callable[[Array, Any, Array], Array]:
        """Return ``hvp(w, batch, V)``: Hessian of ``loss(w, batch)`` times the rows of ``V``.

        ``V`` has shape ``(k, n)``; the result too.  The default is
        forward-over-reverse on the primitives, vectorized when :meth:`vmap`
        is available and compiled with :meth:`compile`.  A backend may cache
        whatever it can reuse between calls on the same ``batch`` (a kept
        gradient graph, a linearization), since operators call it with the
        same ``w`` and the same batch objects repeatedly.
        """

        def hvp_one(w: Array, batch: Any, v: Array) -> Array:
            return self.jvp(lambda p: self.value_and_grad(lambda q: loss(q, batch), p)[1], w, v)[1]

        return self._rowwise(hvp_one)

    def linearize(self, f: Callable[[Array, Any], Array], w: Array, x: Any) -> Linearization:
        """Linearize ``f(·, x)`` at ``w``: value, JVP and VJP (default: via the primitives)."""
        fx = lambda p: f(p, x)  # noqa: E731
        out = fx(w)
        jvp = lambda v: self.jvp(fx, w, v)[1]  # noqa: E731
        vjp = lambda u: self.vjp(fx, w, u)[1]  # noqa: E731
        return Linearization(out, jvp, vjp, self._map_rows(jvp), self._map_rows(vjp))

    # ------------------------------------------------------------------
    # Per-sample products (exact and Monte Carlo GGN diagonals)
    # ------------------------------------------------------------------
    def per_sample_vjp(self, f: Callable[[Array, Any], Array], w: Array, x: Any, U: Array) -> Array:
        """Vector-Jacobian products of every sample with its own cotangents: shape ``(K, N, P)``.

        ``out[k, n] = J_nᵀ U[k, n]``, where ``J_n`` is the Jacobian in ``w``
        of the outputs of sample ``n`` evaluated alone, ``f(w, x[n:n+1])[0]``.
        ``f(w, x)`` maps the flat parameters (``P`` entries) and a batch of
        inputs (an array, or a tuple of arrays, with the samples along axis
        0) to outputs of shape ``(N, ...)``; ``U`` has shape ``(K, N, ...)``.

        The default vmaps over the samples a VJP vmapped over the ``K``
        cotangents (the sample's forward pass runs once), or loops over the
        samples when :meth:`vmap` returns ``None``.
        """

        def one_sample(x_n: Any, u_n: Array) -> Array:
            x_one = _with_sample_axis(x_n)
            g = lambda p: f(p, x_one)  # noqa: E731
            return self._map_rows(lambda u: self.vjp(g, w, u[None])[1])(u_n)  # (K, P)

        mapped = self.vmap(one_sample, (0, 1))
        if mapped is not None:
            return self.moveaxis(mapped(x, U), 0, 1)
        rows = []
        for n in range(self.shape(U)[1]):
            x_n = _sample_slice(x, n, n + 1)
            g = lambda p, x_n=x_n: f(p, x_n)  # noqa: E731
            rows.append(self._map_rows(lambda u, g=g: self.vjp(g, w, u[None])[1])(U[:, n]))
        return self.stack(rows, axis=1)

    def per_sample_squares(
        self, f: Callable[[Array, Any], Array], per_cotangent: bool = False
    ) -> Callable[[Array, Any, Callable[[Array], Array], int], Array]:
        """Return ``squares(w, x, cotangents, memory_budget)``: ``Σ_n (J_nᵀ U[k, n])²`` entrywise.

        ``U = cotangents(z)`` is computed from the batch's outputs
        ``z = f(w, x)`` (so that a route which runs the forward pass anyway
        runs it once); ``f``, ``w``, ``x``, ``U`` and ``J_n`` are as in
        :meth:`per_sample_vjp`.  The result has shape ``(K, P)`` when
        ``per_cotangent``, else ``(P,)`` (summed over ``k`` too).  With the
        columns of the square root of the loss's output Hessian as
        cotangents this is the exact GGN diagonal.

        The default squares the products of :meth:`per_sample_vjp` on
        chunks of samples and cotangents holding at most ``memory_budget``
        bytes of per-sample products, compiled once with :meth:`compile`,
        and sums the chunks on the device.  A backend may return a function
        that never holds every per-sample product (the core caches it per
        operator, like :meth:`hvp_function`).
        """

        def chunk_squares(w: Array, x: Any, U: Array) -> Array:
            products = self.per_sample_vjp(f, w, x, U)
            squares = self.sum(products * products, axis=1)
            return squares if per_cotangent else self.sum(squares, axis=0)

        compiled = self.compile(chunk_squares)

        def squares(w: Array, x: Any, cotangents: Callable[[Array], Array], memory_budget: int) -> Array:
            U = cotangents(self.stop_gradient(f(w, x)))
            K, N = self.shape(U)[:2]
            per_product = self.shape(w)[0] * _itemsize(self, w)
            k_chunk = int(max(1, min(K, memory_budget // max(per_product, 1))))
            n_chunk = int(max(1, min(N, memory_budget // max(k_chunk * per_product, 1))))
            parts = []
            for k0 in range(0, K, k_chunk):
                total = None
                for n0 in range(0, N, n_chunk):
                    part = compiled(w, _sample_slice(x, n0, n0 + n_chunk), U[k0 : k0 + k_chunk, n0 : n0 + n_chunk])
                    total = part if total is None else total + part
                parts.append(total)
            if per_cotangent:
                return parts[0] if len(parts) == 1 else self.concat(parts, axis=0)
            out = parts[0]
            for part in parts[1:]:
                out = out + part
            return out

        return squares

    # ------------------------------------------------------------------
    # Array operations the core needs (losses, estimators)
    # ------------------------------------------------------------------
    @abc.abstractmethod
    def sum(self, x: Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Array:
        """Sum over ``axis`` (all axes when ``None``)."""

    @abc.abstractmethod
    def max(self, x: Array, axis: int, keepdims: bool = False) -> Array:
        """Maximum over ``axis``."""

    @abc.abstractmethod
    def exp(self, x: Array) -> Array:
        """Elementwise exponential."""

    @abc.abstractmethod
    def log(self, x: Array) -> Array:
        """Elementwise natural logarithm."""

    @abc.abstractmethod
    def sqrt(self, x: Array) -> Array:
        """Elementwise square root."""

    @abc.abstractmethod
    def sigmoid(self, x: Array) -> Array:
        """Elementwise logistic sigmoid."""

    @abc.abstractmethod
    def softplus(self, x: Array) -> Array:
        """Elementwise ``log(1 + exp(x))``, computed stably."""

    @abc.abstractmethod
    def one_hot(self, labels: Array, num_classes: int, like: Array) -> Array:
        """One-hot encoding along a new last axis, in the dtype/device of ``like``."""

    @abc.abstractmethod
    def moveaxis(self, x: Array, source: int, destination: int) -> Array:
        """Move one axis of ``x``."""

    @abc.abstractmethod
    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array:
        """Reshape ``x``."""

    @abc.abstractmethod
    def stack(self, xs: Sequence[Array], axis: int = 0) -> Array:
        """Stack arrays along a new axis."""

    @abc.abstractmethod
    def concat(self, xs: Sequence[Array], axis: int = 0) -> Array:
        """Concatenate arrays along an existing axis."""

    @abc.abstractmethod
    def transpose(self, x: Array) -> Array:
        """Swap the two axes of a matrix."""

    @abc.abstractmethod
    def zeros_like(self, x: Array) -> Array:
        """Zeros with the shape, dtype and device of ``x``."""

    @abc.abstractmethod
    def stop_gradient(self, x: Array) -> Array:
        """The value of ``x`` cut from the autodiff graph."""

    @abc.abstractmethod
    def is_floating(self, x: Array) -> bool:
        """Whether ``x`` has a real floating dtype."""

    @abc.abstractmethod
    def all_finite(self, x: Array) -> bool:
        """Whether every entry of ``x`` is finite (one host read)."""

    def shape(self, x: Array) -> tuple[int, ...]:
        """Shape of ``x`` as a tuple of ints."""
        return tuple(int(d) for d in x.shape)

    # ------------------------------------------------------------------
    # Helpers shared by the default hooks
    # ------------------------------------------------------------------
    def _map_rows(self, f: Callable[[Array], Array]) -> Callable[[Array], Array]:
        """``f`` applied to each row of a stack: vmapped if possible, else a loop."""
        mapped = self.vmap(f, (0,))
        if mapped is not None:
            return mapped
        return lambda rows: self.stack([f(rows[i]) for i in range(self.shape(rows)[0])])

    def _rowwise(self, f: Callable[[Array, Any, Array], Array]) -> Callable[[Array, Any, Array], Array]:
        """Turn ``f(w, batch, v)`` into a compiled ``F(w, batch, V)`` over the rows of ``V``."""
        mapped = self.vmap(f, (None, None, 0))
        if mapped is None:

            def mapped(w: Array, batch: Any, rows: Array) -> Array:
                return self.stack([f(w, batch, rows[i]) for i in range(self.shape(rows)[0])])

        return self.compile(mapped)


def _with_sample_axis(x_n: Any) -> Any:
    """One sample's inputs (an array or a tuple of arrays) as a batch of one."""
    return tuple(a[None] for a in x_n) if isinstance(x_n, tuple) else x_n[None]


def _sample_slice(x: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch of inputs (an array or a tuple of arrays)."""
    return tuple(a[start:stop] for a in x) if isinstance(x, tuple) else x[start:stop]


def _itemsize(backend: Backend, x: Array) -> int:
    """Bytes per entry of ``x`` (2 for types NumPy does not know, such as bfloat16)."""
    try:
        return int(np.dtype(backend.dtype_name(x)).itemsize)
    except TypeError:
        return 2
