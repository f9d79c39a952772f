"""Sums of squared per-sample products in JAX from the model's jaxpr, without the generic per-sample route.

The exact GGN diagonal is ``Σ_n Σ_k (J_nᵀ u_nk)²``.  The generic route
(:func:`multihess._per_sample.generic_squares`) forms every per-sample product
through a per-sample backward pass of the whole network: ``K·N·P`` numbers.
But a parameter entry that the model reads once, through an op whose
derivative in that parameter is a contraction of the cotangent ``δ`` at the
op's output with something the forward pass already has, has a per-sample
product made from ``δ`` alone:

- ``y = dot_general(a, W)`` (either operand order, any contracting axes,
  no batch axes): with the free axes of ``a`` as its rows, ``a_n`` of shape
  ``(T, in)`` (``T = 1`` in a plain dense layer, the tokens of a sequence
  layer) and ``δ_n`` of shape ``(T, free)``, the product is ``a_nᵀ δ_n``.
  Its squares summed over the ``k`` cotangents of a chunk are either formed
  directly (``k·T·in·free`` per sample) or, when cheaper, through Gram
  matrices of the rows, ``Σ_{t,s} (a_t a_s) ⊗ Σ_k (δ_kt δ_ks)`` (``T²``
  terms; for ``T = 1`` the matrix product ``(a²)ᵀ(δ²)`` over the samples):
  see :func:`_gram`;
- ``y = conv_general_dilated(x, K)`` (any layout, strides, padding and
  dilations, no batch groups): a dense product whose rows are the output
  positions and whose activation is the windows of ``x`` the kernel sees
  (``lax.conv_general_dilated_patches``), as BackPACK does; with feature
  groups (depthwise layers), one such product per group, batched;
- ``y = h ± b`` with ``b`` broadcast over some axes of ``h`` (a dense or a
  convolution bias): ``±δ_n`` summed over the broadcast axes;
- ``y = h * s`` or ``y = s / h`` with ``s`` broadcast likewise (a norm's
  scale, also when folded first as ``s / √(var + ε)``): ``δ_n ⊙ h_n`` (or
  ``δ_n / h_n``) summed over the broadcast axes;
- ``y = gather(E, i)`` of whole rows of a table ``E`` (``E[tokens]``,
  ``jnp.take`` along axis 0, any mode): row ``r``'s product is
  ``Σ_{t: i_t = r} δ_t``, and its square summed over ``r`` is
  ``Σ_t δ_t Σ_{s: i_s = i_t} δ_s``: per lookup, then summed into the table
  once per chunk (one scatter of ``N·T`` rows, not one table per pair).

``δ = ∂⟨z_n, u⟩/∂y`` comes from the backward pass, for all ``K`` cotangents
(vmapped over them, or once per cotangent when that is faster: see
:class:`_Passes`), of a re-evaluation of the jaxpr that adds a zero "probe"
to each such ``y``: the cotangent of a probe is ``δ``.

What is seen.  The model is traced once per input shape, on a batch of one
sample (``jax.make_jaxpr``), and the re-evaluation is vmapped over the
samples, exactly as the generic route defines ``J_n`` (``f(w, x[n:n+1])``):
so every value in the trace belongs to one sample and no layout has to be
guessed.  Variables that are pure views of the flat vector ``w`` are tracked
through ``slice``, ``split``, ``reshape``, ``squeeze``, ``transpose``, ``copy``,
float-to-float ``convert_element_type`` and ``broadcast_in_dim`` (as arrays
of indices into ``w``), and into the sub-jaxprs of ``jit``/``pjit`` and
``closed_call`` equations that receive a view (flax, equinox and ``jnp``
functions may nest those).  Every other equation that receives a view is an
"other read": ``custom_jvp``/``custom_vjp`` calls, ``checkpoint``, control
flow and everything else are not entered (entering them would drop their
custom rules), convolutions with batch groups, other gathers,
``dot_general`` with batch dimensions (attention), and views read by two
ops (tied weights).

An entry read exactly once, by a recognized op, takes the structured route.
Every other entry that is read goes through the generic per-sample route
restricted to those entries: the reads of their views are replaced by slices
of a shorter vector ``v``, so the per-sample backward passes produce ``K·N·|v|``
numbers and nothing for the other entries.  ``v`` enters the backward pass
as segments cut at the ends of every read (see :func:`_cuts`): the cotangent
of a slice of one whole vector would be a zero-padded copy of all of it.  Entries nothing reads have a
zero diagonal.  Both routes share one forward and one backward pass per
chunk of samples and cotangents, compiled once per input shape by the
backend (``jax.jit``).

Guard (as in the PyTorch route): the first moment of the structured
products, ``Σ_n Σ_k`` of them, must equal the gradient of ``⟨z, Σ_k u_k⟩``
from an ordinary VJP of ``f``; a recognized op whose entries disagree is sent
to the generic route (recompiled once, then kept for that input shape).
Unlike PyTorch, where an extension op can read a parameter unseen, the
jaxpr shows every read, and what the route computes for an op is a function
of the jaxpr alone; so the check (an extra forward and backward pass) runs
on every call only until each recognized op has agreed once at a point where
its gradient is not zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var

from .._backend import Backend

Array = jax.Array
Squares = Callable[[Array, Any, Callable[[Array], Array], int], Array]
Path = tuple[int, ...]
"""Indices of the enclosing call equations, outermost first: ``()`` for the model's own jaxpr."""
Key = tuple[Path, int]
"""One equation: its path and its index in that jaxpr."""

_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr"}
"""Call primitives entered when they receive a parameter view, and the parameter holding their ClosedJaxpr."""


# ----------------------------------------------------------------------
# Parameter views: index arrays into w
# ----------------------------------------------------------------------
def _view_of(eqn: Any, operand: np.ndarray) -> np.ndarray | None:
    """The indices into ``w`` of a view op's output, given those of its only operand; ``None`` if not a view op.

    Index arrays are NumPy views of ``arange(P)`` wherever NumPy can make
    them (slices, reshapes, transposes, broadcasts), so tracking costs little
    beyond one array of ``P`` integers.
    """
    name, params = eqn.primitive.name, eqn.params
    if len(eqn.invars) != 1 or len(eqn.outvars) != 1:
        return None
    if name == "slice":
        strides = params["strides"] or (1,) * operand.ndim
        return operand[
            tuple(slice(a, b, s) for a, b, s in zip(params["start_indices"], params["limit_indices"], strides))
        ]
    if name == "reshape" and params.get("dimensions") is None:
        return operand.reshape(params["new_sizes"])
    if name == "squeeze":
        return np.squeeze(operand, axis=tuple(int(d) for d in params["dimensions"]))
    if name == "transpose":
        return operand.transpose(tuple(int(d) for d in params["permutation"]))
    if name == "copy" or name == "copy_p":
        return operand
    if name == "convert_element_type":
        # Float to float keeps the derivative (up to rounding); to an integer it would cut it.
        src, dst = eqn.invars[0].aval.dtype, params["new_dtype"]
        return operand if jnp.issubdtype(src, jnp.floating) and jnp.issubdtype(dst, jnp.floating) else None
    if name == "broadcast_in_dim":
        shape = tuple(int(d) for d in params["shape"])
        expanded = [1] * len(shape)
        for i, d in enumerate(params["broadcast_dimensions"]):
            expanded[int(d)] = operand.shape[i]
        return np.broadcast_to(operand.reshape(expanded), shape)
    return None


