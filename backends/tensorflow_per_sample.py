"""Sums of squared per-sample products in TensorFlow without the generic per-sample route.

The exact GGN diagonal is ``Σ_n Σ_k (J_nᵀ u_nk)²``.  The generic route forms
every per-sample product by a per-sample backward pass of the whole network
(``K·N·P`` numbers).  A parameter that enters the model once, through an op
whose derivative in that parameter contracts the cotangent at the op's output
with something the forward pass already has, has per-sample products made
from that cotangent ``δ = ∂⟨z, u⟩/∂out`` alone:

- ``out = a @ W`` (``MatMul``, Keras ``Dense``; rows of ``a`` grouped by
  sample, several rows per sample for inputs with extra axes): ``Σ_t a_ntᵀ δ_nt``,
  and for one row per sample ``Σ_n (a_nᵀ δ_n)² = (a²)ᵀ (δ²)``, one matmul;
- ``out = conv(x, K)`` (``Conv2D`` in NHWC, which Keras ``Conv1D`` and
  ``Conv2D`` lower to): ``δ_n`` contracted with the input patches of sample
  ``n`` (``tf.image.extract_patches``), as BackPACK does;
- ``out = h + b``, ``out = h * g`` (``AddV2``, ``BiasAdd``, ``Mul``) with the
  parameter broadcast over the samples (biases, layer norm's scale and
  shift): ``δ_n`` (times ``h_n``) summed over the broadcast axes;
- ``out = x @ W`` with ``W`` broadcast over the leading axes of ``x``
  (``BatchMatMulV2``, which Keras ``EinsumDense`` and attention's
  projections lower to): as ``MatMul``, one row per position;
- ``out = gather(table, indices)`` (``GatherV2`` on axis 0, Keras
  ``Embedding``): ``δ_n`` at each position added to the row it picked,
  squared per distinct (sample, row) pair.

Which entries of the flat parameter vector each op reads is found in the
graph that ``f`` traces into, not from a list of layers: the flat vector's
views (``SplitV``, ``Reshape``, ``ExpandDims``, ``Squeeze``, ``Identity``)
are followed to the ops that read them.  An entry read exactly once, by a
recognized op, takes this route.  So do entries that reach the samples only
through ops on parameters alone (inference batch norm folds ``γ`` and
``β`` with its moving statistics first): the products of the recognized
ops that read the results are pulled back through those ops' Jacobian
(:class:`_Derived`).  Every other entry that is read (tied weights, ops
inside nested functions or control flow) goes through the generic
per-sample route restricted to those entries.  A subclassed layer is seen through the ops its
``call`` actually runs.

The cotangents ``δ`` at every recognized output come from one backward pass
per cotangent ``u_k`` (``tf.map_fn`` over the ``K`` cotangents, on a
persistent tape of one forward pass).

Two guards keep the result exact, run the first time an input signature is
met (and their verdict kept): for every recognized read,

- the first moment weighted by a random factor ``c_n`` per sample,
  ``Σ_n c_n Σ_k product_nk``, must equal the ordinary gradient of
  ``⟨z, c ⊙ Σ_k u_k⟩`` on its entries: this pins the op's formula and which
  rows of its output belong to which sample;
- the products of two samples, for a random combination of the ``K``
  cotangents (products are linear in the cotangent), must equal the VJPs of
  those samples evaluated alone: this pins that the op's input rows of a
  sample depend on that sample only.

"Equal" means within ``10 √ε`` of the larger side or of the same sums taken
over the terms' absolute values, whichever is larger: products that cancel
(an attention's key bias) are rounding on both sides.  Reads that fail
either go the generic route.  Where entries take both routes,
the first calls time the mixed route against the generic route for every
entry and later calls take the faster (both are exact).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

Squares = Callable[[tf.Tensor, Any, Callable[[tf.Tensor], tf.Tensor], int], tf.Tensor]
Generic = Callable[[Callable[[tf.Tensor, Any], tf.Tensor], bool], Squares]

_ZERO = tf.UnconnectedGradients.ZERO
_VIEWS = frozenset({"Identity", "Reshape", "ExpandDims", "Squeeze"})
"""Ops whose output holds the entries of their first input in the same (row-major) order."""
_METADATA = frozenset({"Shape", "ShapeN", "Rank", "Size"})
"""Ops that read a tensor's shape, not its entries."""
_IDENTITY_CONV_DEPTH = 64
"""Window entries (kh · kw · C_in) up to which a convolution's windows are gathered by an identity convolution."""
_UNROLLED_CHUNKS = 4
"""Chunks of samples up to which a chunked sum is unrolled at trace time."""
_TRIALS = 2
"""Timed calls of each route before choosing between the mixed and the generic route (the fastest counts)."""
_CHECK_SAMPLES = 2
"""Samples whose structured products are compared with their own per-sample VJPs (the first and the last)."""
_DERIVED_JACOBIAN_ENTRIES = 2**20
"""Entries up to which the Jacobians of tensors derived from parameters alone are formed (see :class:`_Derived`)."""


def _sample_slice(x: Any, start: int, stop: int) -> Any:
    return tuple(a[start:stop] for a in x) if isinstance(x, tuple) else x[start:stop]


def _signature(w: tf.Tensor, x: Any) -> tuple:
    """What a compiled function is traced for: the shapes and dtypes of ``w`` and ``x``."""
    return tuple((tuple(a.shape), a.dtype.name) for a in tf.nest.flatten((w, x)))


def _chunked_sum(chunk: Callable[[Any, int], tf.Tensor], N: int, size: int) -> tf.Tensor:
    """``Σ`` of ``chunk(n0, count)`` over chunks of ``size`` samples (a last, smaller one for the remainder).

    A few chunks are unrolled at trace time; more go through a ``tf.while_loop``
    (a small memory budget on a large batch would otherwise trace one copy
    of the products per chunk).
    """
    full, rest = divmod(N, size)
    if full + (rest > 0) <= _UNROLLED_CHUNKS:
        parts = [chunk(n0, min(size, N - n0)) for n0 in range(0, N, size)]
        return parts[0] if len(parts) == 1 else tf.add_n(parts)
    first = chunk(0, size)
    _, total = tf.while_loop(
        lambda i, acc: i < full, lambda i, acc: (i + 1, acc + chunk(i * size, size)), (tf.constant(1), first)
    )
    return total + chunk(full * size, rest) if rest else total


