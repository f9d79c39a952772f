"""Sums of squared per-sample products in PyTorch without holding the per-sample products.

The exact GGN diagonal is ``Σ_n Σ_k (J_nᵀ u_nk)²``.  Computed naively (the
core's default) every per-sample product is formed: ``K·N·P`` numbers.  But
a parameter that enters the model once, as the weight of a product with one
row per sample, has an outer product as its per-sample product:

- ``y = F.linear(a, W, b)``: ``δ_n a_nᵀ`` for ``W`` and ``δ_n`` for ``b``;
- ``y = a @ B``: ``a_n δ_nᵀ`` for ``B``;
- ``y = h + b`` with ``b`` a vector added to every row: ``δ_n``,

where ``δ_n = ∂⟨z, u⟩/∂y_n`` is the cotangent at the op's output.  Then
``Σ_n (δ_n a_nᵀ)² = (δ²)ᵀ (a²)``: one matrix product, and one batched
backward pass gives ``δ`` at every such output for all ``K`` cotangents.

The forward pass is recorded with a ``TorchFunctionMode``, which sees every
torch function that reads a view of the flat parameter vector.  An entry read
exactly once, by a recognized op, takes this route; every other entry that is
read at all (convolution kernels, norms, embeddings, tied weights, ...) goes
through the generic per-sample route, restricted to those entries.  Nothing
depends on a list of layers: unrecognized reads are merely slower.  As a
guard against reads the mode cannot see (an extension op handed a parameter
directly), the gradient of ``⟨z, Σ_k u_k⟩`` is compared with what the
recorded ops imply; entries where they disagree go the generic route too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

Squares = Callable[[torch.Tensor, Any, Callable[[torch.Tensor], torch.Tensor], int], torch.Tensor]


def tree_leaves(obj: Any) -> list[Any]:
    """Every non-container object in nested tuples, lists and dicts (the arguments and results of torch calls)."""
    if isinstance(obj, (tuple, list)):
        return [leaf for item in obj for leaf in tree_leaves(item)]
    if isinstance(obj, dict):
        return [leaf for item in obj.values() for leaf in tree_leaves(item)]
    return [obj]


def _existing(*names: str) -> set[Any]:
    """The torch callables with these dotted names that exist in this version."""
    out = set()
    for name in names:
        obj: Any = torch
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            out.add(obj)
    return out


_LINEAR = _existing("nn.functional.linear", "_C._nn.linear")
_MATMUL = _existing("matmul", "mm", "Tensor.matmul", "Tensor.__matmul__", "Tensor.mm")
_ADD = _existing("add", "Tensor.add", "Tensor.__add__", "Tensor.__radd__")


@dataclass
class _Use:
    """One recognized read: ``kind`` is ``"linear"`` (``y = a Wᵀ``), ``"right"`` (``y = a B``) or ``"bias"``."""

    kind: str
    alias: torch.Tensor
    out: torch.Tensor
    a: torch.Tensor | None = None


class _Recorder(TorchFunctionMode):
    """Records which torch functions read views of one flat parameter vector during a forward pass."""

    def __init__(self, flat: torch.Tensor) -> None:
        super().__init__()
        self._ptr = flat.untyped_storage().data_ptr()
        self.uses: list[_Use] = []
        self.others: list[torch.Tensor] = []

    def is_alias(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        try:
            return t.untyped_storage().data_ptr() == self._ptr
        except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
            return False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        read = [t for t in tree_leaves((args, kwargs)) if self.is_alias(t)]
        if not read:
            return out
        produced = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        # Metadata queries produce no tensor and views produce aliases: neither is a use.
        if not produced or all(self.is_alias(t) for t in produced):
            return out
        uses = self._recognize(func, args, kwargs, out)
        self.uses.extend(uses)
        claimed = [u.alias for u in uses]
        for t in read:  # each recognized slot claims one read; every other read is a use of another kind
            hit = next((i for i, c in enumerate(claimed) if c is t), None)
            if hit is None:
                self.others.append(t)
            else:
                del claimed[hit]
        return out

    def _recognize(self, func: Any, args: tuple, kwargs: dict, out: Any) -> list[_Use]:
        # Only ops on the autograd graph (not, say, inside a custom Function's forward) have a δ.
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or not out.requires_grad:
            return []
        if func in _LINEAR:
            names = ("input", "weight", "bias")
            bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            a, W, b = bound.get("input"), bound.get("weight"), bound.get("bias")
            if not self._rows(a):
                return []
            uses = []
            if self.is_alias(W) and W.dim() == 2 and _one_to_one(W):
                uses.append(_Use("linear", W, out, a))
            if self.is_alias(b) and b.dim() == 1 and _one_to_one(b):
                uses.append(_Use("bias", b, out))
            return uses
        if kwargs or len(args) != 2:
            return []
        if func in _MATMUL:
            a, B = args
            if self._rows(a) and self.is_alias(B) and B.dim() == 2 and _one_to_one(B):
                return [_Use("right", B, out, a)]
        if func in _ADD:
            h, b = args if self.is_alias(args[1]) else args[::-1]
            if (
                self._rows(h)
                and self.is_alias(b)
                and b.dim() == 1
                and tuple(out.shape) == tuple(h.shape)
                and b.shape[0] == h.shape[1]
                and _one_to_one(b)
            ):
                return [_Use("bias", b, out)]
        return []

    def _rows(self, a: Any) -> bool:
        """A matrix of one row per sample that is not itself a view of the parameters."""
        return isinstance(a, torch.Tensor) and a.dim() == 2 and not self.is_alias(a)


def _one_to_one(t: torch.Tensor) -> bool:
    """Whether the view reads each parameter entry at most once (no broadcast strides)."""
    if t.dim() == 1:
        return t.shape[0] <= 1 or t.stride(0) != 0
    return t.is_contiguous() or t.t().is_contiguous()


def _like(buffer: torch.Tensor, t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The entries of ``buffer`` (``(P,)`` or ``(K, P)``) that the view ``t`` of ``flat`` reads, shaped like ``t``.

    A view of ``buffer`` (no copy): writing to it writes the buffer.
    """
    offset = t.storage_offset() - flat.storage_offset()
    if buffer.dim() == 1:
        return buffer.as_strided(t.shape, t.stride(), buffer.storage_offset() + offset)
    rows, size = buffer.shape
    return buffer.as_strided(
        (rows,) + tuple(t.shape), (buffer.stride(0),) + t.stride(), buffer.storage_offset() + offset
    )