def _split_views(eqn: Any, operand: np.ndarray) -> list[np.ndarray]:
    """The indices into ``w`` of each output of ``split`` (consecutive pieces along one axis)."""
    bounds = np.cumsum([int(size) for size in eqn.params["sizes"]])[:-1]
    return np.split(operand, bounds, axis=int(eqn.params["axis"]))


def _distinct(idx: np.ndarray) -> bool:
    """Whether an index array names every entry at most once."""
    return np.unique(idx).size == idx.size


def _is_contiguous(flat: np.ndarray) -> bool:
    """Whether a 1-D index array is ``start, start + 1, ...``."""
    return flat.size == 0 or (flat[-1] - flat[0] == flat.size - 1 and bool(np.all(np.diff(flat) == 1)))


# ----------------------------------------------------------------------
# Recognized reads
# ----------------------------------------------------------------------
@dataclass(eq=False)
class _Use:
    """One recognized read of a parameter view by the equation ``key``.

    ``operand`` is the position of the view among the equation's operands and
    ``view`` its index array (as the equation sees it); ``entries`` are the
    entries of ``w`` the per-sample product covers, in the layout of the
    product (each once).
    """

    key: Key
    kind: str  # "dense", "bias", "scale" or "embed"
    operand: int
    view: np.ndarray
    entries: np.ndarray
    out: Var
    # dense: the activation's operand position, the transposition putting its free axes (rows) first and its
    # contracted axes last (in the order of the parameter's), how many rows it has, whether the output puts
    # the parameter's free axes before the rows (the parameter is the left operand), and how the product
    # (in, free) maps onto the parameter's axes
    act: int = -1
    act_perm: tuple[int, ...] = ()
    rows: int = 1
    rows_last: bool = False
    in_size: int = 0
    free_size: int = 0
    param_shape: tuple[int, ...] = ()  # the parameter's axes reordered: contracted first, then free
    param_inverse: tuple[int, ...] = ()
    # a convolution read as dense: the output axis of the kernel's output features (δ's free axis), and how to
    # cut the input into the windows the kernel sees (the activation of the dense reading)
    out_feature: int = -1
    windows: dict[str, Any] | None = None
    # feature groups: group g's outputs (a range of ``free_size // groups``) read its own ``in_size`` columns
    groups: int = 1
    # bias: the output axes summed over, the sign of the parameter, and the activation added to it
    axes: tuple[int, ...] = ()
    sign: float = 1.0
    addend: Any = None
    passes: bool = True  # whether the cotangent at the addend is δ itself (not -δ, as in ``b - h``)
    # scale: ``axes`` (above) are summed over, ``act`` is the factor's operand, divided by in ``s / h``
    reciprocal: bool = False
    # embed: whether indices outside the table drop their rows (else they are clamped to it); ``rows`` and
    # ``free_size`` (above) are the lookups per sample and the entries of one row of the table
    drop: bool = False
    slot: int = -1  # the probe whose cotangent is δ at this use's output


def _dense(eqn: Any, key: Key, views: list[np.ndarray | None]) -> _Use | None:
    """``dot_general`` of one parameter view and an activation, no batch axes.

    The activation's free axes are its rows: one in a plain dense layer,
    ``T`` in a sequence layer, whose per-sample product is ``a_nᵀ δ_n``
    (``a_n`` of shape ``(T, in)``, ``δ_n`` of shape ``(T, free)``).
    """
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or (views[0] is None) == (views[1] is None):
        return None
    p = 0 if views[0] is not None else 1
    a = 1 - p
    view = views[p]
    act_aval = eqn.invars[a].aval
    if not jnp.issubdtype(act_aval.dtype, jnp.floating) or not _distinct(view):
        return None
    p_c = tuple(int(d) for d in (lc if p == 0 else rc))
    a_c = tuple(int(d) for d in (rc if p == 0 else lc))
    a_free = tuple(d for d in range(len(act_aval.shape)) if d not in a_c)
    p_free = tuple(d for d in range(view.ndim) if d not in p_c)
    return _dense_use(
        key,
        p,
        view,
        eqn.outvars[0],
        p_c + p_free,
        len(p_c),
        act=a,
        act_perm=a_free + a_c,
        rows=math.prod(act_aval.shape[d] for d in a_free),
        rows_last=p == 0,
    )


def _dense_use(
    key: Key, operand: int, view: np.ndarray, out: Var, order: tuple[int, ...], contracted: int, **fields: Any
) -> _Use:
    """A dense read of ``view``: its axes ``order[:contracted]`` meet the activation's, the others are free."""
    return _Use(
        key,
        "dense",
        operand,
        view,
        view,
        out,
        in_size=math.prod(view.shape[d] for d in order[:contracted]),
        free_size=math.prod(view.shape[d] for d in order[contracted:]),
        param_shape=tuple(view.shape[d] for d in order),
        param_inverse=tuple(int(i) for i in np.argsort(order)),
        **fields,
    )


def _bias(eqn: Any, key: Key, views: list[np.ndarray | None]) -> _Use | None:
    """``h + b``, ``b + h``, ``h - b`` or ``b - h`` with ``b`` a parameter view broadcast over some output axes."""
    if (views[0] is None) == (views[1] is None):
        return None
    p = 0 if views[0] is not None else 1
    out_shape = tuple(eqn.outvars[0].aval.shape)
    try:
        spread = np.broadcast_to(views[p], out_shape)
    except ValueError:
        return None
    # Axes along which the view repeats one entry are summed over; the rest must name each entry once.
    axes = tuple(a for a in range(len(out_shape)) if bool(np.all(spread == spread.take([0], axis=a))))
    reduced = spread[tuple(0 if a in axes else slice(None) for a in range(len(out_shape)))]
    if not _distinct(reduced):
        return None
    sub = eqn.primitive.name == "sub"
    return _Use(
        key,
        "bias",
        p,
        views[p],
        reduced,
        eqn.outvars[0],
        axes=axes,
        sign=-1.0 if sub and p == 1 else 1.0,
        addend=eqn.invars[1 - p],
        passes=not (sub and p == 0),
    )


def _scale(eqn: Any, key: Key, views: list[np.ndarray | None]) -> _Use | None:
    """``h * s``, ``s * h`` or ``s / h`` with ``s`` a parameter view broadcast over some output axes (a norm's scale).

    A sample's product is ``δ_n ⊙ h_n`` (``δ_n / h_n``) summed over the
    broadcast axes.  ``h`` may be computed from parameters alone
    (``scale / √(var + ε)`` in inference batch norm): the re-evaluation runs
    one sample at a time, so ``δ_n`` is that sample's cotangent all the same.
    """
    if (views[0] is None) == (views[1] is None) or (eqn.primitive.name == "div" and views[0] is None):
        return None
    use = _bias(eqn, key, views)
    if use is None or not jnp.issubdtype(eqn.invars[1 - use.operand].aval.dtype, jnp.floating):
        return None
    use.kind, use.sign, use.addend, use.passes = "scale", 1.0, None, True
    use.act, use.reciprocal = 1 - use.operand, eqn.primitive.name == "div"
    return use


