"""The backend protocol: everything the core asks of a framework.

A backend adapts one autodiff framework (PyTorch, JAX, TensorFlow, or a third
party's) to the core.  The core works on *flat* parameter vectors: a backend
turns the user's model or parameter tree into a 1-D array ``w`` plus a
function ``apply(w, x)`` that is differentiable in ``w``, and offers the
autodiff primitives (gradient, JVP, VJP) on functions of such vectors.  The
operators, losses, estimators and Lanczos are written once, in the core,
against this class and the backend's array-API namespace ``xp``.

Optional hooks have default implementations written with the primitives and
may be overridden where a framework has a faster route (a kept gradient graph
in PyTorch, ``tf.map_fn`` in TensorFlow).
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._arrays import dtype_name, shape
from ._trees import PYTHON_TREES, PythonTrees, TreeTools

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
    parts_of : callable, optional
        ``from_tree`` without the concatenation: the checked entries of a
        tree as a list in the order of ``names``, each shaped like its
        parameter.  With ``from_parts``, it lets a compiled product take a
        tree's entries as they are (see :meth:`Backend.rowwise`); a binding
        without them gets flat products.
    from_parts : callable, optional
        The inverse of ``parts_of``: a tree in the structure of ``to_tree``.
    w_pieces : list of Array, optional
        The arrays ``w`` was joined from, in its order (the user's own
        parameters, not copies).  Compiled products (:meth:`Backend.rowwise`)
        then take these instead of ``w`` and join them inside the compiled
        program, where the compiler meets the joining with ``apply``'s split
        and keeps neither: cutting ``w`` itself copies every parameter at
        each call.  Meant for compiling backends; eager ones leave it out.
    """

    w: Array
    names: list[str]
    shapes: list[tuple[int, ...]]
    apply: Callable[[Array, Any], Array]
    to_tree: Callable[[Array], Any]
    from_tree: Callable[[Any], Array]
    parts_of: Callable[[Any], list[Array]] | None = None
    from_parts: Callable[[Sequence[Array]], Any] | None = None
    w_pieces: list[Array] | None = None
    sizes: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]

    @property
    def size(self) -> int:
        """Number of entries of ``w``."""
        return int(sum(self.sizes))

    @property
    def product_w(self) -> Array | list[Array]:
        """The parameters as compiled products take them: ``w_pieces`` where the binding has them, else ``w``."""
        return self.w if self.w_pieces is None else self.w_pieces

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
    """An autodiff framework, as the core sees it: parameters and derivatives, plus a namespace.

    The protocol has two halves.  Array operations are not methods: the core
    calls the array-API namespace :attr:`xp` (``array_api_compat``'s for
    PyTorch and NumPy-array frameworks, ``jax.numpy`` for JAX, a small module
    for TensorFlow).  The backend itself supplies what no namespace has:
    which objects are its own, parameter binding, and automatic
    differentiation.

    Required: the attributes :attr:`name`, :attr:`xp`, :attr:`eager`, :attr:`tree` and the
    methods :meth:`owns`, :meth:`is_array`, :meth:`to_numpy`,
    :meth:`asarray`, :meth:`named_parameters`, :meth:`bind`,
    :meth:`value_and_grad`, :meth:`jvp`, :meth:`vjp`, :meth:`stop_gradient`.
    Optional, with defaults written with the required ones: :meth:`vmap`,
    :meth:`compile`, :meth:`rowwise`, :meth:`hvp_function`,
    :meth:`linearize`, :meth:`per_sample_squares`; and :meth:`all_reduce`
    for several processes.

    Contracts every backend keeps (the conformance suite checks them):

    * Arrays keep their dtype and device through every method; a backend
      never casts parameters, vectors or products.
    * ``value_and_grad``, ``jvp`` and ``vjp`` nest in any order (a JVP of a
      gradient is a Hessian-vector product; a VJP of a JVP is a GGN product),
      and work on the functions ``apply(w, x)`` that :meth:`bind` returns.
    * ``stop_gradient(x)`` has the value of ``x`` and a zero derivative in
      every mode and at every order.
    * A backend imports its framework only when instantiated, so that
      ``import multihess`` imports none.
    """

    name: str = ""
    """What ``backend=`` accepts."""

    eager: bool = True
    """Whether products run op by op (PyTorch): the core then keeps graphs per batch instead of compiling."""

    tree: TreeTools | PythonTrees = PYTHON_TREES
    """The framework's pytree tools (see :mod:`multihess._trees`): ``flatten_with_path`` and ``unflatten``.

    The default handles plain dicts, lists, tuples and namedtuples; a backend
    whose framework has its own pytrees (JAX, PyTorch, TensorFlow) brings them.
    """

    @property
    @abc.abstractmethod
    def xp(self) -> Any:
        """The array-API namespace of this framework's arrays."""

    # ------------------------------------------------------------------
    # Detection and conversion
    # ------------------------------------------------------------------
    @abc.abstractmethod
    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` (a model, an array, or a tree of arrays) belongs here."""

    @abc.abstractmethod
    def is_array(self, obj: Any) -> bool:
        """Whether ``obj`` is an array of this framework (under its transforms too)."""

    @abc.abstractmethod
    def to_numpy(self, x: Array) -> np.ndarray:
        """Copy an array to host memory as a NumPy array (same dtype where NumPy has it)."""

    @abc.abstractmethod
    def asarray(self, a: np.ndarray | Array, like: Array) -> Array:
        """NumPy data, or an array of this framework, as a framework array on the device of ``like``.

        Floating NumPy data takes the dtype of ``like``; integer data keeps an
        integer dtype (labels, indices); framework arrays keep their dtype
        and are only moved (no copy when already there; asynchronously from
        pinned host memory where the framework can).  This is how batches
        reach the parameters' device.
        """

    # ------------------------------------------------------------------
    # Parameters
    # ------------------------------------------------------------------
    @abc.abstractmethod
    def named_parameters(self, model: Any, weights: Any) -> list[tuple[str, Array]]:
        """The trainable parameters of ``model`` (or of the tree ``weights``) by name, in model order.

        ``weights`` is ``None`` for a stateful model (``nn.Module``, Keras
        model, ``tf.Module``) and the parameter tree for ``f(params, x)`` and
        plain functions ``fn(params)``.  Names are unique; every array is
        listed once.
        """

    @abc.abstractmethod
    def bind(self, model: Any, weights: Any, selected: Sequence[str]) -> ParameterBinding:
        """Bind the parameters named in ``selected`` (a subset, in model order) into a flat vector.

        The contract for subsets: ``w`` concatenates the selected parameters
        raveled row-major, in the order of ``selected``; ``apply(w, x)``
        evaluates the model with those parameters taken from ``w`` and every
        other parameter fixed at the value it had when bound;
        ``to_tree(w)`` answers in the user's structure with the entries
        outside ``selected`` left out (``None``, or absent from a dict);
        ``from_tree(to_tree(w))`` gives back ``w`` exactly, and
        ``from_tree`` raises ``ValueError`` or ``TypeError`` naming the
        entry when a tree has missing or extra entries, wrong shapes, wrong
        dtypes or arrays of another framework.  When ``model`` is a plain
        function and the data carries no inputs, ``apply(w, None)`` calls
        ``model(params)``.
        """

    # ------------------------------------------------------------------
    # Autodiff primitives on functions of one array
    # ------------------------------------------------------------------
    @abc.abstractmethod
    def value_and_grad(self, f: Callable[[Array], Array], w: Array) -> tuple[Array, Array]:
        """Value and gradient of the scalar function ``f`` at ``w`` (the gradient shaped like ``w``)."""

    @abc.abstractmethod
    def jvp(self, f: Callable[[Array], Array], w: Array, v: Array) -> tuple[Array, Array]:
        """``(f(w), J v)``: forward-mode product; ``v`` is shaped like ``w``, ``J v`` like ``f(w)``."""

    @abc.abstractmethod
    def vjp(self, f: Callable[[Array], Array], w: Array, u: Array) -> tuple[Array, Array]:
        """``(f(w), Jᵀ u)``: reverse-mode product; ``u`` is shaped like ``f(w)``, ``Jᵀ u`` like ``w``."""

    @abc.abstractmethod
    def stop_gradient(self, x: Array) -> Array:
        """The value of ``x`` cut from the autodiff graph: zero derivative in every mode and order."""

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

    def rowwise(self, f: Callable[[Array, Any, Array], Array]) -> Callable[[Array, Any, Array], Array]:
        """Turn ``f(w, batch, v)`` into a compiled ``F(w, batch, V)`` over the rows of ``V`` (shape ``(k, n)``).

        A single row (every Lanczos step) runs the unbatched ``f``, compiled
        on its own: it skips the vectorization machinery.  A 1-D ``V`` (a
        matvec) runs ``f`` compiled as it is and answers 1-D: no reshapes
        around the compiled call.  ``F.takes_vectors`` says that it accepts
        those.  ``F.forms(w, batch, Z)`` gives ``Σ_i Z[k, i] (A Z[k])_i`` for
        each row of ``Z`` (any real dtype: Rademacher signs come as ``int8``)
        in one compiled call: the probes are widened, multiplied and
        reduced where the products are made (Hutchinson's trace).
        ``F.on_parts(w, batch, parts)`` takes the vector as a list
        of pieces and answers ``(pieces of the product, whether the sum of
        the input is finite)``: joining and cutting the vector happen inside
        the compiled program, where the compiler can drop them (a product
        with a parameter tree); ``F.on_parts_unchecked`` is the same without
        the finiteness test (``None`` in its place).  Each variant is
        compiled on its first use.  A backend may add
        ``F.dense(w, batch, chunk)``: the ``(n, n)`` matrix whose column
        ``j`` is ``f(w, batch, e_j)``, computed ``chunk`` columns at a time
        in one compiled call that evaluates what does not depend on the
        vector once (:meth:`CurvatureOperator.dense` uses it; without it,
        dense matrices loop over chunks of batched products).  Every
        variant but ``dense`` takes ``w`` flat or as the list of
        :attr:`ParameterBinding.w_pieces` (see :func:`parameters_joined`).
        """
        f = parameters_joined(self.xp, f)
        mapped = self.vmap(f, (None, None, 0))
        if mapped is None:

            def mapped(w: Array, batch: Any, rows: Array) -> Array:
                return self.xp.stack([f(w, batch, rows[i]) for i in range(int(rows.shape[0]))])

        batched = self.compile(mapped)
        single = self.compile(lambda w, batch, rows: self.xp.expand_dims(f(w, batch, rows[0]), axis=0))
        vector = self.compile(f)

        def rows_product(w: Array, batch: Any, rows: Array) -> Array:
            if len(rows.shape) == 1:
                return vector(w, batch, rows)
            return (single if int(rows.shape[0]) == 1 else batched)(w, batch, rows)

        rows_product.takes_vectors = True  # type: ignore[attr-defined]
        rows_product.on_parts = self.compile(functools.partial(product_on_parts, self.xp, f))  # type: ignore[attr-defined]
        rows_product.on_parts_unchecked = self.compile(  # type: ignore[attr-defined]
            functools.partial(product_on_parts, self.xp, f, checked=False)
        )
        rows_product.forms = self.compile(functools.partial(quadratic_forms, self.xp, mapped))  # type: ignore[attr-defined]
        return rows_product

    def hvp_function(self, loss: Callable[[Array, Any], Array]) -> Callable[[Array, Any, Array], Array]:
        """Return ``hvp(w, batch, V)``: Hessian of ``loss(w, batch)`` times the rows of ``V``.

        ``V`` has shape ``(k, n)``; the result too.  The default is
        forward-over-reverse on the primitives, through :meth:`rowwise`.  A
        backend may cache whatever it can reuse between calls on the same
        ``batch`` (a kept gradient graph, a linearization), since operators
        call it with the same ``w`` and the same batch objects repeatedly.
        """

        def hvp_one(w: Array, batch: Any, v: Array) -> Array:
            # v → ∇ℓ(w + t v) differentiated at t = 0: the JVP of the gradient.
            return self.jvp(lambda p: self.value_and_grad(lambda q: loss(q, batch), p)[1], w, v)[1]

        return self.rowwise(hvp_one)

    def linearize(self, f: Callable[[Array, Any], Array], w: Array, x: Any) -> Linearization:
        """Linearize ``f(·, x)`` at ``w``: value, JVP and VJP (default: via the primitives)."""
        fx = lambda p: f(p, x)  # noqa: E731
        out = fx(w)
        jvp = lambda v: self.jvp(fx, w, v)[1]  # noqa: E731
        vjp = lambda u: self.vjp(fx, w, u)[1]  # noqa: E731
        return Linearization(out, jvp, vjp, map_rows(self, jvp), map_rows(self, vjp))

    def all_reduce(self, x: Array, group: Any) -> Array:
        """The sum of ``x`` over the processes of ``group`` (``True``: the default group), on every process.

        Called once per pass with the pass's total (a product block, a
        gradient, a diagonal) and once with its sample count, so that every
        process gets the result of the whole data.  ``x`` keeps its shape,
        dtype and device; the caller's array is not modified.  The default
        refuses: the backend has no notion of several processes.
        """
        raise NotImplementedError(
            f"backend {self.name!r} cannot reduce across processes; drop distributed= or use a backend that can"
        )

    def per_sample_squares(
        self, f: Callable[[Array, Any], Array], per_cotangent: bool = False
    ) -> Callable[[Array, Any, Callable[[Array], Array], int], Array]:
        """Return ``squares(w, x, cotangents, memory_budget)``: ``Σ_n (J_nᵀ U[k, n])²`` entrywise.

        ``U = cotangents(z)`` is computed from the batch's outputs
        ``z = f(w, x)``, shape ``(K, N, ...)``; ``J_n`` is the Jacobian in
        ``w`` of the outputs of sample ``n`` evaluated alone.  The result has
        shape ``(K, P)`` when ``per_cotangent``, else ``(P,)`` (summed over
        ``k`` too).  With the columns of the square root of the loss's output
        Hessian as cotangents this is the exact GGN diagonal.

        The default (:func:`multihess._per_sample.generic_squares`) squares
        per-sample VJPs on chunks of at most ``memory_budget`` bytes.  A
        backend may return a function that never holds every per-sample
        product (the core caches it per operator, like :meth:`hvp_function`).
        """
        from ._per_sample import generic_squares

        return generic_squares(self, f, per_cotangent)


def map_rows(backend: Backend, f: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """``f`` applied to each row of a stack along axis 0: vmapped where the backend can, else a loop."""
    mapped = backend.vmap(f, (0,))
    if mapped is not None:
        return mapped
    return lambda rows: backend.xp.stack([f(rows[i]) for i in range(int(rows.shape[0]))])


def parameters_joined(xp: Any, f: Callable[[Array, Any, Array], Array]) -> Callable[[Array, Any, Array], Array]:
    """``f(w, batch, v)`` that also takes ``w`` as a list of pieces, joined into the flat vector first.

    Meant to be compiled: the joining meets the binding's split of ``w``
    and the compiler keeps neither (:attr:`ParameterBinding.w_pieces`).
    """

    def with_pieces(w: Array | list[Array], batch: Any, v: Array) -> Array:
        if isinstance(w, (list, tuple)):
            w = xp.concat([xp.reshape(p, (-1,)) for p in w], axis=0)
        return f(w, batch, v)

    return with_pieces


def product_on_parts(
    xp: Any, f: Callable[[Array, Any, Array], Array], w: Array, batch: Any, parts: list, checked: bool = True
) -> tuple:
    """``f(w, batch, v)`` with ``v`` given as pieces: the product's pieces, shaped alike, and ``isfinite(Σ v)``.

    Meant to be compiled (:meth:`Backend.rowwise`): a compiler sees the
    concatenation of the pieces met by the split of the parameters, and
    the product's concatenation met by the cuts below, and keeps neither.
    The finiteness of the input's sum comes out with the product, so that
    checking it costs no separate dispatch.  It still reads the whole
    vector once more (about a tenth of a small MLP's product on a CPU):
    ``checked=False`` (operators built with ``check_finite=False``) leaves
    it out and answers ``None`` in its place.
    """
    if len(parts) == 1:  # a flat vector (or a tree of one array): nothing to join or cut
        out = f(w, batch, xp.reshape(parts[0], (-1,)))
        finite = xp.isfinite(xp.sum(parts[0])) if checked else None
        return [xp.reshape(out, shape(parts[0]))], finite
    flat = xp.concat([xp.reshape(p, (-1,)) for p in parts], axis=0)
    out = f(w, batch, flat)
    pieces, start = [], 0
    for p in parts:
        size = math.prod(shape(p))
        pieces.append(xp.reshape(out[start : start + size], shape(p)))
        start += size
    if not checked:
        return pieces, None
    total = xp.sum(xp.stack([xp.sum(p) for p in parts]))
    return pieces, xp.isfinite(total)


def quadratic_forms(
    xp: Any, batched: Callable[[Array, Any, Array], Array], w: Array | list[Array], batch: Any, Z: Array
) -> Array:
    """``zᵀAz`` for each row ``z`` of ``Z`` (``batched`` gives ``A`` times the rows): shape ``(k,)``.

    ``Z`` is cast to the parameters' dtype first (so ``int8`` signs work);
    for float16 and bfloat16 the probes and products are widened to float32
    before the sum, which would otherwise overflow or round each partial sum.
    """
    dtype = xp.result_type(*w) if isinstance(w, (list, tuple)) else w.dtype  # w flat or as its pieces
    rows = xp.astype(Z, dtype)
    products = batched(w, batch, rows)
    if dtype_name(rows) in ("float16", "bfloat16"):
        rows, products = xp.astype(rows, xp.float32), xp.astype(products, xp.float32)
    return xp.sum(rows * products, axis=1)