def _batched_grads(z: torch.Tensor, outs: list[torch.Tensor], cotangents: torch.Tensor) -> list[torch.Tensor | None]:
    """``∂⟨z, u_k⟩/∂out`` for every output and every cotangent ``u_k`` (a leading axis of ``cotangents``)."""
    try:
        return list(
            torch.autograd.grad(z, outs, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True)
        )
    except RuntimeError as err:
        if "vmap" not in str(err) and "not implemented" not in str(err):
            raise
    rows = [torch.autograd.grad(z, outs, u, retain_graph=True, allow_unused=True) for u in cotangents]
    return [None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(outs))]


def _square_sums(use: _Use, delta: torch.Tensor, per_cotangent: bool) -> torch.Tensor:
    """``Σ_n`` of the squared per-sample products of one use, shaped like its view (with ``K`` first if asked)."""
    d2 = delta * delta  # (K, N, out)
    if use.kind == "bias":
        return d2.sum(1) if per_cotangent else d2.sum((0, 1))
    a2 = use.a.detach() ** 2  # (N, in)
    if use.kind == "linear":  # W is (out, in)
        return torch.einsum("kno,ni->koi", d2, a2) if per_cotangent else d2.sum(0).T @ a2
    return torch.einsum("ni,kno->kio", a2, d2) if per_cotangent else a2.T @ d2.sum(0)  # B is (in, out)