def _embedding(eqn: Any, key: Key, views: list[np.ndarray | None]) -> _Use | None:
    """``gather`` of whole rows of a parameter view (a table) at integer indices: ``table[tokens]``.

    Row ``r``'s per-sample product is ``Σ_{t: i_t = r} δ_t``, the sum over
    the lookups of that row.
    """
    view = views[0]
    if view is None or any(v is not None for v in views[1:]) or view.ndim < 1:
        return None
    dn = eqn.params["dimension_numbers"]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    idx_shape = tuple(eqn.invars[1].aval.shape)
    trailing = tuple(range(len(out_shape) - (view.ndim - 1), len(out_shape)))
    if (
        tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or tuple(getattr(dn, "operand_batching_dims", ()))
        or tuple(getattr(dn, "start_indices_batching_dims", ()))
        or tuple(dn.offset_dims) != trailing
        or tuple(int(d) for d in eqn.params["slice_sizes"]) != (1,) + view.shape[1:]
        or idx_shape[-1:] != (1,)
        or not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating)
        or not _distinct(view)
    ):
        return None
    return _Use(
        key,
        "embed",
        0,
        view,
        view,
        eqn.outvars[0],
        act=1,
        rows=math.prod(idx_shape[:-1]),
        free_size=math.prod(view.shape[1:]),
        drop=eqn.params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP,
    )


def _conv(eqn: Any, key: Key, views: list[np.ndarray | None]) -> _Use | None:
    """``conv_general_dilated`` of an activation with a parameter view as its kernel.

    Read as a dense use, as BackPACK does: the activation's windows
    (``lax.conv_general_dilated_patches``, one row per output position, the
    kernel's input features and window offsets as columns) times the kernel
    as a matrix, so a sample's product is ``windowsᵀ δ_n``.  With feature
    groups, each group's outputs (consecutive features) read the columns of
    its own input channels (consecutive too, the columns being channel-major):
    one such product per group.
    """
    params = eqn.params
    view = views[1] if len(views) == 2 else None
    if view is None or views[0] is not None or params["batch_group_count"] != 1:
        return None
    dn = params["dimension_numbers"]
    spatial = tuple(int(d) for d in dn.rhs_spec[2:])
    act_aval = eqn.invars[0].aval
    if (
        not jnp.issubdtype(act_aval.dtype, jnp.floating)
        or not _distinct(view)
        or spatial != tuple(sorted(spatial))  # windows' columns run over the kernel's axes in their own order
        or params.get("preferred_element_type") is not None
    ):
        return None
    out_shape = tuple(eqn.outvars[0].aval.shape)
    feature, kernel_out = int(dn.out_spec[1]), int(dn.rhs_spec[0])
    rows_axes = tuple(d for d in range(len(out_shape)) if d != feature)
    order = (int(dn.rhs_spec[1]), *spatial, kernel_out)
    return _dense_use(
        key,
        1,
        view,
        eqn.outvars[0],
        order,
        len(order) - 1,
        act=0,
        act_perm=rows_axes + (feature,),
        rows=math.prod(out_shape[d] for d in rows_axes),
        out_feature=feature,
        groups=int(params["feature_group_count"]),
        windows={
            "filter_shape": tuple(int(view.shape[d]) for d in spatial),
            "window_strides": params["window_strides"],
            "padding": params["padding"],
            "lhs_dilation": params["lhs_dilation"],
            "rhs_dilation": params["rhs_dilation"],
            "dimension_numbers": _spec_strings(dn, len(out_shape)),
            "precision": params.get("precision"),
        },
    )


def _spec_strings(dn: Any, ndim: int) -> tuple[str, str, str]:
    """A convolution's dimension numbers (axis positions) as the layout strings ``lax`` takes, e.g. ``NHWC``."""
    letters = "HWDXYZUV"

    def layout(spec: Sequence[int], batch: str, feature: str) -> str:
        chars = [""] * ndim
        chars[spec[0]], chars[spec[1]] = batch, feature
        for i, d in enumerate(spec[2:]):
            chars[d] = letters[i]
        return "".join(chars)

    return layout(dn.lhs_spec, "N", "C"), layout(dn.rhs_spec, "O", "I"), layout(dn.out_spec, "N", "C")


def _activation(use: _Use, invals: Sequence[Any]) -> Any:
    """What a recognized use's products contract its cotangent with: the operand, or a convolution's windows."""
    a = invals[use.act]
    if use.kind == "scale":  # the factor at every output entry (a literal or a broadcast operand included)
        return jnp.broadcast_to(1.0 / a if use.reciprocal else jnp.asarray(a), use.out.aval.shape)
    return a if use.windows is None else jax.lax.conv_general_dilated_patches(a, **use.windows)


_RECOGNIZERS: dict[str, Callable[[Any, Key, list[np.ndarray | None]], _Use | None]] = {
    "dot_general": _dense,
    "conv_general_dilated": _conv,
    "gather": _embedding,
    "add": _bias,
    "sub": _bias,
    "mul": _scale,
    "div": _scale,
}


# ----------------------------------------------------------------------
# The plan: what is read where, and which route each entry takes
# ----------------------------------------------------------------------
@dataclass
class _Plan:
    """The analysis of one per-sample jaxpr (static: NumPy and Python only)."""

    closed: ClosedJaxpr
    P: int
    uses: list[_Use]  # recognized reads whose entries take the structured route
    probes: list[tuple[tuple[int, ...], Any]]  # shape and dtype of each probe (one sample)
    probe_at: dict[Key, int]  # equation -> probe added to its output
    record: dict[Key, list[int]]  # equation -> uses whose activation it provides
    inline: set[Key]  # call equations evaluated equation by equation
    replace: dict[Key, list[tuple[int, tuple]]]  # equation -> (operand, how to read it from the segments of v)
    replace_out: list[tuple[int, tuple]]  # the same for the jaxpr's outputs
    slow: list[tuple[int, int, int]]  # (start, stop, offset in v) of the entries for the generic route
    segments: list[list[tuple[int, int]]]  # the pieces of v, in order: each as the ranges of w it holds
    work: int  # float entries of one sample's activations: the backward pass's working set per cotangent

    @property
    def S(self) -> int:
        return sum(b - a for a, b, _ in self.slow)