# ----------------------------------------------------------------------
# Recognized reads: per-sample products from the cotangent at the output
# ----------------------------------------------------------------------
@dataclass(eq=False)
class _Use:
    """One recognized read of the entries ``start:stop`` of the flat vector, by an op with output ``out``.

    Axis 0 of ``out`` holds the samples (``N`` of them), possibly with
    several consecutive rows per sample (``rows``).  Cotangents ``deltas``
    at ``out`` come as ``(k, *out.shape)``.
    """

    start: int
    stop: int
    out: tf.Tensor
    num_samples: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.start, self.stop)

    def outputs(self) -> list[tf.Tensor]:
        """The op outputs whose cotangents the products are made from."""
        return [self.out]

    def pick(self, deltas: dict[int, Any]) -> Any:
        """This read's cotangents from those of every output (keyed by ``id``), as :meth:`products` takes them."""
        return deltas[id(self.out)]

    @property
    def size(self) -> int:
        return self.stop - self.start

    def products(self, deltas: tf.Tensor, n0: Any, count: int) -> tf.Tensor:
        """Per-sample products ``(k, count, size)`` of the ``count`` samples from ``n0`` (an int or a scalar tensor)."""
        raise NotImplementedError

    def total(self, delta: tf.Tensor) -> tf.Tensor:
        """``Σ_n`` of the products of one cotangent ``delta`` (shaped like ``out``): ``(size,)``."""
        return tf.reduce_sum(self.products(delta[None], 0, self.num_samples)[0], axis=0)

    def magnitude(self, delta: tf.Tensor) -> tf.Tensor:
        """:meth:`total` with every term taken by its absolute value: the scale the sums' rounding is relative to.

        Products that cancel to nothing (a key bias under softmax, which
        shifts every score of a query alike) come out as rounding on both
        sides of the guards; against this scale such rounding agrees.
        """
        return self.total(tf.abs(delta))

    def sample_bytes(self, k: int) -> int:
        """Bytes per sample that :meth:`products` holds for ``k`` cotangents (products and squares)."""
        return 2 * k * self.size * self.out.dtype.size

    def square_sums(self, deltas: tf.Tensor, per_cotangent: bool, budget: int) -> tf.Tensor:
        """``Σ_n`` of the squared products: ``(k, size)`` if ``per_cotangent``, else ``(size,)``."""
        k, N = int((deltas[0] if isinstance(deltas, list) else deltas).shape[0]), self.num_samples
        n_chunk = int(max(1, min(N, budget // max(self.sample_bytes(k), 1))))

        def chunk(n0: Any, count: int) -> tf.Tensor:
            g = self.products(deltas, n0, count)
            return tf.reduce_sum(g * g, axis=1)

        total = _chunked_sum(chunk, N, n_chunk)
        return total if per_cotangent else tf.reduce_sum(total, axis=0)


@dataclass(eq=False)
class _MatMul(_Use):
    """``out = a @ B`` (``transpose_b``: ``a @ Bᵀ``) with ``a`` of ``rows`` consecutive rows per sample."""

    a: tf.Tensor = None  # type: ignore[assignment]
    transpose_b: bool = False
    rows: int = 1

    def products(self, deltas: tf.Tensor, n0: Any, count: int) -> tf.Tensor:
        k, out_dim, in_dim = int(deltas.shape[0]), int(self.out.shape[-1]), int(self.a.shape[-1])
        a = tf.reshape(self.a, (self.num_samples, self.rows, in_dim))[n0 : n0 + count]
        d = tf.reshape(deltas, (k, self.num_samples, self.rows, out_dim))[:, n0 : n0 + count]
        g = tf.einsum(
            "knbo,nbi->knoi" if self.transpose_b else "nbi,knbo->knio",
            d if self.transpose_b else a,
            a if self.transpose_b else d,
        )
        return tf.reshape(g, (k, count, self.size))

    def total(self, delta: tf.Tensor) -> tf.Tensor:
        return self._total(self.a, delta)

    def magnitude(self, delta: tf.Tensor) -> tf.Tensor:
        return self._total(tf.abs(self.a), tf.abs(delta))

    def _total(self, a: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
        a = tf.reshape(a, (-1, int(a.shape[-1])))  # a batched matmul's leading axes, as rows
        delta = tf.reshape(delta, (-1, int(self.out.shape[-1])))
        g = tf.matmul(delta, a, transpose_a=True) if self.transpose_b else tf.matmul(a, delta, transpose_a=True)
        return tf.reshape(g, (self.size,))

    def square_sums(self, deltas: tf.Tensor, per_cotangent: bool, budget: int) -> tf.Tensor:
        if self.rows != 1:
            return super().square_sums(deltas, per_cotangent, budget)
        # One row per sample: Σ_n (a_nᵀ δ_n)² = (a²)ᵀ (δ²), no per-sample product formed.
        a = tf.reshape(self.a, (self.num_samples, int(self.a.shape[-1])))
        deltas = tf.reshape(deltas, (int(deltas.shape[0]), self.num_samples, int(self.out.shape[-1])))
        a2, d2 = a * a, deltas * deltas  # (N, in), (k, N, out)
        if per_cotangent:
            g = tf.einsum(
                "kno,ni->koi" if self.transpose_b else "ni,kno->kio", *((d2, a2) if self.transpose_b else (a2, d2))
            )
            return tf.reshape(g, (-1, self.size))
        d2 = tf.reduce_sum(d2, axis=0)
        g = tf.matmul(d2, a2, transpose_a=True) if self.transpose_b else tf.matmul(a2, d2, transpose_a=True)
        return tf.reshape(g, (self.size,))


@dataclass(eq=False)
class _Broadcast(_Use):
    """``out = h + b`` or ``out = h * b`` (``factor`` is ``h``) with ``b`` broadcast over the samples.

    ``axes`` are the axes of ``out`` (never 0) over which ``b`` is broadcast;
    a sample's product is ``δ_n`` (times ``h_n``) summed over them.
    """

    axes: tuple[int, ...] = ()
    factor: tf.Tensor | None = None

    def magnitude(self, delta: tf.Tensor) -> tf.Tensor:
        d = tf.abs(delta)
        if self.factor is not None:
            d = d * tf.abs(tf.broadcast_to(self.factor, self.out.shape))
        return tf.reshape(tf.reduce_sum(d, axis=[0, *self.axes]), (self.size,))

    def products(self, deltas: tf.Tensor, n0: Any, count: int) -> tf.Tensor:
        d = deltas[:, n0 : n0 + count]
        if self.factor is not None:
            d = d * tf.broadcast_to(self.factor, self.out.shape)[n0 : n0 + count]
        if self.axes:
            d = tf.reduce_sum(d, axis=[a + 1 for a in self.axes])
        return tf.reshape(d, (int(deltas.shape[0]), count, self.size))


@dataclass(eq=False)
class _Gather(_Use):
    """``out = gather(table, indices)`` along axis 0 (``GatherV2``, Keras ``Embedding``): rows picked per position.

    ``indices`` has the samples on axis 0 and ``positions`` entries per
    sample; a sample's product adds ``δ`` at each position to the row of the
    table it picked.  Positions of one sample that pick the same row add up
    before squaring, so the squares go through the distinct (sample, row)
    pairs: at most ``N · positions`` of them, however large the table.
    """

    indices: tf.Tensor = None  # type: ignore[assignment]
    table_rows: int = 0

    @property
    def row_size(self) -> int:
        return self.size // self.table_rows

    def _flat(self, deltas: tf.Tensor, n0: Any, count: int) -> tuple[tf.Tensor, tf.Tensor]:
        """Cotangents ``(count · positions, k · row)`` and the row each position picked, for ``count`` samples."""
        k = int(deltas.shape[0])
        d = tf.reshape(deltas[:, n0 : n0 + count], (k, -1, self.row_size))
        picked = tf.reshape(tf.cast(self.indices[n0 : n0 + count], tf.int64), (-1,))
        return tf.reshape(tf.transpose(d, (1, 0, 2)), (-1, k * self.row_size)), picked

    def products(self, deltas: tf.Tensor, n0: Any, count: int) -> tf.Tensor:
        k, V = int(deltas.shape[0]), self.table_rows
        d, picked = self._flat(deltas, n0, count)
        sample = tf.repeat(tf.range(count, dtype=tf.int64), int(picked.shape[0]) // count)
        g = tf.math.unsorted_segment_sum(d, sample * V + picked, count * V)  # (count · V, k · row)
        g = tf.transpose(tf.reshape(g, (count, V, k, self.row_size)), (2, 0, 1, 3))
        return tf.reshape(g, (k, count, self.size))

    def total(self, delta: tf.Tensor) -> tf.Tensor:
        d, picked = self._flat(delta[None], 0, self.num_samples)
        return tf.reshape(tf.math.unsorted_segment_sum(d, picked, self.table_rows), (self.size,))

    def square_sums(self, deltas: tf.Tensor, per_cotangent: bool, budget: int) -> tf.Tensor:
        k, N, V, row = int(deltas.shape[0]), self.num_samples, self.table_rows, self.row_size
        d, picked = self._flat(deltas, 0, N)
        M = int(picked.shape[0])
        pair = tf.repeat(tf.range(N, dtype=tf.int64), M // N) * V + picked  # (sample, row) as one key
        # Each distinct pair gets a slot (its rank among the distinct keys), with static shapes throughout:
        # at most M slots, the unused ones staying zero.
        order = tf.argsort(pair)
        ordered = tf.gather(pair, order)
        first = tf.concat([tf.ones((1,), tf.bool), ordered[1:] != ordered[:-1]], 0)
        rank = tf.cumsum(tf.cast(first, tf.int64)) - 1
        slot = tf.scatter_nd(order[:, None], rank, (M,))
        summed = tf.math.unsorted_segment_sum(d, slot, M)  # one sample's product on one table row, per slot
        slot_row = tf.maximum(tf.math.unsorted_segment_max(picked, slot, M), 0)  # unused slots: a zero row
        squares = tf.reshape(summed * summed, (M, k, row))
        if per_cotangent:
            table = tf.math.unsorted_segment_sum(squares, slot_row, V)  # (V, k, row)
            return tf.reshape(tf.transpose(table, (1, 0, 2)), (k, self.size))
        table = tf.math.unsorted_segment_sum(tf.reduce_sum(squares, axis=1), slot_row, V)
        return tf.reshape(table, (self.size,))


@dataclass(eq=False)
class _Conv2D(_Use):
    """The kernel ``(kh, kw, C_in, C_out)`` of ``out = conv2d(x, kernel)`` in NHWC."""

    x: tf.Tensor = None  # type: ignore[assignment]
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    padding: str = "VALID"

    def patches(self, n0: Any, count: int) -> tf.Tensor:
        """The windows of ``count`` samples from ``n0``: ``(count, positions, kh · kw · C_in)``, in kernel order.

        ``tf.image.extract_patches`` measured 8x slower than either of two
        gatherings on LeNet-5's first layer (2-core CPU): a convolution with
        an identity kernel (the same strides, dilations and padding as the
        layer's, so the same windows), cheapest for few window entries, and
        strided slices of the padded input, cheapest for many.
        """
        kh, kw, c_in = self.kernel[:3]
        x = self.x[n0 : n0 + count]
        depth = kh * kw * c_in
        if depth <= _IDENTITY_CONV_DEPTH:
            eye = tf.reshape(tf.eye(depth, dtype=x.dtype), (kh, kw, c_in, depth))
            p = tf.nn.conv2d(x, eye, list(self.strides), self.padding, dilations=list(self.dilations))
            return tf.reshape(p, (count, -1, depth))
        (_, sh, sw, _), (_, dh, dw, _) = self.strides, self.dilations
        ho, wo = (int(s) for s in self.out.shape[1:3])
        if self.padding == "SAME":  # TensorFlow's SAME: the smaller half of the padding before
            pads = []
            for size, out, k, st, d in ((x.shape[1], ho, kh, sh, dh), (x.shape[2], wo, kw, sw, dw)):
                total = max((out - 1) * st + (k - 1) * d + 1 - int(size), 0)
                pads.append([total // 2, total - total // 2])
            x = tf.pad(x, [[0, 0], *pads, [0, 0]])
        cols = [
            x[:, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw, :]
            for i in range(kh)
            for j in range(kw)
        ]
        return tf.reshape(tf.concat(cols, axis=-1), (count, -1, depth))

    def _grouped(self, deltas: tf.Tensor, n0: Any, count: int) -> tf.Tensor:
        """Per-sample products ``(n, kh · kw · C_in, k · C_out)``: one batched matmul over the samples."""
        k, c_out = int(deltas.shape[0]), self.kernel[-1]
        d = tf.reshape(deltas[:, n0 : n0 + count], (k, count, -1, c_out))
        d = tf.reshape(tf.transpose(d, (1, 2, 0, 3)), (count, -1, k * c_out))
        return tf.matmul(self.patches(n0, count), d, transpose_a=True)

    def products(self, deltas: tf.Tensor, n0: Any, count: int) -> tf.Tensor:
        k, c_out = int(deltas.shape[0]), self.kernel[-1]
        g = tf.reshape(self._grouped(deltas, n0, count), (count, -1, k, c_out))
        return tf.reshape(tf.transpose(g, (2, 0, 1, 3)), (k, count, self.size))

    def square_sums(self, deltas: tf.Tensor, per_cotangent: bool, budget: int) -> tf.Tensor:
        k, N, c_out = int(deltas.shape[0]), self.num_samples, self.kernel[-1]
        n_chunk = int(max(1, min(N, budget // max(self.sample_bytes(k), 1))))

        def chunk(n0: Any, count: int) -> tf.Tensor:
            g = self._grouped(deltas, n0, count)
            return tf.reduce_sum(g * g, axis=0)  # (kh · kw · C_in, k · C_out)

        total = _chunked_sum(chunk, N, n_chunk)
        total = tf.reshape(total, (-1, k, c_out))
        if per_cotangent:
            return tf.reshape(tf.transpose(total, (1, 0, 2)), (k, self.size))
        return tf.reshape(tf.reduce_sum(total, axis=1), (self.size,))

    def total(self, delta: tf.Tensor) -> tf.Tensor:
        d = tf.reshape(delta, (-1, self.kernel[-1]))
        p = tf.reshape(self.patches(0, self.num_samples), (int(d.shape[0]), -1))
        return tf.reshape(tf.matmul(p, d, transpose_a=True), (self.size,))

    def magnitude(self, delta: tf.Tensor) -> tf.Tensor:
        d = tf.reshape(tf.abs(delta), (-1, self.kernel[-1]))
        p = tf.reshape(tf.abs(self.patches(0, self.num_samples)), (int(d.shape[0]), -1))
        return tf.reshape(tf.matmul(p, d, transpose_a=True), (self.size,))

    def sample_bytes(self, k: int) -> int:
        positions = math.prod(int(s) for s in self.out.shape[1:-1])
        return (2 * k * self.size + positions * self.size // self.kernel[-1]) * self.out.dtype.size


@dataclass(eq=False)
class _Derived(_Use):
    """Entries ``start:stop`` that reach the samples only through tensors computed from parameters alone.

    Inference batch norm folds its scale into ``γ / √(var + ε)`` and its
    shift into ``β - mean · γ / √(var + ε)`` before either meets a sample.
    Each such derived tensor ``D`` read by the samples is read by recognized
    ops (``reads``, over ``D``'s own entries), and the entries' per-sample
    products are those of the reads pulled back through ``J = ∂D/∂w``:
    ``Σ_reads products_D · J``.  ``jacobians`` (one ``(|D|, size)`` matrix per
    read) are computed in the traced graph from the ``sources``, the views of
    ``w`` the parameter-only ops read.
    """

    reads: list[_Use] = field(default_factory=list)
    tensors: list[tf.Tensor] = field(default_factory=list)
    sources: list[tuple[tf.Tensor, int, int]] = field(default_factory=list)
    jacobians: list[tf.Tensor] = field(default_factory=list)

    def outputs(self) -> list[tf.Tensor]:
        return [r.out for r in self.reads]

    def pick(self, deltas: dict[int, Any]) -> list[Any]:
        return [deltas[id(r.out)] for r in self.reads]

    def products(self, deltas: list[tf.Tensor], n0: Any, count: int) -> tf.Tensor:
        reads = zip(self.reads, deltas, self.jacobians)
        return tf.add_n([tf.einsum("knd,dp->knp", r.products(d, n0, count), J) for r, d, J in reads])

    def total(self, delta: list[tf.Tensor]) -> tf.Tensor:
        return tf.add_n(
            [tf.linalg.matvec(J, r.total(d), transpose_a=True) for r, d, J in zip(self.reads, delta, self.jacobians)]
        )

    def magnitude(self, delta: list[tf.Tensor]) -> tf.Tensor:
        return tf.add_n(
            [
                tf.linalg.matvec(tf.abs(J), r.magnitude(d), transpose_a=True)
                for r, d, J in zip(self.reads, delta, self.jacobians)
            ]
        )

    def sample_bytes(self, k: int) -> int:
        return sum(r.sample_bytes(k) for r in self.reads) + 2 * k * self.size * self.out.dtype.size

    def differentiate(self, tape: tf.GradientTape) -> None:
        """Set :attr:`jacobians` from the forward pass on ``tape`` (called at trace time)."""
        views = [t for t, _, _ in self.sources]
        at: dict[int, tf.Tensor] = {}
        for D in self.tensors:
            if id(D) not in at:
                parts = tape.jacobian(D, views, unconnected_gradients=_ZERO)
                rows = math.prod(_static_shape(D) or ())
                pieces = [(a, b, tf.reshape(J, (rows, b - a))) for J, (_, a, b) in zip(parts, self.sources)]
                at[id(D)] = tf.concat([J for _, _, J in sorted(pieces, key=lambda p: p[0])], axis=1)
        self.jacobians = [at[id(D)] for D in self.tensors]


# ----------------------------------------------------------------------
# The graph of one forward pass: where the flat vector's entries are read
# ----------------------------------------------------------------------
@dataclass
class _Record:
    """The reads of the flat vector ``w`` (``P`` entries) by the ops of one traced forward pass."""

    P: int
    counts: np.ndarray = None  # type: ignore[assignment]
    uses: list[_Use] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.P, dtype=np.int64)

    def clean(self) -> list[_Use]:
        """The recognized reads of entries that nothing else reads."""
        return [u for u in self.uses if bool(np.all(self.counts[u.start : u.stop] == 1))]


def _record(w: tf.Tensor, x: Any, num_samples: int) -> _Record:
    """Follow the views of ``w`` in the current graph to the ops that read them (called at trace time).

    Ops that read views but no tensor computed from the inputs ``x``
    (parameter-only ops: batch norm's folding) are followed further, to the
    ops that bring their results to the samples: see :func:`_derived_reads`.
    """
    P = int(w.shape[0])
    record = _Record(P)
    dependent = _sample_dependent(x)
    stack: list[tuple[tf.Tensor, int, int]] = [(w, 0, P)]
    views: set[Any] = set()
    prelude: list[tuple[tf.Operation, tf.Tensor, int, int]] = []
    while stack:
        t, start, stop = stack.pop()
        views.add(t.ref())
        for op in t.consumers():
            if op.type in _METADATA:
                continue
            if op.type in _VIEWS and op.inputs[0] is t and all(i is not t for i in list(op.inputs)[1:]):
                stack.append((op.outputs[0], start, stop))
                continue
            pieces = _split_pieces(op, t, start, stop)
            if pieces is not None:
                stack.extend(pieces)
                continue
            if _parameter_only(op, dependent, w.dtype):
                prelude.append((op, t, start, stop))
                continue
            for index, tensor in enumerate(op.inputs):
                if tensor is t:
                    record.counts[start:stop] += 1
                    use = _recognize(op, index, start, stop, num_samples, views)
                    if use is not None:
                        record.uses.append(use)
    if prelude:
        _derived_reads(record, prelude, dependent, views, num_samples, w.dtype)
    return record


def _sample_dependent(x: Any) -> set[Any]:
    """The tensors of the current graph computed from the inputs ``x`` (as refs)."""
    seen: set[Any] = set()
    stack = [t for t in tf.nest.flatten(x, expand_composites=True) if isinstance(t, tf.Tensor)]
    while stack:
        t = stack.pop()
        if t.ref() in seen:
            continue
        seen.add(t.ref())
        for op in t.consumers():
            stack.extend(o for o in op.outputs if o.ref() not in seen)
    return seen


def _parameter_only(op: tf.Operation, dependent: set[Any], dtype: tf.DType) -> bool:
    """Whether ``op`` reads nothing computed from the inputs and has one output of static shape in ``dtype``.

    Casts to another precision (mixed precision's float16 copies) are left
    to the generic route.
    """
    return (
        len(op.outputs) == 1
        and op.outputs[0].dtype == dtype
        and _static_shape(op.outputs[0]) is not None
        and not any(i.ref() in dependent for i in op.inputs)
    )


def _derived_reads(
    record: _Record,
    prelude: list[tuple[tf.Operation, tf.Tensor, int, int]],
    dependent: set[Any],
    views: set[Any],
    N: int,
    dtype: tf.DType,
) -> None:
    """Group the entries read by parameter-only ops, and recognize how their results reach the samples.

    Entries whose parameter-only ops connect them form one group.  A group
    becomes one :class:`_Derived` read when its entries are one range, the
    views it reads do not overlap, every op that reads a derived tensor with
    a sample is recognized, and the Jacobians stay small; its entries are
    counted as read once (by the group).  Otherwise they are counted as read
    by an unrecognized op and take the generic route.
    """
    ops: dict[Any, tf.Operation] = {}  # parameter-only ops, by their output
    sources: dict[Any, set[tuple[int, int]]] = {}  # ranges of w each derived tensor is computed from
    first_views: dict[tuple[int, int], tf.Tensor] = {}
    twice: set[tuple[int, int]] = set()  # ranges read through two views: a Jacobian in one would miss the other
    for op, t, a, b in prelude:
        out = op.outputs[0]
        ops[out.ref()] = op
        sources.setdefault(out.ref(), set()).add((a, b))
        if first_views.setdefault((a, b), t) is not t:
            twice.add((a, b))
    # Derived tensors read by further parameter-only ops: those join the prelude, with their sources.
    frontier = list(ops.values())
    sample_reads: list[tuple[tf.Operation, int, tf.Tensor]] = []
    broken: list[tf.Tensor] = []  # derived tensors read by something neither parameter-only nor a sample op
    while frontier:
        op = frontier.pop()
        D = op.outputs[0]
        for consumer in D.consumers():
            if consumer.type in _METADATA:
                continue
            if _parameter_only(consumer, dependent, dtype):
                if consumer.outputs[0].ref() not in ops:
                    ops[consumer.outputs[0].ref()] = consumer
                    frontier.append(consumer)
                continue
            if len(consumer.outputs) != 1 or not any(i.ref() in dependent for i in consumer.inputs):
                broken.append(D)
                continue
            sample_reads.extend((consumer, i, D) for i, t in enumerate(consumer.inputs) if t is D)

    memo: dict[Any, frozenset] = {}

    def ranges_of(t: tf.Tensor) -> frozenset:
        if t.ref() not in memo:
            found = set(sources.get(t.ref(), ()))
            for i in ops[t.ref()].inputs:
                if i.ref() in ops:
                    found |= ranges_of(i)
            memo[t.ref()] = frozenset(found)
        return memo[t.ref()]

    # Groups: ranges joined by any derived tensor computed from several (union-find over ranges).
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(r: tuple[int, int]) -> tuple[int, int]:
        while parent.setdefault(r, r) != r:
            r = parent[r]
        return r

    for op in ops.values():
        rs = sorted(ranges_of(op.outputs[0]))
        for r in rs[1:]:
            parent[root(r)] = root(rs[0])
        if rs:
            root(rs[0])
    groups: dict[tuple[int, int], dict[str, Any]] = {}
    for r in list(parent):
        groups.setdefault(root(r), {"ranges": set(), "reads": [], "broken": False})["ranges"].add(r)
    for t in broken:
        for r in ranges_of(t):
            groups[root(r)]["broken"] = True
    for consumer, index, D in sample_reads:
        rs = ranges_of(D)
        if rs:
            groups[root(next(iter(rs)))]["reads"].append((consumer, index, D))
    derived_refs = views | set(ops)
    for group in groups.values():
        ranges = sorted(group["ranges"])
        start, stop = ranges[0][0], max(b for _, b in ranges)
        use = None
        one_range = all(a == b_prev for (_, b_prev), (a, _) in zip(ranges, ranges[1:]))
        if not group["broken"] and group["reads"] and one_range and not twice & group["ranges"]:
            reads = [_recognize(op, i, 0, math.prod(_static_shape(D)), N, derived_refs) for op, i, D in group["reads"]]
            size = stop - start
            jacobian = sum(math.prod(_static_shape(D)) * size for _, _, D in group["reads"])
            if all(r is not None for r in reads) and jacobian <= _DERIVED_JACOBIAN_ENTRIES:
                use = _Derived(
                    start,
                    stop,
                    reads[0].out,
                    N,
                    reads=reads,
                    tensors=[D for _, _, D in group["reads"]],
                    sources=[(first_views[r], r[0], r[1]) for r in ranges],
                )
        for a, b in ranges:
            record.counts[a:b] += 1
        if use is not None:
            record.uses.append(use)


def _split_pieces(op: tf.Operation, t: tf.Tensor, start: int, stop: int) -> list[tuple[tf.Tensor, int, int]] | None:
    """The ranges of the outputs of a ``SplitV`` or ``Split`` of a 1-D view along axis 0, else ``None``."""
    if op.type == "SplitV" and op.inputs[0] is t and len(t.shape) == 1:
        sizes, axis = tf.get_static_value(op.inputs[1]), tf.get_static_value(op.inputs[2])
    elif op.type == "Split" and op.inputs[1] is t and len(t.shape) == 1:
        axis = tf.get_static_value(op.inputs[0])
        sizes = [int(o.shape[0]) if o.shape[0] is not None else -1 for o in op.outputs]
    else:
        return None
    if sizes is None or axis is None or int(axis) not in (0, -1) or any(int(s) < 0 for s in sizes):
        return None
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))]) + start
    if offsets[-1] != stop:
        return None
    return [(o, int(a), int(b)) for o, a, b in zip(op.outputs, offsets[:-1], offsets[1:])]


def _static_shape(t: tf.Tensor) -> tuple[int, ...] | None:
    dims = t.shape.as_list() if t.shape.rank is not None else None
    return None if dims is None or any(d is None for d in dims) else tuple(dims)


def _recognize(op: tf.Operation, index: int, start: int, stop: int, N: int, views: set[Any]) -> _Use | None:
    """The recognized use of input ``index`` of ``op`` (a view of entries ``start:stop``), or ``None``."""
    out = op.outputs[0] if op.outputs else None
    if out is None or not out.dtype.is_floating:
        return None
    out_shape = _static_shape(out)
    if out_shape is None or len(out_shape) < 2 or out_shape[0] % max(N, 1) or N == 0:
        return None
    others = [t for i, t in enumerate(op.inputs) if i != index]
    if any(t.ref() in views for t in others):  # the parameters against themselves: no sample axis
        return None
    param = op.inputs[index]
    if op.type == "MatMul" and index == 1 and not op.get_attr("transpose_a"):
        a = op.inputs[0]
        if len(out_shape) != 2 or _static_shape(a) is None:
            return None
        return _MatMul(start, stop, out, N, a=a, transpose_b=bool(op.get_attr("transpose_b")), rows=out_shape[0] // N)
    if op.type in ("BatchMatMulV2", "BatchMatMulV3") and index == 1 and not op.get_attr("adj_x"):
        return _batch_matmul(op, start, stop, out, N)
    if out_shape[0] != N:
        return None
    if op.type == "Conv2D" and index == 1:
        return _conv2d(op, start, stop, out, N)
    if op.type == "GatherV2" and index == 0:
        return _gather(op, start, stop, out, N)
    if op.type in ("AddV2", "Add", "Mul", "BiasAdd"):
        shape = _static_shape(param)
        if shape is None:
            return None
        if op.type == "BiasAdd":
            if index != 1 or len(shape) != 1:
                return None
            fmt = op.get_attr("data_format")
            channel = 1 if (fmt.decode() if isinstance(fmt, bytes) else fmt).startswith("NC") else len(out_shape) - 1
            padded = tuple(shape[0] if i == channel else 1 for i in range(len(out_shape)))
        else:
            if len(shape) > len(out_shape):
                return None
            padded = (1,) * (len(out_shape) - len(shape)) + shape
        if padded[0] != 1 or any(p not in (1, o) for p, o in zip(padded, out_shape)):
            return None
        axes = tuple(i for i in range(1, len(out_shape)) if padded[i] == 1)
        factor = others[0] if op.type == "Mul" else None
        if factor is not None and (_static_shape(factor) is None or not factor.dtype.is_floating):
            return None
        return _Broadcast(start, stop, out, N, axes=axes, factor=factor)
    return None


def _batch_matmul(op: tf.Operation, start: int, stop: int, out: tf.Tensor, N: int) -> _Use | None:
    """``x @ W`` with a matrix ``W`` broadcast over the leading axes of ``x`` (Keras ``EinsumDense``), else ``None``."""
    x, w = op.inputs[0], op.inputs[1]
    x_shape, w_shape, out_shape = _static_shape(x), _static_shape(w), _static_shape(out)
    if x_shape is None or w_shape is None or out_shape is None or len(w_shape) < 2 or len(w_shape) > len(x_shape):
        return None
    if any(d != 1 for d in w_shape[:-2]) or tuple(out_shape[:-1]) != tuple(x_shape[:-1]) or x_shape[0] % N:
        return None
    rows = math.prod(x_shape[:-1]) // N
    return _MatMul(start, stop, out, N, a=x, transpose_b=bool(op.get_attr("adj_y")), rows=rows)


def _gather(op: tf.Operation, start: int, stop: int, out: tf.Tensor, N: int) -> _Use | None:
    """Rows of a table picked by per-sample indices (``GatherV2`` on axis 0, no batch axes), else ``None``."""
    table, indices = _static_shape(op.inputs[0]), _static_shape(op.inputs[1])
    axis = tf.get_static_value(op.inputs[2])
    if table is None or indices is None or len(table) < 1 or axis is None or int(axis) != 0:
        return None
    if op.get_attr("batch_dims") != 0 or not indices or indices[0] != N or table[0] == 0:
        return None
    return _Gather(start, stop, out, N, indices=op.inputs[1], table_rows=table[0])


def _conv2d(op: tf.Operation, start: int, stop: int, out: tf.Tensor, N: int) -> _Use | None:
    fmt = op.get_attr("data_format")
    padding = op.get_attr("padding")
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    padding = padding.decode() if isinstance(padding, bytes) else padding
    x, kernel = op.inputs[0], _static_shape(op.inputs[1])
    x_shape = _static_shape(x)
    if fmt != "NHWC" or padding not in ("VALID", "SAME") or kernel is None or x_shape is None or len(x_shape) != 4:
        return None
    if kernel[2] != x_shape[3]:  # grouped convolution
        return None
    strides, dilations = tuple(op.get_attr("strides")), tuple(op.get_attr("dilations"))
    if strides[0] != 1 or strides[3] != 1 or dilations[0] != 1 or dilations[3] != 1:
        return None
    return _Conv2D(start, stop, out, N, x=x, kernel=kernel, strides=strides, dilations=dilations, padding=padding)


def _each(f: Callable[[tf.Tensor], tf.Tensor], picked: Any) -> Any:
    """``f`` of a read's cotangents: of each, for a :class:`_Derived` read's list."""
    return [f(d) for d in picked] if isinstance(picked, list) else f(picked)


def _deltas(tape: tf.GradientTape, z: tf.Tensor, outs: list[tf.Tensor], U: tf.Tensor) -> list[tf.Tensor]:
    """``∂⟨z, U[k]⟩/∂out`` for every row of ``U`` and every output: one ``(k, *out.shape)`` tensor per output."""
    if int(U.shape[0]) == 1:
        return [g[None] for g in tape.gradient(z, outs, output_gradients=U[0], unconnected_gradients=_ZERO)]
    signature = tuple(tf.TensorSpec(o.shape, o.dtype) for o in outs)
    return list(
        tf.map_fn(
            lambda u: tuple(tape.gradient(z, outs, output_gradients=u, unconnected_gradients=_ZERO)),
            U,
            fn_output_signature=signature,
        )
    )


def _assemble(P: int, parts: list[tuple[int, int, tf.Tensor]], rows: int | None, dtype: tf.DType) -> tf.Tensor:
    """A ``(P,)`` (or ``(rows, P)``) vector with ``parts`` at their entries and zeros elsewhere."""
    pieces, at = [], 0
    lead = () if rows is None else (rows,)
    for start, stop, part in sorted(parts, key=lambda p: p[0]):
        if start > at:
            pieces.append(tf.zeros(lead + (start - at,), dtype))
        pieces.append(tf.reshape(part, lead + (stop - start,)))
        at = stop
    if at < P:
        pieces.append(tf.zeros(lead + (P - at,), dtype))
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=-1)


def _close(actual: np.ndarray, expected: np.ndarray, eps: float, magnitude: float = 0.0) -> bool:
    """Agreement up to rounding: ``10 √ε`` of the larger magnitude (the two sides sum in different orders).

    ``magnitude``: the largest sum of the terms' absolute values, which
    bounds the rounding where the terms cancel.
    """
    if expected.size == 0:
        return True
    scale = max(float(np.max(np.abs(expected))), float(np.max(np.abs(actual))), magnitude, 1e-30)
    return bool(np.max(np.abs(expected - actual)) <= 10.0 * math.sqrt(eps) * scale)


# ----------------------------------------------------------------------
# The route
# ----------------------------------------------------------------------
@dataclass
class _Plan:
    """What one input signature takes: the accepted reads, and the generic route for the remaining entries."""

    fast: frozenset[tuple[int, int]]
    rest: np.ndarray
    delta_bytes: int = 0
    run: Callable[..., tf.Tensor] | None = None
    rest_squares: Squares | None = None
    base: tf.Variable | None = None
    times: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})

    def choice(self) -> bool | None:
        """Whether the mixed route is the faster, once both have been timed ``_TRIALS`` times; ``None`` before."""
        if min(len(t) for t in self.times.values()) < _TRIALS:
            return None
        return min(self.times[True]) <= min(self.times[False])


class StructuredSquares:
    """``squares(w, x, cotangents, memory_budget)`` of :meth:`Backend.per_sample_squares`, by the recorded route.

    Parameters
    ----------
    f : callable
        ``f(w, x)``, the model's outputs for flat parameters ``w`` and a batch ``x``.
    per_cotangent : bool
        Squares per cotangent ``(K, P)`` instead of summed ``(P,)``.
    generic : callable
        ``generic(g, per_cotangent)``: the generic route's squares function for
        a function ``g(v, x)``; used for the whole model where nothing is
        recognized, and for the entries the recognized reads leave.
    compile : callable
        The backend's ``tf.function`` wrapper.

    Attributes
    ----------
    plans : dict
        Per input signature, the entries that take the structured route
        (:attr:`structured_entries` counts them), kept between calls.
    """

    def __init__(
        self, f: Callable[[tf.Tensor, Any], tf.Tensor], per_cotangent: bool, generic: Generic, compile: Callable
    ) -> None:
        self.f, self.per_cotangent, self.generic, self.compile = f, per_cotangent, generic, compile
        self.whole = generic(f, per_cotangent)
        self.forward = compile(lambda w, x: f(w, x))
        self.plans: dict[tuple, _Plan] = {}
        self.info: dict[str, Any] = {}

    def structured_entries(self) -> int:
        """How many entries of the flat vector the structured route covers, summed over the input signatures met.

        Where other entries remain, the mixed route is taken only if it timed faster than the generic one.
        """
        return sum(sum(b - a for a, b in plan.fast) for plan in self.plans.values())

    def __call__(
        self, w: tf.Tensor, x: Any, cotangents: Callable[[tf.Tensor], tf.Tensor], memory_budget: int
    ) -> tf.Tensor:
        key = _signature(w, x)
        z = self.forward(w, x)
        U = cotangents(tf.stop_gradient(z))
        if key not in self.plans:
            self.plans[key] = self._plan(w, x, z, U, memory_budget)
        plan = self.plans[key]
        if not plan.fast:
            return self.whole(w, x, lambda _: U, memory_budget)
        if not plan.rest.size:
            return self._mixed(plan, w, x, U, memory_budget)
        # Entries on both routes: the generic part alone can cost more than the generic route for every entry
        # (measured on the benchmark's transformer: 70 against 21 gradients, its embedding and attention
        # weights being most entries), so the first calls time both, and later calls take the faster.
        choice = plan.choice()
        mixed = len(plan.times[True]) <= len(plan.times[False]) if choice is None else choice
        start = time.perf_counter()
        result = self._mixed(plan, w, x, U, memory_budget) if mixed else self.whole(w, x, lambda _: U, memory_budget)
        if choice is None:
            _ = result.numpy()  # wait for the work, so that the timing covers it
            plan.times[mixed].append(time.perf_counter() - start)
        return result

    def _mixed(self, plan: _Plan, w: tf.Tensor, x: Any, U: tf.Tensor, memory_budget: int) -> tf.Tensor:
        """The structured route for the accepted reads, the generic one restricted to the other entries."""
        K = int(U.shape[0])
        k_chunk = int(max(1, min(K, memory_budget // max(plan.delta_bytes, 1))))
        parts = [plan.run(w, x, U[k0 : k0 + k_chunk], memory_budget) for k0 in range(0, K, k_chunk)]
        result = parts[0] if len(parts) == 1 else (tf.concat(parts, 0) if self.per_cotangent else tf.add_n(parts))
        if plan.rest.size:
            plan.base.assign(w)
            rest = tf.constant(plan.rest[:, None])
            part = plan.rest_squares(tf.gather(w, plan.rest), x, lambda _: U, memory_budget)
            if self.per_cotangent:
                result = tf.transpose(tf.tensor_scatter_nd_add(tf.transpose(result), rest, tf.transpose(part)))
            else:
                result = tf.tensor_scatter_nd_add(result, rest, part)
        return result

    # ------------------------------------------------------------------ the structured pass
    def _traced(
        self, w: tf.Tensor, x: Any, accepted: frozenset | None
    ) -> tuple[tf.GradientTape, tf.Tensor, _Record, list[_Use]]:
        """One forward pass on a persistent tape, its reads, and the recognized reads of entries nothing else reads."""
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(w)
            z = self.f(w, x)
        # Read before any other op consumes w: every consumer seen now belongs to the forward pass.
        record = _record(w, x, int(z.shape[0]) if z.shape.rank else 0)
        uses = record.clean() if z.shape.rank else []
        if accepted is not None:
            uses = [u for u in uses if u.key in accepted]
        for u in uses:
            if isinstance(u, _Derived):
                u.differentiate(tape)
        return tape, z, record, uses

    def _make_run(self, accepted: frozenset) -> Callable[..., tf.Tensor]:
        per_cotangent = self.per_cotangent

        def run(w: tf.Tensor, x: Any, U: tf.Tensor, budget: int) -> tf.Tensor:
            tape, z, _, uses = self._traced(w, x, accepted)
            outs = list({id(o): o for u in uses for o in u.outputs()}.values())
            deltas = dict(zip((id(o) for o in outs), _deltas(tape, z, outs, U)))
            parts = [(u.start, u.stop, u.square_sums(u.pick(deltas), per_cotangent, budget)) for u in uses]
            return _assemble(int(w.shape[0]), parts, int(U.shape[0]) if per_cotangent else None, w.dtype)

        return self.compile(run)

    # ------------------------------------------------------------------ the guards, once per signature
    def _plan(self, w: tf.Tensor, x: Any, z: tf.Tensor, U: tf.Tensor, budget: int) -> _Plan:
        P, N = int(w.shape[0]), int(z.shape[0]) if z.shape.rank else 0
        if N == 0 or not w.dtype.is_floating or w.dtype.size < 4:
            return _Plan(frozenset(), np.zeros(0, np.int64))
        found: dict[str, Any] = {}
        samples = sorted({0, N - 1})[:_CHECK_SAMPLES]
        rng = np.random.default_rng(0)
        c = tf.constant(1.0 + rng.random(N), dtype=U.dtype)  # in [1, 2): never zero
        r = tf.constant(rng.standard_normal(int(U.shape[0])), dtype=U.dtype)

        def check(w: tf.Tensor, x: Any, U: tf.Tensor) -> dict[str, Any]:
            tape, z, record, uses = self._traced(w, x, None)
            found["uses"] = [(u.key, type(u).__name__) for u in uses]
            found["counts"] = record.counts
            outs = list({id(o): o for u in uses for o in u.outputs()}.values())
            found["outs"] = {
                u.key: [(id(o), math.prod(o.shape.as_list()) * o.dtype.size) for o in u.outputs()] for u in uses
            }
            deltas = dict(zip((id(o) for o in outs), _deltas(tape, z, outs, U))) if outs else {}
            u_c = tf.reduce_sum(U, 0) * tf.reshape(c, (N,) + (1,) * (len(U.shape) - 2))
            grad = tape.gradient(z, w, output_gradients=u_c, unconnected_gradients=_ZERO)
            weighted, alone, magnitudes = [], [], []

            def weigh(d: tf.Tensor) -> tf.Tensor:
                return tf.reshape(tf.reshape(d, (N, -1)) * c[:, None], d.shape)

            for u in uses:
                picked = u.pick(deltas)
                weighted.append(u.total(_each(lambda d: weigh(tf.reduce_sum(d, axis=0)), picked)))
                # Every cotangent by its absolute value, weighted by c ≥ 1 (and below by the largest |r_k|):
                # a bound on the terms of both checks' sums.
                magnitudes.append(
                    tf.reduce_max(u.magnitude(_each(lambda d: weigh(tf.reduce_sum(tf.abs(d), axis=0)), picked)))
                )
                # Products are linear in the cotangent: one random combination of the K checks them all.
                alone.append([tf.tensordot(r, u.products(picked, n, 1)[:, 0], 1) for n in samples])
            generic = []
            for n in samples:
                # The sample alone, as a batch of two copies of itself with half the cotangent each, and outside
                # any loop: filter gradients of convolutions on a batch of one (and per-sample ones in a
                # tf.map_fn) corrupted the heap under oneDNN (TensorFlow 2.21, the benchmark's small ResNet).
                x_n = _sample_slice(x, n, n + 1)
                twice = tuple(tf.concat([a, a], 0) for a in x_n) if isinstance(x_n, tuple) else tf.concat([x_n] * 2, 0)
                with tf.GradientTape() as t:
                    t.watch(w)
                    out = self.f(w, twice)
                u_n = tf.tensordot(r, U[:, n], 1)[None] / 2
                u_n = tf.concat([u_n, u_n], 0)
                generic.append(t.gradient(out, w, output_gradients=u_n, unconnected_gradients=_ZERO))
            return {"grad": grad, "weighted": weighted, "alone": alone, "generic": generic, "magnitudes": magnitudes}

        try:
            result = self.compile(check)(w, x, U)
        except Exception:  # an op the analysis or its gradients cannot handle: the generic route, always sound
            return _Plan(frozenset(), np.zeros(0, np.int64))
        eps = float(np.finfo(w.dtype.as_numpy_dtype).eps)
        grad = result["grad"].numpy()
        accepted = set()
        for i, (key, _) in enumerate(found["uses"]):
            a, b = key
            magnitude = float(result["magnitudes"][i].numpy()) * max(1.0, float(np.max(np.abs(r.numpy()))))
            ok = _close(result["weighted"][i].numpy(), grad[a:b], eps, magnitude)
            for j in range(len(samples)):
                ok = ok and _close(result["alone"][i][j].numpy(), result["generic"][j].numpy()[a:b], eps, magnitude)
            if ok:
                accepted.add(key)
        counts = found["counts"]
        fast = np.zeros(P, dtype=bool)
        for a, b in accepted:
            fast[a:b] = True
        # Entries read by other ops or rejected go the generic route; entries no op reads have zero products,
        # which the gradient confirms (else they go the generic route too).
        rest = np.nonzero(~fast & ((counts > 0) | (grad != 0)))[0].astype(np.int64)
        self.info[str(_signature(w, x))] = {"uses": found["uses"], "accepted": sorted(accepted), "rest": int(rest.size)}
        if not accepted:
            return _Plan(frozenset(), rest)
        plan = _Plan(frozenset(accepted), rest)
        plan.delta_bytes = sum(dict(pair for key in accepted for pair in found["outs"][key]).values())
        plan.run = self._make_run(plan.fast)
        if rest.size:
            plan.base = tf.Variable(w, trainable=False)
            base, index = plan.base, tf.constant(rest[:, None])
            f = self.f
            plan.rest_squares = self.generic(
                lambda v, x: f(tf.tensor_scatter_nd_update(base, index, v), x), self.per_cotangent
            )
        return plan


def per_sample_squares(
    f: Callable[[tf.Tensor, Any], tf.Tensor], per_cotangent: bool, generic: Generic, compile: Callable
) -> StructuredSquares:
    """``squares(w, x, cotangents, memory_budget)`` by the recorded route, ``generic`` for what it leaves."""
    return StructuredSquares(f, per_cotangent, generic, compile)