def _first_moment_agrees(use: _Use, delta_sum: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the gradient of ``⟨z, Σ_k u_k⟩`` on this view (``grad``) is what the recorded op implies.

    Compared along a fixed direction of the output axis, so the check costs
    products with vectors only.
    """
    if use.kind == "bias":
        expected, actual = delta_sum.sum(0), grad
    else:
        r = torch.cos(torch.arange(delta_sum.shape[1], dtype=delta_sum.dtype, device=delta_sum.device) * 1.7 + 0.3)
        a = use.a.detach()
        # The gradient of W (linear) is δᵀa, that of B (right) aᵀδ.
        expected, actual = a.T @ (delta_sum @ r), (grad.T @ r if use.kind == "linear" else grad @ r)
    scale = max(float(expected.abs().max()), float(actual.abs().max()), 1e-30)
    tol = 10.0 * math.sqrt(torch.finfo(expected.dtype).eps) * scale
    return bool((expected - actual).abs().max() <= tol)


def per_sample_squares(
    f: Callable[[torch.Tensor, Any], torch.Tensor], per_cotangent: bool, generic: Callable
) -> Squares:
    """``squares(w, x, cotangents, memory_budget)`` of :meth:`Backend.per_sample_squares`, by the recorded route.

    ``generic(f, per_cotangent)`` gives the generic route's function, used for
    the entries the recorded route does not cover.
    """
    whole = generic(f, per_cotangent)

    def squares(
        w: torch.Tensor, x: Any, cotangents: Callable[[torch.Tensor], torch.Tensor], memory_budget: int
    ) -> torch.Tensor:
        flat = w.detach().requires_grad_(True)
        recorder = _Recorder(flat)
        with torch.enable_grad(), recorder:
            z = f(flat, x)
        if not recorder.uses or not z.requires_grad:
            return whole(w, x, cotangents, memory_budget)
        U = cotangents(z.detach())
        K, P = U.shape[0], flat.numel()
        fast_reads = torch.zeros(P, dtype=torch.int32, device=flat.device)
        other_reads = torch.zeros(P, dtype=torch.int32, device=flat.device)
        for use in recorder.uses:
            _like(fast_reads, use.alias, flat).add_(1)  # a recognized view reads each entry once
        for t in recorder.others:
            _like(other_reads, t, flat).fill_(1)
        fast = (fast_reads == 1) & (other_reads == 0)

        outs = list({id(u.out): u.out for u in recorder.uses}.values())
        position = {id(o): i for i, o in enumerate(outs)}
        per_cot = sum(o.numel() for o in outs) * outs[0].element_size()  # δ of one cotangent
        k_chunk = int(max(1, min(K, memory_budget // max(per_cot, 1))))
        result = torch.zeros((K, P) if per_cotangent else (P,), dtype=flat.dtype, device=flat.device)
        delta_sums: list[torch.Tensor | None] = [None] * len(outs)
        for k0 in range(0, K, k_chunk):
            k1 = min(k0 + k_chunk, K)
            deltas = _batched_grads(z, outs, U[k0:k1])
            for i, d in enumerate(deltas):
                if d is not None:
                    delta_sums[i] = d.sum(0) if delta_sums[i] is None else delta_sums[i] + d.sum(0)
            for use in recorder.uses:
                d = deltas[position[id(use.out)]]
                if d is None:
                    continue
                keep = _like(fast, use.alias, flat)
                part = _square_sums(use, d, per_cotangent) * keep
                _like(result[k0:k1] if per_cotangent else result, use.alias, flat).add_(part)

        # Guard: the summed cotangent's gradient must match the recorded ops on every fast entry,
        # and vanish on every entry no op was seen to read.
        (grad,) = torch.autograd.grad(z, flat, U.sum(0), allow_unused=True)
        grad = torch.zeros_like(flat) if grad is None else grad.detach()
        unread = (fast_reads == 0) & (other_reads == 0)
        slow = ~fast & ~unread
        slow |= unread & (grad != 0)
        for use in recorder.uses:
            d, g = delta_sums[position[id(use.out)]], _like(grad, use.alias, flat)
            # An op whose output does not reach z implies a zero gradient on its entries.
            if not (bool((g == 0).all()) if d is None else _first_moment_agrees(use, d, g)):
                _like(slow, use.alias, flat).fill_(True)
                _like(result, use.alias, flat).fill_(0)
        del z, recorder

        rest = torch.nonzero(slow).reshape(-1)
        if rest.numel():
            base = w.detach()
            sub = lambda v, x: f(base.index_put((rest,), v), x)  # noqa: E731
            part = generic(sub, per_cotangent)(base[rest], x, lambda _: U, memory_budget)
            if per_cotangent:
                result[:, rest] += part
            else:
                result[rest] += part
        return result

    return squares