def _analyse(closed: ClosedJaxpr, P: int, rejected: frozenset[Key]) -> _Plan:
    """Track the views of ``w`` (the jaxpr's first input), recognize reads, and route every entry."""
    candidates: list[_Use] = []
    others: list[tuple[Key, int, np.ndarray]] = []  # (equation, operand, view) of every other read
    inline: set[Key] = set()
    counts: dict[tuple[Path, Var], int] = {}
    work = 0

    def walk(jaxpr: Jaxpr, given: dict[Var, np.ndarray], path: Path) -> list[np.ndarray | None]:
        nonlocal work
        views = dict(given)
        for eqn in jaxpr.eqns:
            for v in eqn.invars:
                if isinstance(v, Var):
                    counts[(path, v)] = counts.get((path, v), 0) + 1
        for v in jaxpr.outvars:
            if isinstance(v, Var):
                counts[(path, v)] = counts.get((path, v), 0) + 1
        for i, eqn in enumerate(jaxpr.eqns):
            key = (path, i)
            operands = [views.get(v) if isinstance(v, Var) else None for v in eqn.invars]
            if all(o is None for o in operands):
                if eqn.primitive.name not in _CALLS:
                    work += sum(_float_size(o.aval) for o in eqn.outvars)
                continue
            if sum(o is not None for o in operands) == 1 and operands[0] is not None:
                if eqn.primitive.name == "split":  # the parameters' parts of the flat vector (jax.lax.split)
                    for outvar, part in zip(eqn.outvars, _split_views(eqn, operands[0])):
                        views[outvar] = part
                    continue
                out = _view_of(eqn, operands[0])
                if out is not None:
                    views[eqn.outvars[0]] = out
                    continue
            sub = eqn.params.get(_CALLS.get(eqn.primitive.name, ""))
            if isinstance(sub, ClosedJaxpr):
                inline.add(key)
                given_sub = {sv: o for sv, o in zip(sub.jaxpr.invars, operands) if o is not None}
                for outer, inner in zip(eqn.outvars, walk(sub.jaxpr, given_sub, path + (i,))):
                    if inner is not None:
                        views[outer] = inner
                continue
            recognize = _RECOGNIZERS.get(eqn.primitive.name)
            use = recognize(eqn, key, operands) if recognize is not None and key not in rejected else None
            if use is not None:
                candidates.append(use)
                work += sum(_float_size(o.aval) for o in eqn.outvars)
                continue
            others.extend((key, j, o) for j, o in enumerate(operands) if o is not None)
            work += sum(_float_size(o.aval) for o in eqn.outvars)
        return [views.get(v) if isinstance(v, Var) else None for v in jaxpr.outvars]

    top = walk(closed.jaxpr, {closed.jaxpr.invars[0]: np.arange(P)}, ())
    out_reads = [(j, o) for j, o in enumerate(top) if o is not None]

    # Count reads per entry: a recognized use reads each of its entries once; others read theirs at least once.
    recognized = np.zeros(P, dtype=np.int64)
    other = np.zeros(P, dtype=bool)
    for use in candidates:
        recognized += np.bincount(use.entries.ravel(), minlength=P)
    for *_, o in others:
        other[o.ravel()] = True
    for _, o in out_reads:
        other[o.ravel()] = True
    fast = (recognized == 1) & ~other
    # A use with any entry read elsewhere too goes to the generic route whole; its entries were then
    # read at least twice, so no other use changes its mind (one pass suffices).
    uses = []
    for use in candidates:
        if bool(np.all(fast[use.entries])):
            uses.append(use)
        else:
            others.append((use.key, use.operand, use.view))
    covered = np.zeros(P, dtype=bool)
    for use in uses:
        covered[use.entries.ravel()] = True
    read = (recognized > 0) | other
    slow_mask = read & ~covered

    # The entries for the generic route as ranges of w, packed into v in order.
    edges = np.flatnonzero(np.diff(np.concatenate([[False], slow_mask, [False]]).astype(np.int8)))
    slow, offset = [], 0
    for a, b in zip(edges[::2], edges[1::2]):
        slow.append((int(a), int(b), offset))
        offset += int(b - a)
    position = np.full(P, -1, dtype=np.int64)
    position[slow_mask] = np.arange(offset)

    reads = [(key, j, position[o]) for key, j, o in others]
    out_positions = [(j, position[o]) for j, o in out_reads]
    cuts = _cuts([p for *_, p in reads] + [p for _, p in out_positions], offset)
    replace: dict[Key, list[tuple[int, tuple]]] = {}
    for key, j, p in reads:
        replace.setdefault(key, []).append((j, _reader(p, cuts)))
    replace_out = [(j, _reader(p, cuts)) for j, p in out_positions]
    segments = [_sources(slow, int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]

    # Probes: one per output of a recognized op; a dense output read only by a recognized bias added to it
    # has the bias's δ (the sum passes the cotangent through unchanged), so it shares that probe.
    probes: list[tuple[tuple[int, ...], Any]] = []
    probe_at: dict[Key, int] = {}
    record: dict[Key, list[int]] = {}
    bias_of = {
        (u.key[0], u.addend): u
        for u in uses
        if u.kind == "bias" and u.passes and isinstance(u.addend, Var) and u.addend.aval.shape == u.out.aval.shape
    }
    for u in uses:
        if u.kind == "bias":
            probe_at[u.key] = len(probes)
            probes.append((tuple(u.out.aval.shape), u.out.aval.dtype))
    for i, u in enumerate(uses):
        if u.kind in ("dense", "embed", "scale"):
            record.setdefault(u.key, []).append(i)
            target = bias_of.get((u.key[0], u.out))
            if target is not None and counts.get((u.key[0], u.out), 0) == 1:
                u.slot = probe_at[target.key]
                continue
            probe_at[u.key] = len(probes)
            probes.append((tuple(u.out.aval.shape), u.out.aval.dtype))
    for u in uses:
        if u.slot < 0:
            u.slot = probe_at[u.key]
    return _Plan(closed, P, uses, probes, probe_at, record, inline, replace, replace_out, slow, segments, work)


def _trace(f: Callable[[Array, Any], Array], w: Any, leaves: Sequence[Any], treedef: Any) -> ClosedJaxpr:
    """The jaxpr of ``f`` on one sample: ``w`` first, then the leaves of the inputs, each with a batch of one."""
    one = [jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype) for a in leaves]
    return jax.make_jaxpr(lambda w_, *xs: f(w_, jax.tree_util.tree_unflatten(treedef, xs)))(
        jax.ShapeDtypeStruct(w.shape, w.dtype), *one
    )


def structured_entries(f: Callable[[Array, Any], Array], w: Array, x: Any) -> np.ndarray:
    """Which entries of ``w`` the analysis of ``f`` sends to the structured route (before the guard runs).

    Parameters
    ----------
    f : callable
        ``f(w, x)`` as for :func:`per_sample_squares`.
    w : jax.Array
        Flat parameters ``(P,)``.
    x : array or tuple of arrays
        A batch of inputs (only shapes and dtypes are used).

    Returns
    -------
    numpy.ndarray
        Boolean ``(P,)``: ``True`` where the per-sample products come from a
        recognized op; ``False`` for entries of the generic route and for
        entries nothing reads.
    """
    leaves, treedef = jax.tree_util.tree_flatten(x)
    plan = _analyse(_trace(f, w, leaves, treedef), int(w.shape[0]), frozenset())
    mask = np.zeros(plan.P, dtype=bool)
    for use in plan.uses:
        mask[use.entries.ravel()] = True
    return mask


