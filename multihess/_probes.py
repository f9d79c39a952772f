"""Random probe vectors from one NumPy seed, and batched products with them.

Probes are drawn on the host from ``numpy.random.default_rng(seed)`` (Rademacher
signs from raw bits, Gaussian entries in float64), so one seed gives the same
probes, hence the same estimates, in every framework.  They are generated
chunk by chunk from draws that do not depend on the chunking (the raw bit
stream and ``Generator.standard_normal`` give the same numbers whether asked
for at once or in pieces), so the memory budget changes how the work is
batched, never the numbers.

Probe entries are laid out by parameter *name*: a probe is drawn for the
parameters sorted by name (each raveled row-major) and then permuted into
the operator's own order.  Frameworks order the same parameters differently
(JAX sorts dict keys, PyTorch keeps insertion order), and this makes a seed
mean the same probe for the same parameters everywhere.

Products run through the operator's internal batched entry point
``_matmat_rows``: each chunk of probes goes to the device once (Rademacher
signs as one byte per entry, widened there) and its products, or only their
reductions, come back once.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np

from ._arrays import dtype_name, itemsize, machine_epsilon
from ._operator import CurvatureOperator

DISTRIBUTIONS = ("rademacher", "gaussian")

MAX_ROWS = 64
"""Most probes sent through one batched product (more would multiply the backend's own working memory)."""


def draw_probes(
    rng: np.random.Generator,
    num: int,
    n: int,
    distribution: str,
    order: list[slice] | None = None,
    dtype: Any = np.float64,
) -> np.ndarray:
    """``num`` probe vectors of length ``n`` as the rows of an array of ``dtype``.

    ``"rademacher"``: ``1 - 2 b`` for the bits ``b`` of ``⌈n / 64⌉`` raw
    64-bit draws per probe (``rng.bit_generator.random_raw``, little-endian
    bit order), which is fast and the same in any chunking; ``"gaussian"``:
    ``rng.standard_normal`` in float64, rounded to ``dtype``.  Both have
    ``E[z zᵀ] = I``.  ``order`` (from :func:`probe_order`) rearranges the
    drawn columns into the operator's parameter order.

    >>> Z = draw_probes(np.random.default_rng(0), 2, 5, "rademacher")
    >>> Z.shape, sorted(set(Z.ravel().tolist())) == [-1.0, 1.0]
    ((2, 5), True)
    """
    if distribution == "rademacher":
        return _rademacher_signs(rng, num, n, order).astype(dtype)
    Z = rng.standard_normal((num, n)).astype(dtype, copy=False)
    return Z if order is None else np.concatenate([Z[:, part] for part in order], axis=1)


def _rademacher_signs(rng: np.random.Generator, num: int, n: int, order: list[slice] | None) -> np.ndarray:
    """The Rademacher probes of :func:`draw_probes` as ``int8`` signs (one byte per entry)."""
    words = -(-n // 64)
    raw = rng.bit_generator.random_raw(num * words).astype("<u8", copy=False).reshape(num, words)
    bits = np.unpackbits(raw.view(np.uint8), axis=1, count=n, bitorder="little").view(np.int8)
    if order is not None:
        bits = np.concatenate([bits[:, part] for part in order], axis=1)
    bits *= -2  # 1 - 2 b in place: no second array of num · n entries
    bits += 1
    return bits


def probe_forms(
    op: CurvatureOperator, rng: np.random.Generator, num: int, distribution: str, memory_budget: int
) -> Iterator[np.ndarray]:
    """Chunks of ``zᵀAz`` for ``num`` fresh probes, in float64: Hutchinson's samples of the trace.

    Where the operator's product has a compiled ``forms`` (JAX, TensorFlow),
    the probes go in as they were sent (Rademacher signs as ``int8``) and
    only the numbers come out: widening, products, multiplication and sum
    are one call.  Otherwise :func:`probe_reductions`, the same numbers.
    """
    b = op.backend
    if op._compiled_variant("forms") is None:
        yield from probe_reductions(op, rng, num, distribution, memory_budget, lambda Z, AZ: b.xp.sum(Z * AZ, axis=1))
        return
    for start, stop in chunks(num, rows_per_chunk(op, memory_budget)):
        forms = op._quadratic_forms(_kept_probes(op, rng, stop - start, distribution))
        yield np.asarray(b.to_numpy(forms), dtype=np.float64)


KEPT_PROBE_BYTES = 64 << 20
"""Most bytes of probes :func:`_kept_probes` keeps on the device between calls."""

_kept: OrderedDict[Hashable, tuple[Any, dict, int]] = OrderedDict()
_kept_lock = threading.Lock()  # estimators may run in several threads


def _kept_probes(op: CurvatureOperator, rng: np.random.Generator, num: int, distribution: str) -> Any:
    """The probes of :func:`_sent_payload`, in the operator's dtype, kept for the next draw from the same state.

    One seed means the same probes on every call, and a small model pays
    for them as much as for a tenth of its products (an MLP's trace of 10
    probes on 2·10⁵ parameters: 0.3 ms to draw, 0.3 ms to send, 0.8 ms to
    widen the signs on the device, against 10 ms in all).  So the probes
    last sent are kept on the device, up to :data:`KEPT_PROBE_BYTES` in
    all, keyed by the generator's state before the draw and by everything
    that shapes them; a call that finds them sets the generator to its
    state after that draw, so that every later number is the one it would
    have drawn.  Larger chunks travel as before (signs widened in the
    compiled call), so that nothing of their size stays behind.
    """
    like = op.cols.w
    n, order = op.shape[1], probe_order(op)
    size = num * n * itemsize(like)
    if size > KEPT_PROBE_BYTES:
        return _sent_payload(op, rng, num, distribution)
    key = (
        repr(rng.bit_generator.state),
        type(op.backend).__name__,
        str(getattr(like, "sharding", getattr(like, "device", ""))),
        dtype_name(like),
        distribution,
        num,
        n,
        None if order is None else tuple((part.start, part.stop) for part in order),
    )
    with _kept_lock:
        found = _kept.get(key)
        if found is not None:
            _kept.move_to_end(key)
    if found is not None:
        probes, after, _ = found
        rng.bit_generator.state = after
        return probes
    probes = op.backend.xp.astype(_sent_payload(op, rng, num, distribution), like.dtype)
    with _kept_lock:
        _kept[key] = (probes, rng.bit_generator.state, size)
        while sum(entry[2] for entry in _kept.values()) > KEPT_PROBE_BYTES:
            _kept.popitem(last=False)
    return probes


def _sent_payload(op: CurvatureOperator, rng: np.random.Generator, num: int, distribution: str) -> Any:
    """The probes of :func:`sent_probes` as they travel: ``int8`` signs (Rademacher) or the operator's dtype."""
    b, like = op.backend, op.cols.w
    n, order = op.shape[1], probe_order(op)
    if distribution == "rademacher":
        return b.asarray(_rademacher_signs(rng, num, n, order), like)
    return b.asarray(draw_probes(rng, num, n, distribution, order, probe_dtype(op)), like)


def sent_probes(op: CurvatureOperator, rng: np.random.Generator, num: int, distribution: str) -> Any:
    """The probes of :func:`draw_probes` for ``op`` as a framework array on its device, in its dtype.

    Rademacher probes travel as ``int8`` signs and are widened on the
    device: a quarter of the float32 bytes (an eighth of float64) to write
    on the host and to copy, which for wide models costs as much as the
    products themselves.  Gaussian probes travel in the operator's dtype.
    The numbers are those of :func:`draw_probes` either way.
    """
    return op.backend.xp.astype(_sent_payload(op, rng, num, distribution), op.cols.w.dtype)


def probe_dtype(op: CurvatureOperator) -> Any:
    """NumPy dtype probes are drawn in: the operator's when NumPy has it (no conversion on the way), else float64."""
    name = dtype_name(op.cols.w)
    return np.float32 if name == "float32" else np.float64


def probe_order(op: CurvatureOperator) -> list[slice] | None:
    """Where each parameter of the operator lies in a probe drawn for the parameters sorted by name.

    The operator's probe is the concatenation of these column slices of the
    drawn one; ``None`` when the parameters are already sorted by name.
    """
    return order_by_name(op.cols.names, op.cols.sizes)


def order_by_name(names: list[str], sizes: list[int]) -> list[slice] | None:
    """:func:`probe_order` for parameters ``names`` of ``sizes`` entries, laid out in that order."""
    if names == sorted(names):
        return None
    starts, position = {}, 0
    for name, size in sorted(zip(names, sizes)):
        starts[name] = position
        position += size
    return [slice(starts[n], starts[n] + size) for n, size in zip(names, sizes)]


def rows_per_chunk(op: CurvatureOperator, memory_budget: int) -> int:
    """How many probes one batched product takes within the budget (at least 1, at most :data:`MAX_ROWS`).

    A row costs its probe and its product on the device and both again in
    float64 on the host.
    """
    m, n = op.shape
    per_row = (m + n) * (itemsize(op.cols.w) + 8)
    return int(max(1, min(MAX_ROWS, memory_budget // max(per_row, 1))))


def planned_chunks(op: CurvatureOperator, memory_budget: int, *sizes: int) -> int:
    """How many batched products (passes over the data) blocks of ``sizes`` probes take within the budget."""
    per_pass = rows_per_chunk(op, memory_budget)
    return sum(-(-size // per_pass) for size in sizes)


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of at most ``size`` covering ``range(total)``."""
    for start in range(0, total, size):
        yield start, min(start + size, total)


def apply_rows(op: CurvatureOperator, rows: np.ndarray) -> np.ndarray:
    """``(A rowsᵀ)ᵀ`` for host ``rows``: one transfer each way, answered in the products' NumPy dtype."""
    b = op.backend
    return np.asarray(b.to_numpy(op._matmat_rows(b.asarray(np.ascontiguousarray(rows), op.cols.w))))


def probe_products(
    op: CurvatureOperator, rng: np.random.Generator, num: int, distribution: str, memory_budget: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks ``(Z, A Z)`` of ``num`` fresh probes (rows) and their products, in :func:`probe_dtype`.

    Only one chunk of probes exists at a time, so Hutchinson-type sums need
    memory for one chunk however many probes they use.
    """
    n, order, dtype = op.shape[1], probe_order(op), probe_dtype(op)
    for start, stop in chunks(num, rows_per_chunk(op, memory_budget)):
        Z = draw_probes(rng, stop - start, n, distribution, order, dtype)
        yield Z, apply_rows(op, Z)


def probe_reductions(
    op: CurvatureOperator,
    rng: np.random.Generator,
    num: int,
    distribution: str,
    memory_budget: int,
    reduce: Callable[[Any, Any], Any],
) -> Iterator[np.ndarray]:
    """Chunks of ``reduce(Z, A Z)`` for ``num`` fresh probes, computed on the device.

    ``reduce`` maps a chunk of probes and their products (framework arrays,
    one probe per row) to one number per probe; only those numbers come back
    to the host, in float64.  Products are computed in the operator's dtype;
    for float16 and bfloat16 operators the probes and products are widened
    to float32 before ``reduce`` sees them, so that sums such as
    ``Σ_i z_i (Az)_i`` neither overflow (float16 stops at 65504) nor round
    each partial sum to 8 or 11 bits.
    """
    b = op.backend
    for start, stop in chunks(num, rows_per_chunk(op, memory_budget)):
        Z = sent_probes(op, rng, stop - start, distribution)
        AZ = op._matmat_rows(Z)
        yield np.asarray(b.to_numpy(reduce(widened(b.xp, Z), widened(b.xp, AZ))), dtype=np.float64)


LOW_PRECISION = ("float16", "bfloat16")
"""Dtypes whose products :func:`warn_low_precision` warns about and whose reductions are widened."""


def widened(xp: Any, x: Any) -> Any:
    """``x`` in float32 when it is float16 or bfloat16 (the accumulation dtype of reductions), else as it is."""
    return xp.astype(x, xp.float32) if dtype_name(x) in LOW_PRECISION else x


_WARNED: weakref.WeakSet[CurvatureOperator] = weakref.WeakSet()


def warn_low_precision(op: CurvatureOperator, what: str) -> None:
    """Warn once per operator that its products are in float16 or bfloat16 and carry that rounding.

    Estimators accumulate in float32 or float64, which keeps their sums
    finite and their averaging exact, but every product they average was
    rounded to the operator's dtype (relative error about its machine
    epsilon, more where the loss's terms cancel).
    """
    name = dtype_name(op.cols.w)
    if name not in LOW_PRECISION or op in _WARNED:
        return
    _WARNED.add(op)
    eps = machine_epsilon(op.cols.w)
    warnings.warn(
        f"{what}: the products of this {type(op).__name__} run in {name} (machine epsilon {eps:.1g}): each carries "
        f"a relative rounding error of {eps:.0e} or more (more where the loss's terms cancel), and estimates built "
        "from them inherit it, although they are accumulated in float32/float64. For accurate curvature, evaluate "
        "a float32 copy of the model.",
        UserWarning,
        stacklevel=3,
    )


class RunningMoments:
    """Mean and variance of a stream of samples arriving in chunks (Chan et al.'s pairwise update).

    Samples are arrays of one shape (scalars for traces, vectors for
    diagonals); the variance is over samples, per entry, in float64.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | float = 0.0
        self._m2: np.ndarray | float = 0.0

    def add(self, samples: np.ndarray) -> None:
        """Add a chunk: ``samples[i]`` is one sample."""
        k = samples.shape[0]
        if k == 0:
            return
        chunk_mean = samples.mean(axis=0)
        chunk_m2 = ((samples - chunk_mean) ** 2).sum(axis=0)
        total = self.count + k
        delta = chunk_mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self._m2 = self._m2 + chunk_m2 + delta**2 * (self.count * k / total)
        self.count = total

    def std_error(self) -> np.ndarray | float:
        """Standard error of the mean, ``sqrt(s² / count)``; NaN with fewer than two samples."""
        if self.count < 2:
            return np.full_like(np.asarray(self.mean, dtype=np.float64), np.nan)[()]
        return np.sqrt(self._m2 / (self.count - 1) / self.count)
