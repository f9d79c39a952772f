"""Per-sample vector-Jacobian products and their squares, written with the backend's primitives.

The default route behind :meth:`Backend.per_sample_squares` (exact and Monte
Carlo GGN diagonals): one VJP per (cotangent, sample) pair, vmapped where the
backend can, on chunks of pairs that fit a memory budget.  Backends with a
structured route (PyTorch's linear layers) replace it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._arrays import itemsize, shape
from ._backend import Array, Backend, map_rows


def with_sample_axis(x_n: Any) -> Any:
    """One sample's inputs (an array or a tuple of arrays) as a batch of one."""
    return tuple(a[None] for a in x_n) if isinstance(x_n, tuple) else x_n[None]


def sample_slice(x: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch of inputs (an array or a tuple of arrays)."""
    return tuple(a[start:stop] for a in x) if isinstance(x, tuple) else x[start:stop]


def per_sample_vjp(backend: Backend, f: Callable[[Array, Any], Array], w: Array, x: Any, U: Array) -> Array:
    """Vector-Jacobian products of every sample with its own cotangents: shape ``(K, N, P)``.

    ``out[k, n] = J_nᵀ U[k, n]``, where ``J_n`` is the Jacobian in ``w`` of
    the outputs of sample ``n`` evaluated alone, ``f(w, x[n:n+1])[0]``.
    ``f(w, x)`` maps the flat parameters (``P`` entries) and a batch of inputs
    (an array, or a tuple of arrays, with the samples along axis 0) to outputs
    of shape ``(N, ...)``; ``U`` has shape ``(K, N, ...)``.

    Vmaps over the samples a VJP mapped over the ``K`` cotangents (the
    sample's forward pass runs once), or loops over the samples when the
    backend cannot vmap.
    """
    xp = backend.xp

    def one_sample(x_n: Any, u_n: Array) -> Array:
        x_one = with_sample_axis(x_n)
        g = lambda p: f(p, x_one)  # noqa: E731
        return map_rows(backend, lambda u: backend.vjp(g, w, u[None])[1])(u_n)  # (K, P)

    mapped = backend.vmap(one_sample, (0, 1))
    if mapped is not None:
        return xp.moveaxis(mapped(x, U), 0, 1)
    rows = []
    for n in range(shape(U)[1]):
        x_n = sample_slice(x, n, n + 1)
        g = lambda p, x_n=x_n: f(p, x_n)  # noqa: E731
        rows.append(map_rows(backend, lambda u, g=g: backend.vjp(g, w, u[None])[1])(U[:, n]))
    return xp.stack(rows, axis=1)


PerSampleVJP = Callable[[Callable[[Array, Any], Array], Array, Any, Array], Array]
"""``vjps(f, w, x, U) -> (K, N, P)``, as :func:`per_sample_vjp` without the backend argument."""


def generic_squares(
    backend: Backend, f: Callable[[Array, Any], Array], per_cotangent: bool, vjps: PerSampleVJP | None = None
) -> Callable[[Array, Any, Callable[[Array], Array], int], Array]:
    """``squares(w, x, cotangents, memory_budget)`` of :meth:`Backend.per_sample_squares`, by per-sample VJPs.

    Squares the products of :func:`per_sample_vjp` on chunks of samples and
    cotangents holding at most ``memory_budget`` bytes of per-sample
    products, compiled once with :meth:`Backend.compile`, and sums the
    chunks on the device.  ``vjps`` replaces :func:`per_sample_vjp` where a
    framework batches the pairs better (TensorFlow's ``vectorized_map``).
    """
    xp = backend.xp
    if vjps is None:
        vjps = lambda g, w, x, U: per_sample_vjp(backend, g, w, x, U)  # noqa: E731

    def chunk_squares(w: Array, x: Any, U: Array) -> Array:
        products = vjps(f, w, x, U)
        squares = xp.sum(products * products, axis=1)
        return squares if per_cotangent else xp.sum(squares, axis=0)

    compiled = backend.compile(chunk_squares)

    def squares(w: Array, x: Any, cotangents: Callable[[Array], Array], memory_budget: int) -> Array:
        U = cotangents(backend.stop_gradient(f(w, x)))
        K, N = shape(U)[:2]
        per_product = shape(w)[0] * itemsize(w)
        k_chunk = int(max(1, min(K, memory_budget // max(per_product, 1))))
        n_chunk = int(max(1, min(N, memory_budget // max(k_chunk * per_product, 1))))
        parts = []
        for k0 in range(0, K, k_chunk):
            total = None
            for n0 in range(0, N, n_chunk):
                part = compiled(w, sample_slice(x, n0, n0 + n_chunk), U[k0 : k0 + k_chunk, n0 : n0 + n_chunk])
                total = part if total is None else total + part
            parts.append(total)
        if per_cotangent:
            return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    return squares