def _float_size(aval: Any) -> int:
    dtype = getattr(aval, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return 0
    return math.prod(aval.shape)


def _cuts(reads: list[np.ndarray], S: int) -> np.ndarray:
    """Where ``v`` is cut into segments: at both ends of the span of every read, so each read lies in few.

    ``v`` enters the per-sample backward pass as a list of segments, not as
    one vector: the cotangent of a slice of one vector is a zero-padded copy
    of the whole vector, so ``R`` reads would cost ``R`` additions of ``S``
    entries per (sample, cotangent) pair (on the benchmark transformer that
    was 80% of the time), where a segment's cotangent holds its own entries
    only.
    """
    cuts = {0, S}
    for positions in reads:
        if positions.size:
            cuts.update((int(positions.min()), int(positions.max()) + 1))
    return np.array(sorted(cuts), dtype=np.int64)


def _sources(slow: list[tuple[int, int, int]], a: int, b: int) -> list[tuple[int, int]]:
    """The ranges of ``w`` that make up positions ``a:b`` of ``v``."""
    out = []
    for start, stop, offset in slow:
        lo, hi = max(a, offset), min(b, offset + stop - start)
        if lo < hi:
            out.append((start + lo - offset, start + hi - offset))
    return out


def _reader(positions: np.ndarray, cuts: np.ndarray) -> tuple:
    """How to read a view whose entries all take the generic route from the segments of ``v``.

    ``("slice", first, last, shape)``: segments ``first:last`` joined are the
    view in order (one segment, as a rule); ``("take", first, last,
    indices)``: a gather from them, the indices relative to segment ``first``.
    """
    if positions.size and bool(np.any(positions < 0)):
        raise AssertionError("a read of entries outside the generic route")  # every other read is routed there
    flat = positions.ravel()
    if not flat.size:
        return ("empty", positions.shape)
    lo, hi = int(flat.min()), int(flat.max()) + 1
    first, last = int(np.searchsorted(cuts, lo)), int(np.searchsorted(cuts, hi))
    if _is_contiguous(flat):
        return ("slice", first, last, positions.shape)
    return ("take", first, last, positions - lo)


# ----------------------------------------------------------------------
# Re-evaluation with probes
# ----------------------------------------------------------------------
def _read_v(v: Sequence[Array], how: tuple, dtype: Any) -> Array:
    """One read of generic entries from the segments of ``v`` (see :func:`_reader`)."""
    if how[0] == "empty":
        return jnp.zeros(how[1], dtype)
    _, first, last, arg = how
    span = v[first] if last == first + 1 else jnp.concatenate(v[first:last])
    part = span.reshape(arg) if how[0] == "slice" else jnp.take(span, arg)
    return part.astype(dtype)


def _evaluate(
    plan: _Plan, w: Array, v: Sequence[Array], x_leaves: Sequence[Array], probes: Sequence[Array]
) -> tuple[list[Array], dict[int, Array]]:
    """The jaxpr's outputs with probes added and reads of generic entries taken from ``v``, and the activations."""
    acts: dict[int, Array] = {}

    def run(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], path: Path) -> list[Any]:
        env: dict[Var, Any] = {}

        def read(a: Any) -> Any:
            return a.val if isinstance(a, Literal) else env[a]

        for var, val in zip(jaxpr.constvars, consts):
            env[var] = val
        for var, val in zip(jaxpr.invars, args):
            env[var] = val
        for i, eqn in enumerate(jaxpr.eqns):
            key = (path, i)
            invals = [read(a) for a in eqn.invars]
            for j, how in plan.replace.get(key, ()):
                invals[j] = _read_v(v, how, eqn.invars[j].aval.dtype)
            if key in plan.inline:
                sub = eqn.params[_CALLS[eqn.primitive.name]]
                outs = run(sub.jaxpr, sub.consts, invals, path + (i,))
            else:
                params = eqn.primitive.get_bind_params(eqn.params)
                if isinstance(params, tuple):  # older JAX: (subfuns, params)
                    subfuns, params = params
                    invals = [*subfuns, *invals]
                with eqn.ctx.manager:
                    ans = eqn.primitive.bind(*invals, **params)
                outs = list(ans) if eqn.primitive.multiple_results else [ans]
            for u in plan.record.get(key, ()):
                acts[u] = _activation(plan.uses[u], invals)
            slot = plan.probe_at.get(key)
            if slot is not None:
                outs[0] = outs[0] + probes[slot]
            for var, val in zip(eqn.outvars, outs):
                env[var] = val
        return [read(a) for a in jaxpr.outvars]

    closed = plan.closed
    outs = run(closed.jaxpr, closed.consts, [w, *x_leaves], ())
    for j, how in plan.replace_out:
        outs[j] = _read_v(v, how, closed.jaxpr.outvars[j].aval.dtype)
    return outs, acts


# ----------------------------------------------------------------------
# Products, squares and their placement in w
# ----------------------------------------------------------------------
def _to_param_layout(use: _Use, q: Array, lead: int) -> Array:
    """A dense product ``(*lead axes, in, free)`` in the layout of the parameter view."""
    shape = q.shape[:lead] + use.param_shape
    return jnp.transpose(q.reshape(shape), tuple(range(lead)) + tuple(lead + d for d in use.param_inverse))


def _bias_product(use: _Use, delta: Array, dtype: Any) -> Array:
    """A bias's per-sample products for a block of cotangents, ``(k, *out) -> (k, *reduced)`` (sign left out).

    ``δ`` summed over the axes the bias is broadcast along.
    """
    return jnp.sum(delta.astype(dtype), axis=tuple(1 + a for a in use.axes))


def _place(pieces: list[tuple[np.ndarray, Array]], P: int, lead: tuple[int, ...], dtype: Any) -> Array:
    """A vector ``(*lead, P)`` with each part at its entries and zeros elsewhere.

    Parts whose entries form a range (in some order) are concatenated in
    place, reordered by a static gather if needed; others are scattered.
    """
    ranges: list[tuple[int, Array]] = []
    scattered: list[tuple[np.ndarray, Array]] = []
    for entries, part in pieces:
        flat = entries.ravel()
        values = part.reshape(lead + (flat.size,))
        if flat.size == 0:
            continue
        order = np.argsort(flat, kind="stable")
        if not _is_contiguous(flat[order]):
            scattered.append((flat, values))
            continue
        if not bool(np.all(order == np.arange(flat.size))):
            values = jnp.take(values, order, axis=-1)
        ranges.append((int(flat[order[0]]), values))
    ranges.sort(key=lambda r: r[0])
    parts, stop = [], 0
    for start, values in ranges:
        if start > stop:
            parts.append(jnp.zeros(lead + (start - stop,), dtype))
        parts.append(values)
        stop = start + values.shape[-1]
    if stop < P:
        parts.append(jnp.zeros(lead + (P - stop,), dtype))
    out = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    for flat, values in scattered:
        out = out.at[..., flat].add(values)
    return out


def _take(vector: Array, entries: np.ndarray) -> Array:
    """Entries of a ``(P,)`` vector, shaped like ``entries``: a slice where they are a range in order."""
    flat = entries.ravel()
    if _is_contiguous(flat):
        start = int(flat[0]) if flat.size else 0
        return jax.lax.slice_in_dim(vector, start, start + flat.size).reshape(entries.shape)
    return jnp.take(vector, entries)


# ----------------------------------------------------------------------
# The squares function
# ----------------------------------------------------------------------
class _Passes:
    """Whether the backward pass of a chunk runs vmapped over its cotangents or once per cotangent (unrolled).

    Neither wins everywhere, and each costs a compilation.  On a 2-core CPU
    with 10 cotangents (the benchmark models, one call after both were
    compiled) the unrolled passes took 58 ms against 119 ms vmapped on
    LeNet-5 and 111 against 195 ms on the ResNet (batched max-pool and
    convolution transposes are slow there), and tied on the MLP (2.2 against
    1.9 ms) and the transformer (37 ms each); compiling the second variant
    took 0.3 s (MLP) to 5.5 s (transformer).  On accelerators the vmapped
    pass runs first: one batched kernel per op instead of one per cotangent.

    So the first calls run the variant that should win (unrolled on a CPU
    for models with convolutions or pooling, vmapped otherwise), timing its
    second call.  The other is compiled and timed only once the calls made
    since have taken as long as the first call's compilation: trying it
    then at most doubles the time spent, and pays off for an operator
    called many times (a dataset streamed batch by batch).  Later calls
    take the faster.  Unrolling copies the backward pass once per cotangent
    into the compiled program, so chunks of more than :attr:`MAX_UNROLLED`
    cotangents always run vmapped.
    """

    MAX_UNROLLED = 16

    def __init__(self, unrolled_first: bool) -> None:
        self.first = unrolled_first
        self.calls = {False: 0, True: 0}
        self.times: dict[bool, list[float]] = {False: [], True: []}
        self.compiling = 0.0  # the first call of the first variant: mostly its compilation

    def choose(self, k_chunk: int) -> tuple[bool, bool]:
        """``(unroll, timed)`` for the next call."""
        if k_chunk > self.MAX_UNROLLED or k_chunk == 1:
            return False, False  # one cotangent: both are the same program
        if all(self.times.values()):
            return min(self.times[False]) > min(self.times[True]), False
        first = self.first
        spent = self.calls[first] * min(self.times[first], default=0.0)
        unroll = first if not self.times[first] or spent < self.compiling else not first
        timed = self.calls[unroll] >= 1 and not self.times[unroll]  # the first call of each compiles
        self.calls[unroll] += 1
        return unroll, timed

    def record(self, unroll: bool, seconds: float, timed: bool) -> None:
        """The wall time of a call: timed (waited for), or the first of the first variant (compiling)."""
        if timed:
            self.times[unroll].append(seconds)
        elif unroll == self.first and self.calls[unroll] == 1:
            self.compiling = seconds


