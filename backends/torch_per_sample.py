"""Sums of squared per-sample products in PyTorch without the generic per-sample route.

The exact GGN diagonal is ``Σ_n Σ_k (J_nᵀ u_nk)²``.  Computed naively (the
core's default) every per-sample product is formed through a per-sample
backward pass of the whole network: ``K·N·P`` numbers.  But a parameter that
enters the model once, through an op whose derivative in that parameter is a
contraction of the cotangent at the op's output with something the forward
pass already has, has a per-sample product made from that cotangent alone:

- ``y = F.linear(a, W, b)`` or ``y = a @ B``: ``Σ_t δ_nt a_ntᵀ`` for ``W``
  (``a_nt δ_ntᵀ`` for ``B``), ``Σ_t δ_nt`` for ``b``, summed over the
  positions ``t`` of sample ``n`` (none for a matrix of one row per sample);
- ``y = h + b`` with ``b`` broadcast over the leading axes: ``Σ_t δ_nt``;
- ``y = F.conv{1,2,3}d(x, W, b, stride, padding, dilation, groups)``: the
  contraction of ``δ_n`` with the patches of ``x_n`` for ``W``, ``δ_n``
  summed over positions for ``b``;
- ``F.batch_norm`` with running statistics (inference mode) and
  ``F.layer_norm``: ``Σ_t δ_nt x̂_nt`` for the scale, ``Σ_t δ_nt`` for the
  shift, ``x̂`` the normalized input;
- ``F.embedding`` (no ``max_norm``, no ``scale_grad_by_freq``): ``δ_nt``
  added into the row of the token at ``t``, nothing into the padding row,

where ``δ = ∂⟨z, u⟩/∂y`` is the cotangent at the op's output; backward passes
to the recorded outputs only (vmapped over the ``K`` cotangents, or one per
cotangent, whichever is faster, see :class:`_Cotangents`) give ``δ`` at every
such output.  For a matrix of one row per sample
``Σ_n (δ_n a_nᵀ)² = (δ²)ᵀ (a²)``: one matrix product.  Otherwise the
per-sample products of that one parameter are formed from ``δ`` in chunks of
samples bounded by the memory budget (as BackPACK does; for a convolution a
batched product of ``δ_n`` with the gathered input windows), never through
the rest of the network.  On a loaded 2-core CPU (one thread, CPU time) this
takes LeNet-5's exact diagonal from 106 to 4.0 gradients (BackPACK's
``DiagGGNExact``: 4.0) and its peak memory from 606 to 35 MiB.

The forward pass is recorded with a ``TorchFunctionMode``, which sees every
torch function that reads a view of the flat parameter vector.  An entry read
exactly once, by a recognized op, takes this route; every other entry that is
read at all (tied weights, fused kernels, ...) goes through the generic
per-sample route, restricted to those entries.  Composites written in Python
(``F.multi_head_attention_forward``) are recorded from the inside: their
projections are plain linear maps.  Nothing depends on a list of layers:
unrecognized reads are merely slower.  Two guards keep the result exact:

- which axis of an op's output holds the samples is found, not assumed: the
  cotangents summed and weighted by a random factor per sample must give the
  op's summed cotangent weighted by the same factors along that axis (a linear layer
  applied to a ``(T·N, D)`` reshape of a batch, or to a ``(T, N, D)`` layout,
  has rows that are not samples); an op where no axis passes goes the
  generic route;
- against reads the mode cannot see (an extension op handed a parameter
  directly), autograd's gradient for that weighted cotangent (the same
  backward pass) is compared with what the recorded ops imply; entries
  where they disagree go the generic route too.

The guards' verdicts depend on the model's structure, not on the numbers:
the first call on each structure (the recorded reads with their entries and
output shapes, and the shapes of the inputs) runs them, and later calls on
the same structure reuse the layouts, the rejections and the generic
entries found, skipping the guards' backward pass and host reads (on the
benchmark MLP, a quarter of the call).
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Squares = Callable[[torch.Tensor, Any, Callable[[torch.Tensor], torch.Tensor], int], torch.Tensor]
Pair = tuple[torch.Tensor, torch.Tensor]
"""``(actual, expected)``: two computations of one quantity, equal up to rounding when a guard holds."""
Layout = tuple[int, int]
"""``(A, B)``: the leading axes of an op's output, flattened, read as ``(A, N, B)`` with the samples in the middle."""


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
# F.conv{1,2,3}d are the same objects as torch.conv{1,2,3}d.
_CONV = _existing("conv1d", "conv2d", "conv3d", "nn.functional.conv1d", "nn.functional.conv2d", "nn.functional.conv3d")
_BATCH_NORM = _existing("nn.functional.batch_norm")
_LAYER_NORM = _existing("nn.functional.layer_norm")
_EMBEDDING = _existing("nn.functional.embedding")
# Composites written in Python that read parameters through ops recognized here: the recorder runs their
# inside under itself instead of treating the whole call as one unrecognized read.
_COMPOSITES = _existing("nn.functional.multi_head_attention_forward")
_DISPATCH_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def _opened(func: Any) -> Any:
    """A copy of a Python composite whose own ``__torch_function__`` check is off, or ``None`` if it has none.

    The composite's first step hands the whole call to the active mode;
    with that check answering no, it runs its body, whose ops (``F.linear``,
    ``F.scaled_dot_product_attention``, ...) reach the mode one by one.  The
    same code runs, so the outputs are the composite's own.  Made at each
    call (a few µs): the module's names are read as they are now, patched
    or not.
    """
    code = getattr(func, "__code__", None)
    if code is None or not any(name in code.co_names for name in _DISPATCH_CHECKS):
        return None
    scope = dict(func.__globals__)
    scope.update({name: (lambda *args, **kwargs: False) for name in _DISPATCH_CHECKS if name in scope})
    copy = types.FunctionType(code, scope, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Positional and keyword arguments by parameter name (missing ones are absent)."""
    return dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}


# ----------------------------------------------------------------------
# Recognized uses: per-sample products from the cotangent at the output
# ----------------------------------------------------------------------
Block = Sequence[torch.Tensor]
"""The cotangents at one output for a block of ``k`` cotangents of ``z``: ``k`` tensors shaped like the output
(a list, or a tensor with ``k`` first)."""


@dataclass(eq=False)
class _Use:
    """One recognized read of the parameter view ``alias`` by an op with output ``out``.

    ``out`` is ``(*leading, *features)`` with ``lead`` leading axes, among
    which the samples are (the rest are positions a sample's product sums
    over).  :meth:`products` gives the per-sample products of ``alias`` for a
    slice of samples from one cotangent ``δ`` at ``out``.
    """

    alias: torch.Tensor
    out: torch.Tensor
    lead: int

    def rows(self, delta: torch.Tensor, layout: Layout) -> torch.Tensor:
        """One cotangent at ``out`` (or a tensor shaped like it) as ``(A, N, B, *features)``."""
        A, B = layout
        return delta.reshape((A, -1, B) + tuple(self.out.shape[self.lead :]))

    def prepare(self, n0: int, n1: int) -> Any:
        """What :meth:`products` reuses for every cotangent of samples ``n0:n1`` (a convolution's windows)."""
        return None

    def products(self, delta: torch.Tensor, layout: Layout, n0: int, n1: int, ready: Any) -> torch.Tensor:
        """Per-sample products ``(n1 - n0, *alias.shape)`` of samples ``n0:n1`` for one cotangent ``δ`` at ``out``."""
        raise NotImplementedError

    def sample_bytes(self) -> int:
        """Bytes that :meth:`products` and :meth:`prepare` hold per sample (result, square and temporaries)."""
        return 2 * self.alias.numel() * self.alias.element_size()

    def square_sums(self, block: Block, layout: Layout, per_cotangent: bool, budget: int, memo: dict) -> torch.Tensor:
        """``Σ_n`` of the squared products: ``(k, *alias.shape)`` if ``per_cotangent``, else summed to ``alias.shape``.

        Samples are taken in chunks of at most ``budget`` bytes of products,
        one cotangent at a time.  ``memo`` holds what the uses of one output
        share (``Σ_k δ²``) for this block.
        """
        N = self.rows(block[0], layout).shape[1]
        n_chunk = int(max(1, min(N, budget // max(self.sample_bytes(), 1))))
        sums: list[torch.Tensor | None] = [None] * len(block)
        for n0 in range(0, N, n_chunk):
            n1 = min(n0 + n_chunk, N)
            ready = self.prepare(n0, n1)
            if n1 - n0 == N:  # kept for the check of the same call (see agreement): no second gathering
                memo[("ready", id(self))] = ready
            for k, delta in enumerate(block):
                g = self.products(delta, layout, n0, n1, ready)
                s = (g * g).sum(0)
                sums[k] = s if sums[k] is None else sums[k] + s
        if per_cotangent:
            return torch.stack(sums)  # type: ignore[arg-type]
        total = sums[0]
        for s in sums[1:]:
            total += s  # type: ignore[operator]
        return total  # type: ignore[return-value]

    def agreement(self, delta: torch.Tensor, layout: Layout, grad: torch.Tensor, budget: int, memo: dict) -> Pair:
        """``(actual, expected)``: autograd's gradient ``grad`` on the view, and what the op implies from ``δ``.

        Both for one and the same cotangent of ``z`` (projected alike where
        the op can), to be compared by :func:`_agreeing`; the op implies the
        sum over samples of the per-sample products.  ``memo`` may hold what
        :meth:`square_sums` prepared for all samples at once.
        """
        N = self.rows(delta, layout).shape[1]
        n_chunk = int(max(1, min(N, budget // max(self.sample_bytes(), 1))))
        total = None
        for n0 in range(0, N, n_chunk):
            n1 = min(n0 + n_chunk, N)
            ready = memo.pop(("ready", id(self)), None) if n1 - n0 == N else None
            part = self.products(delta, layout, n0, n1, self.prepare(n0, n1) if ready is None else ready).sum(0)
            total = part if total is None else total + part
        return grad, total


def _delta_squares(block: Block, memo: dict) -> torch.Tensor:
    """``Σ_k δ_k²`` of a block of cotangents at one output, computed once for all its uses."""
    key = ("squares", id(block))
    if key not in memo and isinstance(block, torch.Tensor):  # a vmapped pass: one reduction over the block
        memo[key] = (block * block).sum(0)
    if key not in memo:
        total = block[0] * block[0]
        for d in block[1:]:
            total.addcmul_(d, d)
        memo[key] = total
    return memo[key]


@dataclass(eq=False)
class _Matmul(_Use):
    """``y = a Wᵀ`` (``W`` the alias, ``(out, in)``) or, with ``right``, ``y = a B`` (``B`` ``(in, out)``)."""

    a: torch.Tensor = None  # type: ignore[assignment]
    right: bool = False

    def products(self, delta: torch.Tensor, layout: Layout, n0: int, n1: int, ready: Any) -> torch.Tensor:
        A, B = layout
        a = self.a.reshape(A, -1, B, self.a.shape[-1])[:, n0:n1]
        d = self.rows(delta, layout)[:, n0:n1]
        return torch.einsum("anbo,anbi->nio" if self.right else "anbo,anbi->noi", d, a)

    def square_sums(self, block: Block, layout: Layout, per_cotangent: bool, budget: int, memo: dict) -> torch.Tensor:
        if layout != (1, 1):
            return super().square_sums(block, layout, per_cotangent, budget, memo)
        # One row per sample: Σ_n (δ_n a_nᵀ)² = (δ²)ᵀ (a²), no per-sample product formed.
        a2 = self.a * self.a
        a2 = a2.reshape(-1, a2.shape[-1])  # (N, in)
        if per_cotangent:
            d2 = [(d * d).reshape(a2.shape[0], -1) for d in block]  # (N, out) each
            return torch.stack([a2.T @ e if self.right else e.T @ a2 for e in d2])
        d2 = _delta_squares(block, memo).reshape(a2.shape[0], -1)
        return a2.T @ d2 if self.right else d2.T @ a2  # B is (in, out), W is (out, in)

    def agreement(self, delta: torch.Tensor, layout: Layout, grad: torch.Tensor, budget: int, memo: dict) -> Pair:
        # Compared along a fixed direction of the output axis, so the check costs products
        # with vectors only; it sums over every row, so it holds in any layout.
        d = delta.reshape(-1, delta.shape[-1])
        a = self.a.reshape(d.shape[0], -1)
        r = _direction(d.shape[1], d)
        # The gradient of W (y = a Wᵀ) is δᵀa, that of B (y = a B) aᵀδ.
        expected, actual = a.T @ (d @ r), (grad @ r if self.right else grad.T @ r)
        return actual, expected


_DIRECTIONS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _direction(size: int, like: torch.Tensor) -> torch.Tensor:
    """A fixed direction with no zero and no sign pattern, for checks by projection (made once per size)."""
    key = (size, like.dtype, like.device)
    if key not in _DIRECTIONS:
        if len(_DIRECTIONS) > 64:  # a bound, for models whose widths change from call to call
            _DIRECTIONS.clear()
        _DIRECTIONS[key] = torch.cos(torch.arange(size, dtype=like.dtype, device=like.device) * 1.7 + 0.3)
    return _DIRECTIONS[key]


@dataclass(eq=False)
class _Shift(_Use):
    """A shift broadcast over the leading axes of ``out``, optionally scaling a normalized input ``xhat`` first.

    The product is ``Σ_t δ_nt`` (shift) or ``Σ_t δ_nt x̂_nt`` (scale, ``xhat``
    given) over the positions ``t`` of sample ``n``: linear and added biases,
    layer norms' weights and biases.
    """

    xhat: Callable[[], torch.Tensor] | None = None

    def products(self, delta: torch.Tensor, layout: Layout, n0: int, n1: int, ready: Any) -> torch.Tensor:
        d = self.rows(delta, layout)[:, n0:n1]
        if self.xhat is not None:
            d = d * self.rows(self.xhat(), layout)[:, n0:n1]
        return d[0, :, 0] if layout == (1, 1) else d.sum((0, 2))  # one row per sample: a view, no sum

    def square_sums(self, block: Block, layout: Layout, per_cotangent: bool, budget: int, memo: dict) -> torch.Tensor:
        if layout == (1, 1) and self.xhat is None and not per_cotangent:  # the bias of a linear layer
            d2 = _delta_squares(block, memo)
            return d2.reshape((-1,) + tuple(self.alias.shape)).sum(0)
        return super().square_sums(block, layout, per_cotangent, budget, memo)


@dataclass(eq=False)
class _Channel(_Use):
    """A per-channel shift (conv bias, batch-norm bias) or scale of ``xhat`` (batch-norm weight) on ``(N, C, ...)``."""

    xhat: Callable[[], torch.Tensor] | None = None

    def products(self, delta: torch.Tensor, layout: Layout, n0: int, n1: int, ready: Any) -> torch.Tensor:
        d = delta[n0:n1]
        if self.xhat is not None:
            d = d * self.xhat()[n0:n1]
        return d.sum(tuple(range(2, d.dim()))) if d.dim() > 2 else d


@dataclass(eq=False)
class _Conv(_Use):
    """The kernel ``W`` (``(C_out, C_in / groups, *kernel)``) of ``y = conv(x, W)`` with ``x`` ``(N, C_in, *size)``."""

    x: torch.Tensor = None  # type: ignore[assignment]
    stride: tuple[int, ...] = ()
    pads: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def prepare(self, n0: int, n1: int) -> torch.Tensor:
        """The input windows of samples ``n0:n1`` as ``(n · groups, C_in / groups · kernel size, positions)``."""
        x = self.x[n0:n1]
        if any(p for pair in self.pads for p in pair):
            x = F.pad(x, [p for pair in reversed(self.pads) for p in pair])  # F.pad lists the last axis first
        n, G, kernel = x.shape[0], self.groups, tuple(self.alias.shape[2:])
        if len(kernel) <= 2:  # im2col: channels, then kernel offsets, on rows; output positions on columns
            one = len(kernel) == 1  # as a 2-d convolution of height 1
            windows = F.unfold(
                x[:, :, None] if one else x,
                (1,) + kernel if one else kernel,
                dilation=(1,) + self.dilation if one else self.dilation,
                stride=(1,) + self.stride if one else self.stride,
            )
            return windows.reshape(n * G, -1, windows.shape[-1])
        for i, (k, s, d) in enumerate(zip(kernel, self.stride, self.dilation)):
            x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends the window axis; the spatial axes keep their place
        if any(d > 1 for d in self.dilation):
            x = x[(Ellipsis,) + tuple(slice(None, None, d) for d in self.dilation)]
        spatial = len(kernel)  # (n, C, *out_size, *kernel) → (n, C, *kernel, *out_size), one copy
        order = (0, 1) + tuple(range(2 + spatial, 2 + 2 * spatial)) + tuple(range(2, 2 + spatial))
        return x.permute(order).reshape(n * G, -1, math.prod(x.shape[2 : 2 + spatial]))

    def products(self, delta: torch.Tensor, layout: Layout, n0: int, n1: int, ready: Any) -> torch.Tensor:
        d = delta[n0:n1]
        n, G = d.shape[0], self.groups
        g = torch.bmm(d.reshape(n * G, d.shape[1] // G, -1), ready.transpose(1, 2))
        return g.reshape((n,) + tuple(self.alias.shape))

    def sample_bytes(self, k: int = 1) -> int:
        """Bytes per sample for ``k`` cotangents at once: their products, squares and cotangents, and the windows."""
        item = self.alias.element_size()
        windows = self.x.shape[1] * math.prod(self.out.shape[2:]) * math.prod(self.alias.shape[2:])
        return (k * (2 * self.alias.numel() + math.prod(self.out.shape[1:])) + windows) * item

    def square_sums(self, block: Block, layout: Layout, per_cotangent: bool, budget: int, memo: dict) -> torch.Tensor:
        if self.groups != 1:
            return super().square_sums(block, layout, per_cotangent, budget, memo)
        # All k cotangents of a chunk in one batched product, (n, k·C_out, positions) by the windows: one copy
        # of the cotangents, sample-major, buys one call with k times the rows instead of k calls (LeNet-5's
        # second convolution: 1.4 ms against 2.4 ms; a grouped one would need a second copy, so it loops).
        k, N = len(block), block[0].shape[0]
        n_chunk = int(max(1, min(N, budget // max(self.sample_bytes(k), 1))))
        total = None
        for n0 in range(0, N, n_chunk):
            n1 = min(n0 + n_chunk, N)
            ready = self.prepare(n0, n1)
            if n1 - n0 == N:  # kept for the check of the same call (see agreement): no second gathering
                memo[("ready", id(self))] = ready
            parts = block[:, n0:n1] if isinstance(block, torch.Tensor) else [b[n0:n1] for b in block]
            d = torch.stack(list(parts), dim=1)  # (n, k, C_out, *positions)
            g = torch.bmm(d.reshape(n1 - n0, k * d.shape[2], -1), ready.transpose(1, 2))
            s = g.square_().sum(0)  # (k · C_out, C_in · kernel size)
            total = s if total is None else total + s
        total = total.reshape((k,) + tuple(self.alias.shape))  # type: ignore[union-attr]
        return total if per_cotangent else total.sum(0)


@dataclass(eq=False)
class _Embedding(_Use):
    """The table ``E`` (``(V, D)``) of ``y = E[tokens]``: a sample's product adds its ``δ_t`` into the rows it read.

    Rows read by several positions of one sample add up before squaring;
    the padding row (``padding_idx``) gets no gradient, as in PyTorch.
    """

    tokens: torch.Tensor = None  # type: ignore[assignment]
    padding: int | None = None

    def _sample_major(self, t: torch.Tensor, layout: Layout, n0: int, n1: int) -> torch.Tensor:
        """``(A, N, B, ...)`` rows of samples ``n0:n1`` as ``(n, A · B, ...)``."""
        return t[:, n0:n1].movedim(1, 0).reshape((n1 - n0, -1) + tuple(t.shape[3:]))

    def _keys(self, layout: Layout, n0: int, n1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``sample · V + token`` for every position of samples ``n0:n1``, and which positions count."""
        A, B = layout
        tok = self._sample_major(self.tokens.reshape(A, -1, B), layout, n0, n1)  # (n, A · B)
        V = self.alias.shape[0]
        keys = torch.arange(n1 - n0, device=tok.device)[:, None] * V + tok
        valid = torch.ones_like(tok, dtype=torch.bool) if self.padding is None else tok != self.padding
        return keys.reshape(-1), valid.reshape(-1)

    def _deltas(self, delta: torch.Tensor, layout: Layout, n0: int, n1: int, valid: torch.Tensor) -> torch.Tensor:
        d = self._sample_major(self.rows(delta, layout), layout, n0, n1).reshape(-1, self.alias.shape[1])
        return d * valid[:, None].to(d.dtype)

    def products(self, delta: torch.Tensor, layout: Layout, n0: int, n1: int, ready: Any) -> torch.Tensor:
        V, D = self.alias.shape
        keys, valid = self._keys(layout, n0, n1)
        out = torch.zeros(((n1 - n0) * V, D), dtype=delta.dtype, device=delta.device)
        return out.index_add_(0, keys, self._deltas(delta, layout, n0, n1, valid)).reshape(n1 - n0, V, D)

    def square_sums(self, block: Block, layout: Layout, per_cotangent: bool, budget: int, memo: dict) -> torch.Tensor:
        # Per (sample, row read) pair only: Σ_t δ_nt over the positions of a sample reading a row, squared, and
        # added into that row: no (N, V, D) per-sample table.
        V, D = self.alias.shape
        N = self.rows(block[0], layout).shape[1]
        keys, valid = self._keys(layout, 0, N)
        pairs, inverse = torch.unique(keys, return_inverse=True)
        sums = []
        for delta in block:
            per_pair = torch.zeros((pairs.shape[0], D), dtype=delta.dtype, device=delta.device)
            per_pair.index_add_(0, inverse, self._deltas(delta, layout, 0, N, valid))
            table = torch.zeros((V, D), dtype=delta.dtype, device=delta.device)
            sums.append(table.index_add_(0, pairs % V, per_pair * per_pair))
        if per_cotangent:
            return torch.stack(sums)
        total = sums[0]
        for t in sums[1:]:
            total += t
        return total

    def agreement(self, delta: torch.Tensor, layout: Layout, grad: torch.Tensor, budget: int, memo: dict) -> Pair:
        # Along a fixed direction of the features: each position adds one number into the row it read.
        V, D = self.alias.shape
        r = _direction(D, delta)
        valid = (
            torch.ones(self.tokens.numel(), dtype=torch.bool, device=delta.device)
            if self.padding is None
            else self.tokens.reshape(-1) != self.padding
        )
        projected = (delta.reshape(-1, D) @ r) * valid.to(delta.dtype)
        expected = torch.zeros(V, dtype=delta.dtype, device=delta.device)
        return grad @ r, expected.index_add_(0, self.tokens.reshape(-1), projected)


def _conv_pads(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
    """``(before, after)`` zero padding per spatial axis, as the convolution applies it."""
    spatial = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * spatial
        if padding == "same":  # ATen pads total // 2 before and the rest after
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in totals)
        return None
    p = _ints(padding, spatial)
    return None if p is None else tuple((q, q) for q in p)


def _ints(value: Any, n: int) -> tuple[int, ...] | None:
    """An int or a sequence of ``n`` ints as a tuple of ``n`` ints (``None`` for anything else)."""
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], int):
        return (value[0],) * n
    return None


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
        opened = _opened(func) if func in _COMPOSITES else None
        if opened is not None:
            with self:  # the mode is off while its handler runs: on again for the composite's inside
                return opened(*args, **kwargs)
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
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or not out.requires_grad:
            return []
        if func in _LINEAR:
            bound = _bind(("input", "weight", "bias"), args, kwargs)
            a, W, b = bound.get("input"), bound.get("weight"), bound.get("bias")
            if not self._data(a):
                return []
            lead = out.dim() - 1
            uses: list[_Use] = []
            if self.is_alias(W) and W.dim() == 2 and _one_to_one(W):
                uses.append(_Matmul(W, out, lead, a=a.detach()))
            if self.is_alias(b) and b.dim() == 1 and _one_to_one(b):
                uses.append(_Shift(b, out, lead))
            return uses
        if func in _CONV:
            return self._conv(args, kwargs, out)
        if func in _BATCH_NORM:
            return self._batch_norm(args, kwargs, out)
        if func in _LAYER_NORM:
            return self._layer_norm(args, kwargs, out)
        if func in _EMBEDDING:
            return self._embedding(args, kwargs, out)
        if kwargs or len(args) != 2:
            return []
        if func in _MATMUL:
            a, B = args
            if self._data(a) and self.is_alias(B) and B.dim() == 2 and a.dim() >= 1 and _one_to_one(B):
                return [_Matmul(B, out, out.dim() - 1, a=a.detach(), right=True)]
        if func in _ADD:
            h, b = args if self.is_alias(args[1]) else args[::-1]
            if (
                self._data(h)
                and self.is_alias(b)
                and 1 <= b.dim() <= h.dim()
                and tuple(out.shape) == tuple(h.shape)
                and tuple(h.shape[h.dim() - b.dim() :]) == tuple(b.shape)
                and _one_to_one(b)
            ):
                return [_Shift(b, out, out.dim() - b.dim())]
        return []

    def _conv(self, args: tuple, kwargs: dict, out: torch.Tensor) -> list[_Use]:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = _bind(names, args, kwargs)
        x, W, b = bound.get("input"), bound.get("weight"), bound.get("bias")
        if not (self._data(x) and isinstance(W, torch.Tensor) and x.dim() == W.dim() == out.dim() >= 3):
            return []  # an unbatched input has no sample axis
        spatial = W.dim() - 2
        stride = _ints(bound.get("stride", 1), spatial)
        dilation = _ints(bound.get("dilation", 1), spatial)
        groups = bound.get("groups", 1)
        pads = None if dilation is None else _conv_pads(bound.get("padding", 0), tuple(W.shape[2:]), dilation)
        if stride is None or pads is None or not isinstance(groups, int):
            return []
        uses: list[_Use] = []
        if self.is_alias(W) and W.is_contiguous():
            uses.append(_Conv(W, out, 1, x=x.detach(), stride=stride, pads=pads, dilation=dilation, groups=groups))
        if self.is_alias(b) and b.dim() == 1 and _one_to_one(b):
            uses.append(_Channel(b, out, 1))
        return uses

    def _batch_norm(self, args: tuple, kwargs: dict, out: torch.Tensor) -> list[_Use]:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        bound = _bind(names, args, kwargs)
        x, mean, var = bound.get("input"), bound.get("running_mean"), bound.get("running_var")
        # With batch statistics the samples interact (the core never gets here then); only running ones.
        if bound.get("training", False) is not False or not self._data(x) or x.dim() < 2:
            return []
        if not (self._data(mean) and self._data(var)):
            return []
        eps = float(bound.get("eps", 1e-5))
        x, mean, var = x.detach(), mean.detach(), var.detach()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xhat = _Lazy(lambda: (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps))
        uses: list[_Use] = []
        W, b = bound.get("weight"), bound.get("bias")
        if self.is_alias(W) and W.dim() == 1 and _one_to_one(W):
            uses.append(_Channel(W, out, 1, xhat=xhat))
        if self.is_alias(b) and b.dim() == 1 and _one_to_one(b):
            uses.append(_Channel(b, out, 1))
        return uses

    def _layer_norm(self, args: tuple, kwargs: dict, out: torch.Tensor) -> list[_Use]:
        bound = _bind(("input", "normalized_shape", "weight", "bias", "eps"), args, kwargs)
        x, shape = bound.get("input"), bound.get("normalized_shape")
        if not self._data(x) or not isinstance(shape, (int, tuple, list, torch.Size)):
            return []
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        eps = float(bound.get("eps", 1e-5))
        x = x.detach()
        xhat = _Lazy(lambda: F.layer_norm(x, shape, None, None, eps))
        lead = out.dim() - len(shape)
        uses: list[_Use] = []
        for key, scale in (("weight", xhat), ("bias", None)):
            t = bound.get(key)
            if self.is_alias(t) and tuple(t.shape) == shape and t.is_contiguous():
                uses.append(_Shift(t, out, lead, xhat=scale))
        return uses

    def _embedding(self, args: tuple, kwargs: dict, out: torch.Tensor) -> list[_Use]:
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = _bind(names, args, kwargs)
        tokens, W, padding = bound.get("input"), bound.get("weight"), bound.get("padding_idx")
        # max_norm rewrites rows of the table and scale_grad_by_freq rescales its gradient: not a plain lookup.
        if bound.get("max_norm") is not None or bound.get("scale_grad_by_freq", False):
            return []
        if not (isinstance(tokens, torch.Tensor) and not tokens.is_floating_point() and tokens.dim() >= 1):
            return []
        if not (self.is_alias(W) and W.dim() == 2 and _one_to_one(W)):
            return []
        if padding is not None and padding < 0:
            padding += W.shape[0]
        return [_Embedding(W, out, tokens.dim(), tokens=tokens.detach(), padding=padding)]

    def _data(self, a: Any) -> bool:
        """A tensor that is not itself a view of the parameters."""
        return isinstance(a, torch.Tensor) and not self.is_alias(a)


class _Lazy:
    """A tensor computed on first call and kept (normalized inputs, needed only if the use is kept)."""

    def __init__(self, make: Callable[[], torch.Tensor]) -> None:
        self._make, self._value = make, None

    def __call__(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._make()
        return self._value


def _one_to_one(t: torch.Tensor) -> bool:
    """Whether the view reads each parameter entry at most once (no broadcast strides)."""
    if t.dim() == 1:
        return t.shape[0] <= 1 or t.stride(0) != 0
    return t.is_contiguous() or t.t().is_contiguous()


def _span(t: torch.Tensor, flat: torch.Tensor) -> tuple[int, int] | None:
    """The entries ``[start, stop)`` of ``flat`` that the view ``t`` reads, if it reads exactly those, each once."""
    start = t.storage_offset() - flat.storage_offset()
    if t.numel() == 0:
        return start, start
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1)
    expected = 1
    for st, n in dims:  # the strides of a dense layout, in some order of the axes
        if st != expected:
            return None
        expected *= n
    return start, start + t.numel()


class _Reads:
    """Which entries of the flat vector the recorded route covers: read once, by a recognized op, and nothing else.

    When every recorded read is a dense range of the vector (the views of
    module parameters are) this is worked out on the ranges, on the host;
    otherwise on ``P``-sized masks (about fifteen passes over ``P`` entries,
    0.3 ms of a 1.6 ms gradient on the benchmark MLP).
    """

    def __init__(self, flat: torch.Tensor, uses: list[_Use], others: list[torch.Tensor]) -> None:
        self.flat, self.P = flat, flat.numel()
        spans = [_span(u.alias, flat) for u in uses] + [_span(t, flat) for t in others]
        self.ranges = all(s is not None for s in spans)
        if self.ranges:
            self.spans: list[tuple[int, int]] = [s for s in spans if s[1] > s[0]]  # type: ignore[misc]
            overlapping = _overlapping(spans)  # type: ignore[arg-type]
            self.clean = {id(u): not overlapping[i] for i, u in enumerate(uses)}
            self.slow: list[tuple[int, int]] = [s for u, s in zip(uses, spans) if not self.clean[id(u)]]
            self.slow += [s for s in spans[len(uses) :] if s[1] > s[0]]
            return
        fast_reads = torch.zeros(self.P, dtype=torch.int32, device=flat.device)
        other_reads = torch.zeros(self.P, dtype=torch.int32, device=flat.device)
        for use in uses:
            _like(fast_reads, use.alias, flat).add_(1)  # a recognized view reads each entry once
        for t in others:
            _like(other_reads, t, flat).fill_(1)
        self.fast = (fast_reads == 1) & (other_reads == 0)
        self.unread = (fast_reads == 0) & (other_reads == 0)
        self.slow_mask = ~self.fast & ~self.unread

    def keep(self, use: _Use) -> bool | torch.Tensor:
        """``True`` if every entry of the use is covered, else a mask shaped like its view."""
        if self.ranges:
            return self.clean[id(use)]
        return _like(self.fast, use.alias, self.flat)

    def reject(self, use: _Use) -> None:
        """Send the entries of a use to the generic route."""
        if self.ranges:
            self.slow.append(_span(use.alias, self.flat))  # type: ignore[arg-type]
        else:
            _like(self.slow_mask, use.alias, self.flat).fill_(True)

    def gaps(self) -> list[tuple[int, int]]:
        """The ranges of entries no op was seen to read (reads as ranges only)."""
        edges, stop = [], 0
        for a, b in sorted(self.spans):
            if a > stop:
                edges.append((stop, a))
            stop = max(stop, b)
        if stop < self.P:
            edges.append((stop, self.P))
        return edges

    def generic(self, grad: torch.Tensor) -> torch.Tensor:
        """Indices of the entries for the generic route: read otherwise, rejected, or unread but with a gradient."""
        if not self.ranges:
            return torch.nonzero(self.slow_mask | (self.unread & (grad != 0))).reshape(-1)
        parts = [torch.nonzero(grad[a:b]).reshape(-1) + a for a, b in self.gaps()]
        for a, b in self.slow:
            parts.append(torch.arange(a, b, device=grad.device))
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=grad.device)
        return torch.unique(torch.cat(parts))


def _overlapping(spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each range shares an entry with another one: one sweep over the ranges sorted by their start.

    A range that overlaps an earlier one overlaps the earlier one reaching
    furthest, and the first range overlapping a given one comes right after
    it or after one that overlaps it as well, so marking each range and that
    furthest-reaching one marks every overlapping range.
    """
    flags = [False] * len(spans)
    furthest, holder = -1, -1
    for i in sorted(range(len(spans)), key=lambda j: spans[j]):
        start, stop = spans[i]
        if stop == start:
            continue
        if holder >= 0 and furthest > start:
            flags[i] = flags[holder] = True
        if stop > furthest:
            furthest, holder = stop, i
    return flags


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


class _Cotangents:
    """``∂⟨z, u_k⟩/∂out`` at recorded outputs for a block of cotangents, by whichever of two passes is faster.

    A vmapped backward pass (``is_grads_batched``) or one pass per cotangent.
    Neither wins everywhere: on a 2-core CPU with 11 cotangents the loop took
    0.72 ms against 0.93 ms on the benchmark MLP and 34 ms against 41 ms on
    LeNet-5 (max-pool's backward has no batching rule: vmap runs it per
    cotangent and concatenates), the vmapped pass 206 ms against 261 ms on the
    small ResNet and 59 ms against 75 ms on the transformer.  So the first
    calls of one ``squares`` function time each in turn and later calls take
    the faster (:class:`FastestPass`); both give the same numbers up to rounding.
    """

    def __init__(self) -> None:
        # The fastest of three trials shrugs off a busy machine.
        self._passes = FastestPass(("vmap", "loop"), trials=3)

    def __call__(self, z: torch.Tensor, outs: list[torch.Tensor], rows: torch.Tensor) -> list[Block | None]:
        """The block of cotangents at each output (``None`` where ``z`` does not depend on it) for ``rows``."""
        passes = {"vmap": lambda: self._batched(z, outs, rows), "loop": lambda: self._looped(z, outs, rows)}
        return self._passes(rows.shape[0], passes, z)

    @staticmethod
    def _batched(z: torch.Tensor, outs: list[torch.Tensor], rows: torch.Tensor) -> list[Block | None]:
        return list(torch.autograd.grad(z, outs, rows, retain_graph=True, is_grads_batched=True, allow_unused=True))

    @staticmethod
    def _looped(z: torch.Tensor, outs: list[torch.Tensor], rows: torch.Tensor) -> list[Block | None]:
        # Kept as lists: stacking would copy every cotangent once more (9 ms of 80 on LeNet-5).
        grads = [torch.autograd.grad(z, outs, u, retain_graph=True, allow_unused=True) for u in rows]
        return [None if grads[0][i] is None else [g[i] for g in grads] for i in range(len(outs))]


class FastestPass:
    """Which of several passes giving the same numbers (up to rounding) is fastest, found by timing.

    The first calls with several rows run each working pass in turn, timed
    per row, ``trials`` times; later calls run the fastest.  ``"loop"`` (one
    backward pass per row) is the reference: a call with one row runs it,
    and its errors are raised, while any other pass that fails (vmap without
    a batching rule, ``torch.func`` refusing a model) drops out.
    """

    def __init__(self, names: Sequence[str], trials: int) -> None:
        self.names, self.trials = list(names), trials
        self.times: dict[str, list[float]] = {name: [] for name in self.names}
        self.broken: set[str] = set()

    def chosen(self) -> str | None:
        """The fastest pass once every working pass has been timed, else ``None``."""
        live = [k for k in self.names if k not in self.broken]
        if any(len(self.times[k]) < self.trials for k in live):
            return None
        return min(live, key=lambda k: min(self.times[k]))

    def __call__(self, rows: int, passes: dict[str, Callable[[], Any]], like: torch.Tensor) -> Any:
        if rows == 1:
            return passes["loop"]()
        best = self.chosen()
        if best is not None:
            return passes[best]()
        name = min((k for k in self.names if k not in self.broken), key=lambda k: len(self.times[k]))
        synchronize(like)
        start = time.perf_counter()
        try:
            out = passes[name]()
        except Exception:
            if name == "loop":
                raise
            self.broken.add(name)
            return self(rows, passes, like)
        synchronize(like)
        self.times[name].append((time.perf_counter() - start) / rows)
        return out


def synchronize(t: torch.Tensor) -> None:
    """Wait for the device, so that a timing covers the work and not its launch."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _agreeing(pairs: Sequence[Pair]) -> list[bool]:
    """Which pairs agree up to rounding: ``10 √ε`` of the larger magnitude (the sides come from different op orders).

    One host read for all of them: the three maxima of each pair (of
    ``|actual|``, ``|expected|`` and their gap) are joined first.
    """
    if not pairs:
        return []
    maxima = []
    for actual, expected in pairs:
        if not expected.numel():
            maxima.append(torch.zeros(3, dtype=torch.float64, device=expected.device))
            continue
        a, e = actual.reshape(-1), expected.reshape(-1)
        maxima.append(torch.stack([a, e, a - e]).abs().amax(1).double())
    found = torch.stack(maxima).tolist()
    tolerances = [10.0 * math.sqrt(torch.finfo(e.dtype).eps) for _, e in pairs]
    return [gap <= tol * max(a, e, 1e-30) for (a, e, gap), tol in zip(found, tolerances)]


def _layout_tries(out: torch.Tensor, lead: int, n: int) -> list[Layout]:
    """The readings ``(A, B)`` of ``out``'s flattened leading axes as ``(A, N, B)``, in the order they are tried.

    Sample-major first (``A = 1``), then sample-minor (``B = 1``), then
    splits at the other leading axes.
    """
    leading = tuple(out.shape[:lead])
    M = math.prod(leading)
    if n == 0 or M % n:
        return []
    candidates = [M // n, 1] + [math.prod(leading[i:]) for i in range(1, lead)]
    return [(M // (n * B), B) for B in dict.fromkeys(candidates) if (M // B) % n == 0]


def _layout_pair(layout: Layout, summed: torch.Tensor, weighted: torch.Tensor, c: torch.Tensor) -> Pair:
    """``weighted`` and ``summed`` scaled by ``c`` along the samples of ``layout``: equal if it is the right one."""
    A, B = layout
    n = c.shape[0]
    return weighted.reshape(A, n, B), summed.reshape(A, n, B) * c.reshape(1, n, 1)


def _projected(delta: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """A cotangent at an output, ``(*leading, *features)``, projected along ``r`` over its features."""
    return delta.reshape(-1, r.shape[0]) @ r


def _layouts(uses: list[_Use], blocks: dict[int, Block], weighted: dict[int, Any], c: torch.Tensor) -> dict:
    """Where the samples are among the leading axes of each recorded output, keyed ``(id(out), lead)``.

    ``blocks`` and ``weighted`` hold the cotangents at each output (by
    ``id``) of the block of cotangents of ``z`` (the samples on axis 0) and
    of their sum with sample ``n`` scaled by ``c[n]``, each projected along
    a fixed direction of the features (one number per leading position).
    A reading ``(A, N, B)`` of the flattened leading axes is right if the
    weighted cotangent is the summed one scaled by ``c`` along its middle
    axis: then every position of that index belongs to that sample alone.
    The first reading of every output is judged at once (one host read);
    an output whose first fails tries the others in turn.  ``None`` where
    no reading holds, or for outputs that ``z`` does not depend on.
    """
    projected: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, list[Layout]]] = {}
    for use in uses:
        key, block, w = (id(use.out), use.lead), blocks.get(id(use.out)), weighted.get(id(use.out))
        if key in projected or block is None or w is None:
            continue
        r = _direction(math.prod(use.out.shape[use.lead :]), w)
        # Projected first, then summed: products with a vector, no full-size sum.
        if isinstance(block, torch.Tensor):  # a vmapped pass: one product for the whole block
            summed = (block.reshape(block.shape[0], -1, r.shape[0]) @ r).sum(0)
        else:
            summed = _projected(block[0], r)
            for d in block[1:]:
                summed += _projected(d, r)
        projected[key] = (summed, _projected(w, r), _layout_tries(use.out, use.lead, c.shape[0]))
    found: dict[tuple[int, int], Layout | None] = {key: None for key in projected}
    tried = [key for key, (_, _, tries) in projected.items() if tries]
    firsts = [projected[key][2][0] for key in tried]
    verdicts = _agreeing([_layout_pair(first, *projected[key][:2], c) for key, first in zip(tried, firsts)])
    for key, first, holds in zip(tried, firsts, verdicts):
        summed, w, tries = projected[key]
        if holds:
            found[key] = first
        else:
            found[key] = next((t for t in tries[1:] if _agreeing([_layout_pair(t, summed, w, c)])[0]), None)
    return found


def per_sample_squares(
    f: Callable[[torch.Tensor, Any], torch.Tensor], per_cotangent: bool, generic: Callable
) -> Squares:
    """``squares(w, x, cotangents, memory_budget)`` of :meth:`Backend.per_sample_squares`, by the recorded route.

    ``generic(f, per_cotangent)`` gives the generic route's function, used for
    the entries the recorded route does not cover.
    """
    whole = generic(f, per_cotangent)
    grads = _Cotangents()
    verdicts: dict[tuple, _Verdict] = {}

    def squares(
        w: torch.Tensor, x: Any, cotangents: Callable[[torch.Tensor], torch.Tensor], memory_budget: int
    ) -> torch.Tensor:
        flat = w.detach().requires_grad_(True)
        recorder = _Recorder(flat)
        with torch.enable_grad(), recorder:
            z = f(flat, x)
        if not recorder.uses or not z.requires_grad or z.dim() < 1:
            return whole(w, x, cotangents, memory_budget)
        U = cotangents(z.detach())
        K, N, P = U.shape[0], z.shape[0], flat.numel()
        reads = _Reads(flat, recorder.uses, recorder.others)

        outs = list({id(u.out): u.out for u in recorder.uses}.values())
        position = {id(o): i for i, o in enumerate(outs)}
        per_cot = sum(o.numel() for o in outs) * outs[0].element_size()  # δ of one cotangent
        k_chunk = int(max(1, min(K, memory_budget // max(per_cot, 1))))
        structure = _structure(recorder, reads, flat, z, x)
        known = verdicts.get(structure) if structure is not None else None
        if known is not None:
            return _squares_as_before(known, recorder.uses, z, outs, position, k_chunk, x, U, reads, memory_budget)

        # One factor per sample, the same on every call (in [1, 2): never zero).  With
        # u_c = (Σ_k u_k) c, one backward pass gives autograd's gradient on every entry
        # (for the guard) and δ_c at every recorded output (for the layouts and the guard).
        gen = torch.Generator().manual_seed(0)
        c = (1.0 + torch.rand(N, generator=gen, dtype=torch.float64)).to(dtype=U.dtype, device=U.device)
        u_c = U.sum(0) * c.reshape((N,) + (1,) * (U.dim() - 2))

        result = torch.zeros((K, P) if per_cotangent else (P,), dtype=flat.dtype, device=flat.device)
        # The usual case: δ of every cotangent at once, and the layouts from their sum.  With chunks
        # of cotangents, the layouts come first, from one more pass of the summed cotangent.
        first = grads(z, outs, U) if k_chunk >= K else None
        grad, *at_outs = torch.autograd.grad(z, [flat, *outs], u_c, retain_graph=True, allow_unused=True)
        grad = torch.zeros_like(flat) if grad is None else grad.detach()
        weighted = {id(o): d for o, d in zip(outs, at_outs)}
        summed = grads(z, outs, U.sum(0)[None]) if first is None else first
        layouts = _layouts(recorder.uses, {id(o): d for o, d in zip(outs, summed)}, weighted, c)
        del summed, at_outs
        layout_of = [layouts.get((id(u.out), u.lead)) for u in recorder.uses]
        for k0 in range(0, K, k_chunk):
            k1 = min(k0 + k_chunk, K)
            deltas = first if first is not None else grads(z, outs, U[k0:k1])
            first = None
            memo = add_squares(result, recorder.uses, deltas, position, layout_of, reads, k0, k1, memory_budget)
            kept = {k: v for k, v in memo.items() if k[0] == "ready"}  # windows the checks may reuse
            del deltas, memo

        # Guard: autograd's gradient must match the recorded ops on every fast entry,
        # and vanish on every entry no op was seen to read.  All judged with one host read.
        pairs: list[Pair] = []
        for use in recorder.uses:
            d, g = weighted[id(use.out)], _like(grad, use.alias, flat)
            layout = layouts.get((id(use.out), use.lead))
            if d is None:  # an op whose output does not reach z implies a zero gradient on its entries
                pairs.append((g, torch.zeros_like(g)))
            elif layout is None:  # no axis of the output holds the samples: rejected whatever the numbers
                pairs.append((g.new_ones(1), g.new_zeros(1)))
            else:
                pairs.append(use.agreement(d, layout, g, memory_budget, kept))
        rejected = []
        for i, (use, agrees) in enumerate(zip(recorder.uses, _agreeing(pairs))):
            if not agrees:
                rejected.append(i)
                reads.reject(use)
                _like(result, use.alias, flat).fill_(0)

        rest = reads.generic(grad)
        if structure is not None and len(verdicts) < _KEPT_VERDICTS:
            verdicts[structure] = _Verdict(layout_of, frozenset(rejected), rest)
        del z, recorder, weighted
        return _add_the_rest(result, rest, w, x, U, memory_budget)

    def _add_the_rest(
        result: torch.Tensor, rest: torch.Tensor, w: torch.Tensor, x: Any, U: torch.Tensor, memory_budget: int
    ) -> torch.Tensor:
        """``result`` plus the generic route's squares on the entries ``rest``."""
        if rest.numel():
            base = w.detach()
            sub = lambda v, x: f(base.index_put((rest,), v), x)  # noqa: E731
            part = generic(sub, per_cotangent)(base[rest], x, lambda _: U, memory_budget)
            if per_cotangent:
                result[:, rest] += part
            else:
                result[rest] += part
        return result

    def _squares_as_before(
        known: _Verdict,
        uses: list[_Use],
        z: torch.Tensor,
        outs: list[torch.Tensor],
        position: dict[int, int],
        k_chunk: int,
        x: Any,
        U: torch.Tensor,
        reads: _Reads,
        memory_budget: int,
    ) -> torch.Tensor:
        """The squares of a structure met before: its layouts and the guards' verdicts are reused."""
        flat, (K, P) = reads.flat, (U.shape[0], reads.P)
        result = torch.zeros((K, P) if per_cotangent else (P,), dtype=flat.dtype, device=flat.device)
        layout_of = [None if i in known.rejected else layout for i, layout in enumerate(known.layouts)]
        for k0 in range(0, K, k_chunk):
            k1 = min(k0 + k_chunk, K)
            add_squares(result, uses, grads(z, outs, U[k0:k1]), position, layout_of, reads, k0, k1, memory_budget)
        return _add_the_rest(result, known.rest, flat, x, U, memory_budget)

    def add_squares(
        result: torch.Tensor,
        uses: list[_Use],
        deltas: list[Block | None],
        position: dict[int, int],
        layout_of: list[Layout | None],
        reads: _Reads,
        k0: int,
        k1: int,
        memory_budget: int,
    ) -> dict:
        """Each use's squares from the cotangents ``k0:k1`` (``deltas``, at each output) into ``result``; the memo.

        Uses without a layout (``None``) are left out.
        """
        memo: dict = {}
        for use, layout in zip(uses, layout_of):
            block = deltas[position[id(use.out)]]
            if block is None or layout is None:
                continue
            part = use.square_sums(block, layout, per_cotangent, memory_budget, memo)
            keep = reads.keep(use)
            target = _like(result[k0:k1] if per_cotangent else result, use.alias, reads.flat)
            if keep is True and (per_cotangent or k0 == 0):  # the usual case: nothing else there yet
                target.copy_(part)
            elif keep is True:
                target.add_(part)
            elif keep is not False:
                target.add_(part * keep)
        return memo

    return squares


_KEPT_VERDICTS = 8
"""Structures (recorded reads and shapes) whose layouts and guard verdicts one squares function keeps."""


@dataclass(frozen=True)
class _Verdict:
    """What the guards found for one structure: each use's layout, the uses rejected, the generic entries."""

    layouts: list[Layout | None]
    rejected: frozenset[int]
    rest: torch.Tensor


def _structure(recorder: _Recorder, reads: _Reads, flat: torch.Tensor, z: torch.Tensor, x: Any) -> tuple | None:
    """What the guards' verdicts depend on: every recorded read (op kind, entries, output shape), and the shapes.

    ``None`` where nothing may be kept: reads that are not ranges of the flat
    vector, or entries no op was seen to read.  Those are judged by their
    gradient on each batch (an op the recording cannot see may read them,
    and a batch where every such product vanishes says nothing of the next).
    """
    if not reads.ranges or reads.gaps():
        return None
    uses = tuple((type(u).__name__, _span(u.alias, flat), tuple(u.out.shape), u.lead) for u in recorder.uses)
    others = tuple(_span(t, flat) for t in recorder.others)
    inputs = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in tree_leaves(x))
    return (uses, others, tuple(z.shape), inputs, str(flat.dtype), str(flat.device))