_SLOW_BATCHED_ON_CPU = frozenset({"conv_general_dilated", "reduce_window_max", "reduce_window_sum", "reduce_window"})
"""Primitives whose backward passes, batched over cotangents, are slow on a CPU (see :class:`_Passes`)."""


def _unrolled_first(w: Array, jaxpr: Jaxpr) -> bool:
    """Whether to start with unrolled passes: on a CPU, for models with convolutions or pooling."""
    devices = getattr(w, "devices", None)
    if devices is not None and any(d.platform != "cpu" for d in devices()):
        return False
    stack = [jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            if eqn.primitive.name in _SLOW_BATCHED_ON_CPU:
                return True
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, ClosedJaxpr):
                        stack.append(sub.jaxpr)
                    elif isinstance(sub, Jaxpr):
                        stack.append(sub)
    return False


@dataclass
class _Compiled:
    """A plan, its compiled chunk and guard functions, and which recognized ops the guard has verified."""

    plan: _Plan
    chunk: Callable[..., Array]
    guard: Callable[..., Array]
    rejected: frozenset[Key] = field(default_factory=frozenset)
    verified: set[int] = field(default_factory=set)
    passes: _Passes = field(default_factory=lambda: _Passes(unrolled_first=True))

    @property
    def checking(self) -> bool:
        return len(self.verified) < len(self.plan.uses)


def _tolerance(dtypes: Sequence[Any]) -> float:
    """``10 √ε`` of the least precise dtype among the activations and the result (both sides round differently)."""
    eps = max(float(jnp.finfo(d).eps) for d in dtypes)
    return 10.0 * math.sqrt(eps)


def per_sample_squares(
    backend: Backend, f: Callable[[Array, Any], Array], per_cotangent: bool, generic: Callable[..., Squares]
) -> Squares:
    """``squares(w, x, cotangents, memory_budget)`` of :meth:`Backend.per_sample_squares`, from the jaxpr of ``f``.

    ``generic(backend, f, per_cotangent)`` gives the generic route's
    function, used whole when nothing is recognized (or the model cannot be
    traced on one sample).

    Parameters
    ----------
    backend : Backend
        The JAX backend (for the generic route).
    f : callable
        ``f(w, x)``: flat parameters and a batch of inputs (an array or a tuple
        of arrays, samples along axis 0) to outputs ``(N, ...)``.
    per_cotangent : bool
        Whether the result keeps one row per cotangent, ``(K, P)``, or sums
        them, ``(P,)``.
    generic : callable
        :func:`multihess._per_sample.generic_squares`.

    Returns
    -------
    callable
        ``squares(w, x, cotangents, memory_budget)``.
    """
    compiled: dict[Hashable, _Compiled] = {}
    whole: list[Squares] = []
    # The backend's compile: jax.jit, and parameters replicated beside a batch sharded over devices.
    forward = backend.compile(f)

    def fallback() -> Squares:
        if not whole:
            whole.append(generic(backend, f, per_cotangent))
        return whole[0]

    def build(w: Array, leaves: list[Array], treedef: Any, rejected: frozenset[Key]) -> _Compiled | None:
        try:
            closed = _trace(f, w, leaves, treedef)
        except Exception:  # a model that cannot run on one sample: the generic route decides what to do
            return None
        plan = _analyse(closed, int(w.shape[0]), rejected)
        if not plan.uses or len(closed.jaxpr.outvars) != 1:
            return None
        chunk = backend.compile(_chunk_function(plan, per_cotangent))
        guard = backend.compile(_guard_function(plan, f, treedef))
        passes = _Passes(unrolled_first=_unrolled_first(w, closed.jaxpr))
        return _Compiled(plan, chunk, guard, rejected=rejected, passes=passes)

    def squares(w: Array, x: Any, cotangents: Callable[[Array], Array], memory_budget: int) -> Array:
        leaves, treedef = jax.tree_util.tree_flatten(x)
        if not leaves or not all(isinstance(a, jax.Array) and a.ndim >= 1 for a in leaves):
            return fallback()(w, x, cotangents, memory_budget)
        signature = (w.shape, w.dtype, treedef, tuple((a.shape[1:], a.dtype) for a in leaves))
        entry = compiled.get(signature)
        if entry is None:
            entry = build(w, leaves, treedef, frozenset())
            compiled[signature] = entry if entry is not None else False  # type: ignore[assignment]
        if not entry:
            return fallback()(w, x, cotangents, memory_budget)

        U = cotangents(jax.lax.stop_gradient(forward(w, x)))
        while True:
            result, rejected = _run(entry, w, leaves, U, memory_budget)
            if not rejected:
                return result
            # A recognized op whose products disagree with autograd: send it to the generic route for good.
            entry = build(w, leaves, treedef, entry.rejected | rejected)
            if entry is None:
                compiled[signature] = False  # type: ignore[assignment]
                return fallback()(w, x, cotangents, memory_budget)
            compiled[signature] = entry

    return squares


def _run(entry: _Compiled, w: Array, leaves: list[Array], U: Array, budget: int) -> tuple[Array, frozenset[Key]]:
    """The squares over chunks of samples and cotangents, and the recognized ops the guard rejects."""
    plan = entry.plan
    K, N = int(U.shape[0]), int(U.shape[1])
    item = max(jnp.dtype(w.dtype).itemsize, jnp.dtype(U.dtype).itemsize)
    # Per (sample, cotangent) pair: the generic products, the products of sequence dense uses (at most), δ at
    # every probe, and the backward pass's working set.
    sequences = sum(u.entries.size for u in plan.uses if u.kind == "dense" and u.rows > 1)
    per_pair = (plan.S + sequences + sum(math.prod(s) for s, _ in plan.probes) + plan.work) * item
    # Per sample, whatever the cotangents: the windows of the convolutions read as dense.
    per_sample = sum(u.rows * u.groups * u.in_size for u in plan.uses if u.windows is not None) * item
    k_chunk = int(max(1, min(K, (budget - per_sample) // max(per_pair, 1))))
    n_chunk = int(max(1, min(N, budget // max(k_chunk * per_pair + per_sample, 1))))
    unroll, timed = entry.passes.choose(k_chunk)
    start = time.perf_counter()
    parts = []
    for k0 in range(0, K, k_chunk):
        total = None
        for n0 in range(0, N, n_chunk):
            xs = [a[n0 : n0 + n_chunk] for a in leaves]
            part = entry.chunk(w, xs, U[k0 : k0 + k_chunk, n0 : n0 + n_chunk], unroll)
            total = part if total is None else total + part
        parts.append(total)
    if len(parts) == 1:
        result = parts[0]
    elif parts[0].ndim == 2:  # per cotangent: chunks of rows
        result = jnp.concatenate(parts, axis=0)
    else:
        result = sum(parts[1:], parts[0])
    if timed:
        jax.block_until_ready(result)  # the time of the work, not of its dispatch
    entry.passes.record(unroll, time.perf_counter() - start, timed)
    if not entry.checking:
        return result, frozenset()

    # Guard: per use and chunk of samples, the largest deviation of the first moment from autograd's
    # gradient, and the scale.  A use is verified once it agrees where the gradient is not zero: its products
    # are a function of the jaxpr alone (fixed for these shapes), so a wrong reading would show at any such
    # point; until then every call checks.
    u = jnp.sum(U, axis=0)
    rows = max(1, min(N, budget // max(per_pair, 1)))
    checks = [entry.guard(w, [a[n0 : n0 + rows] for a in leaves], u[n0 : n0 + rows]) for n0 in range(0, N, rows)]
    tol = _tolerance([w.dtype] + [dt for _, dt in plan.probes])
    dev = np.stack([np.asarray(c, dtype=np.float64) for c in checks])  # (chunks, uses, 2)
    bad = (dev[..., 0] > tol * dev[..., 1]).any(axis=0)
    rejected = frozenset(plan.uses[i].key for i in np.flatnonzero(bad))
    entry.verified.update(int(i) for i in np.flatnonzero(~bad & (dev[..., 1].max(axis=0) > 0)))
    return result, rejected


def _pullback(plan: _Plan, w: Array, v: list[Array], x_n: list[Array]) -> tuple[Array, Callable, dict[int, Array]]:
    """One sample's outputs, the pullback to ``(v, probes)``, and the activations of the recognized uses."""
    x_one = [a[None] for a in x_n]
    zeros = [jnp.zeros(s, dt) for s, dt in plan.probes]

    def g(v_: list[Array], probes: list[Array]) -> tuple[Array, dict[int, Array]]:
        outs, acts = _evaluate(plan, w, v_, x_one, probes)
        return outs[0], acts

    return jax.vjp(g, v, zeros, has_aux=True)


def _slow_vector(plan: _Plan, w: Array) -> list[Array]:
    """``v``: the entries of ``w`` for the generic route, in order, as its segments."""
    return [
        w[ranges[0][0] : ranges[0][1]] if len(ranges) == 1 else jnp.concatenate([w[a:b] for a, b in ranges])
        for ranges in plan.segments
    ]


def _dense_rows(use: _Use, act: Array, dtype: Any) -> Array:
    """The activations of a dense use as ``(n, rows, groups · in)``, contracted axes in the parameter's order."""
    n = act.shape[0]
    perm = (0,) + tuple(1 + d for d in use.act_perm)
    return jnp.transpose(act, perm).reshape(n, use.rows, use.groups * use.in_size).astype(dtype)


def _dense_products(use: _Use, a: Array, d: Array) -> Array:
    """``aᵀ δ`` per cotangent: rows ``a`` ``(T, groups · in)`` and ``δ`` ``(k, T, free)`` to ``(k, in, free)``.

    With feature groups, group ``g``'s outputs meet its own columns only.
    """
    if use.groups == 1:
        return jnp.einsum("ti,ktf->kif", a, d)
    T, k, G = a.shape[0], d.shape[0], use.groups
    q = jnp.einsum("tgi,ktgf->kigf", a.reshape(T, G, use.in_size), d.reshape(k, T, G, use.free_size // G))
    return q.reshape(k, use.in_size, use.free_size)


def _dense_deltas(use: _Use, delta: Array, dtype: Any) -> Array:
    """``δ`` at a dense use's output as ``(k, rows, free)``, from ``(k, *out)``."""
    k = delta.shape[0]
    if use.out_feature >= 0:  # a convolution: its output features, wherever they are, become the last axis
        delta = jnp.moveaxis(delta, 1 + use.out_feature, -1)
    if use.rows_last:  # the parameter is the left operand: its free axes come first in the output
        return jnp.swapaxes(delta.reshape(k, use.free_size, use.rows), 1, 2).astype(dtype)
    return delta.reshape(k, use.rows, use.free_size).astype(dtype)


def _lookups(use: _Use, indices: Array) -> tuple[Array, Array]:
    """An embedding's row indices ``(..., rows)`` from the gather's ``(..., *batch, 1)``, and which count.

    Indices outside the table are clamped to it, as the gather does, or
    dropped (``FILL_OR_DROP``: the lookup reads the fill value, which has no
    derivative in the table).
    """
    vocab = use.view.shape[0]
    lead = indices.ndim - (len(use.out.aval.shape) - (use.view.ndim - 1)) - 1
    flat = indices.reshape(indices.shape[:lead] + (use.rows,))
    valid = (flat >= 0) & (flat < vocab) if use.drop else jnp.ones(flat.shape, bool)
    return jnp.clip(flat, 0, vocab - 1), valid


def _embedding_table(use: _Use, indices: Array, values: Array, lead: tuple[int, ...], dtype: Any) -> Array:
    """``values`` ``(n, *lead, rows, free)`` summed into the table rows they look up: ``(*lead, vocab, free)``."""
    rows, _ = _lookups(use, indices)  # (n, rows); dropped lookups carry zero values
    vocab = use.view.shape[0]
    flat = jnp.moveaxis(values, 0, len(lead)).reshape(lead + (-1, use.free_size))
    table = jnp.zeros(lead + (vocab, use.free_size), dtype)
    return table.at[(slice(None),) * len(lead) + (rows.reshape(-1),)].add(flat)


def _gram(use: _Use, k: int, keep_k: bool) -> bool:
    """Whether a dense use's squares are summed through Gram matrices of rows rather than products.

    ``Σ_k (a_nᵀ δ_nk)²[i, f] = Σ_{t,s} a_nti a_nsi Σ_k δ_nktf δ_nksf``: with
    ``T`` rows, forming the products costs ``k T·in·free`` per sample and
    the Gram route ``T² (in·free + k free + in)`` (``k`` times the first
    two when the cotangents are kept apart).  One row (a plain dense layer)
    is always the Gram route: ``(a²)ᵀ(δ²)``.
    """
    if use.groups > 1:  # the Gram route's terms would mix the groups
        return False
    T, i, f = use.rows, use.in_size, use.free_size
    gram = T * T * ((k * (i * f + f)) if keep_k else (i * f + k * f + i))
    return T == 1 or gram < k * T * i * f


def _chunk_function(plan: _Plan, per_cotangent: bool) -> Callable[..., Array]:
    """The squares of one chunk, ``(w, x leaves, U, unroll) -> (K, P) or (P,)``, to be compiled.

    ``unroll`` runs the backward pass once per cotangent instead of vmapped
    over them (see :class:`_Passes`).
    """
    keep_k = per_cotangent

    def reduce(
        ct_v: list[Array], deltas: list[Array], acts: dict[int, Array], gram: list[bool], dtype: Any
    ) -> tuple[list[Array], list[Array]]:
        """One sample's squares for a block of cotangents ``(k, ...)``: summed over them unless kept.

        A dense use gives ``(k,) rows, rows, free`` (Gram route: ``Σ_k``
        of ``δ_kt δ_ks``, entrywise in ``free``) or ``(k,) in, free`` (the
        squared products).
        """
        total = (lambda t: t) if keep_k else (lambda t: jnp.sum(t, axis=0))
        squares = []
        for i, use in enumerate(plan.uses):
            if use.kind in ("bias", "scale"):
                d = deltas[use.slot] if use.kind == "bias" else deltas[use.slot] * acts[i]
                d = _bias_product(use, d, dtype)
                squares.append(total(d * d))
                continue
            if use.kind == "embed":
                # Row r's product is Σ_{t: i_t = r} δ_t, and Σ_r (Σ_{t: i_t = r} δ_t)² = Σ_t δ_t Σ_{s: i_s = i_t} δ_s:
                # per lookup, δ_t times the sum over the lookups of its row, summed into the table afterwards.
                rows, valid = _lookups(use, acts[i])
                same = ((rows[:, None] == rows[None, :]) & valid[:, None] & valid[None, :]).astype(dtype)
                d = deltas[use.slot].reshape(-1, use.rows, use.free_size).astype(dtype)
                squares.append(total(d * jnp.einsum("ts,ksf->ktf", same, d)))
                continue
            d = _dense_deltas(use, deltas[use.slot], dtype)  # (k, T, free)
            if gram[i]:
                squares.append(total(jnp.einsum("ktf,ksf->ktsf", d, d)))
            else:
                q = _dense_products(use, _dense_rows(use, acts[i][None], dtype)[0], d)
                squares.append(total(q * q))
        return [total(jnp.square(c.astype(dtype))) for c in ct_v], squares

    def chunk(w: Array, leaves: list[Array], U: Array, unroll: bool) -> Array:
        dtype = w.dtype  # float32 for half-precision models (see _widened): squares are summed in it
        v = _slow_vector(plan, w)
        gram = [u.kind == "dense" and _gram(u, U.shape[0], keep_k) for u in plan.uses]

        def one(x_n: list[Array], U_n: Array) -> tuple[Any, dict[int, Array]]:
            z, pullback, acts = _pullback(plan, w, v, x_n)
            if not unroll:
                ct_v, deltas = jax.vmap(lambda u: pullback(u[None].astype(z.dtype)))(U_n)
                return reduce(ct_v, deltas, acts, gram, dtype), acts
            # One backward pass per cotangent, sharing the forward pass: summed (or stacked) as they come.
            parts = []
            for k in range(U_n.shape[0]):
                ct_v, deltas = pullback(U_n[k][None].astype(z.dtype))
                parts.append(reduce([c[None] for c in ct_v], [d[None] for d in deltas], acts, gram, dtype))
            combine = (lambda *t: jnp.concatenate(t, axis=0)) if keep_k else (lambda *t: sum(t[1:], t[0]))
            return jax.tree.map(combine, *parts), acts

        # Per sample: squares of the generic products (per segment of v, (k,) size) and of each use's
        # products (see reduce), and the activations of the dense uses.
        (generic, squares), acts = jax.vmap(one, in_axes=(0, 1))(leaves, U)
        lead = (U.shape[0],) if per_cotangent else ()
        pieces: list[tuple[np.ndarray, Array]] = []
        if plan.slow:
            sq = jnp.concatenate([jnp.sum(g, axis=0) for g in generic], axis=-1)
            for a, b, o in plan.slow:
                pieces.append((np.arange(a, b), sq[..., o : o + b - a]))
        for i, use in enumerate(plan.uses):
            if use.kind == "dense" and gram[i]:
                a = _dense_rows(use, acts[i], dtype)
                # Σ_n Σ_{t,s} (a_nt a_ns) ⊗ (δ_nt δ_ns): one matrix product over (n, t, s); for one row
                # it is (a²)ᵀ(δ²).
                aa = jnp.einsum("nti,nsi->ntsi", a, a)
                spec = "ntsi,nktsf->kif" if per_cotangent else "ntsi,ntsf->if"
                pieces.append((use.view, _to_param_layout(use, jnp.einsum(spec, aa, squares[i]), len(lead))))
            elif use.kind == "dense":
                pieces.append((use.view, _to_param_layout(use, jnp.sum(squares[i], axis=0), len(lead))))
            elif use.kind == "embed":
                pieces.append((use.view, _embedding_table(use, acts[i], squares[i], lead, dtype)))
            else:
                pieces.append((use.entries, jnp.sum(squares[i], axis=0)))
        return _place(pieces, plan.P, lead, dtype)

    return chunk


def _guard_function(plan: _Plan, f: Callable[[Array, Any], Array], treedef: Any) -> Callable[..., Array]:
    """The guard of one chunk of samples, ``(w, x leaves, u) -> (uses, 2)``, to be compiled.

    ``u`` is the sum of the cotangents, ``(n, ...)``.  Per recognized use:
    the largest deviation of the first moment of its products (``Σ_n`` of
    ``a_n ⊗ δ_n`` or of ``±δ_n`` summed over the broadcast axes, with ``δ``
    from ``u``) from autograd's gradient of ``⟨f(w, x), u⟩``, and the larger
    of their magnitudes.
    """

    def guard(w: Array, leaves: list[Array], u: Array) -> Array:
        dtype = w.dtype
        v = _slow_vector(plan, w)

        def one(x_n: list[Array], u_n: Array) -> tuple[list[Array], dict[int, Array]]:
            z, pullback, acts = _pullback(plan, w, v, x_n)
            _, deltas = pullback(u_n[None].astype(z.dtype))
            return [d.astype(dtype) for d in deltas], acts

        deltas, acts = jax.vmap(one)(leaves, u)
        x = jax.tree_util.tree_unflatten(treedef, leaves)
        z, pullback = jax.vjp(lambda w_: f(w_, x), w)
        grad = pullback(u.astype(z.dtype))[0].astype(dtype)
        rows = []
        for i, use in enumerate(plan.uses):
            d = deltas[use.slot]
            if use.kind == "dense":
                a = _dense_rows(use, acts[i], dtype).reshape(-1, use.groups * use.in_size)
                delta = _dense_deltas(use, d, dtype).reshape(1, -1, use.free_size)
                moment = _to_param_layout(use, _dense_products(use, a, delta)[0], 0)
                ref = _take(grad, use.view)
            elif use.kind == "embed":
                _, valid = _lookups(use, acts[i])
                values = d.reshape(-1, use.rows, use.free_size).astype(dtype) * valid[..., None].astype(dtype)
                moment = _embedding_table(use, acts[i], values, (), dtype).reshape(use.view.shape)
                ref = _take(grad, use.view)
            else:
                d = d if use.kind == "bias" else d * acts[i]
                moment = use.sign * jnp.sum(_bias_product(use, d, dtype), axis=0)
                ref = _take(grad, use.entries)
            scale = jnp.maximum(jnp.max(jnp.abs(ref), initial=0.0), jnp.max(jnp.abs(moment), initial=0.0))
            rows.append(jnp.stack([jnp.max(jnp.abs(moment - ref), initial=0.0), scale]))
        return jnp.stack(rows).astype(jnp.float32)

    return guard
