"""Timing, peak memory, agreement checks and the row record shared by every framework.

A row's first call gives the numbers that are checked against the reference
of the same quantity (the hand-written result, or multihess where there is
no hand-written code) before any timing.  Then it is timed as the median of
``repeats`` repeats after ``warmup`` calls.  A repeat is the mean of as many
consecutive calls (each waited for) as fill ``min_seconds``, judged from the
last warm-up call: a product of a millisecond is timed over tens of calls,
and the scheduler's noise in a single call does not decide its ratio.

Peak memory is measured on one more, untimed call: on CPU the growth of the
process's resident set (Linux's ``VmHWM``, reset through
``/proc/self/clear_refs``) above its size just before the call, in a second
process whose heap maps large blocks (see :class:`Memory`); on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before the call
(JAX: the device's ``peak_bytes_in_use`` when it grew).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Quantities, in the order the report lists them.
QUANTITIES = {
    "gradient": "gradient (forward + backward)",
    "hvp": "Hessian-vector product",
    "ggn": "GGN-vector product",
    "trace": "10-probe Hessian trace",
    "ggn_diag": "exact GGN diagonal",
    "ggn_trace": "exact GGN trace",
    "eigen": "top eigenvalue, 20 iterations",
    "eigen_tol": "top eigenvalue to 1e-3",
    "density": "spectral density, 2 probes × 20 steps",
    "dense": "dense Hessian, last-layer block",
    "build": "operator build + first HVP",
}


@dataclass
class Row:
    framework: str
    model: str
    quantity: str
    who: str  # "multihess", "hand-written", "PyHessian", "curvlinops", "BackPACK"
    what: str
    seconds: float | None = None
    ratio: float | None = None  # to one gradient of the same model and framework
    peak_bytes: int | None = None
    repeats: int = 0
    calls_per_repeat: int = 1
    check: str = ""
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Reference:
    value: np.ndarray
    std_error: float | None  # set for estimates
    source: str


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters of glibc


class Memory:
    """Peak memory of one call: RSS growth on CPU, allocator peaks on CUDA.

    On a CPU the resident set only shows a call's buffers when they are
    mapped for it and unmapped after, so the heap is set to map every block
    over 128 KiB (``measuring``).  That setting also maps and unmaps those
    blocks on every call, and their page faults doubled the time of a
    millisecond's product; a freed heap, in turn, hides one row's growth
    behind another's free blocks, whatever is set later.  So on a CPU the
    timed process keeps glibc's defaults and takes the peaks from a second
    process that runs every row with the heap set to measure
    (``run.py --memory-only``), found by :func:`row_key` in ``peaks``.
    """

    def __init__(self, device: str, measuring: bool = False) -> None:
        self.device = device
        self.can_reset = _write("/proc/self/clear_refs", "5")
        self.needs_own_pass = not device.startswith("cuda") and self.can_reset
        self.peaks: dict[tuple[str, ...], int | None] | None = None
        self.libc = None
        if measuring and not os.environ.get("NO_MALLOPT"):
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
                self.libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            except OSError:
                pass

    def measure(self, fn: Callable[[], Any], sync: Callable[[Any], Any], framework: str, key: tuple) -> int | None:
        if self.peaks is not None:  # taken by the memory pass (CPU only: see needs_own_pass)
            return self.peaks.get(key)
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        if self.device.startswith("cuda") and framework == "torch":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            sync(fn())
            return torch.cuda.max_memory_allocated() - before
        if self.device.startswith("cuda") and framework == "jax":
            import jax

            dev = jax.devices()[0]
            stats = dev.memory_stats() or {}
            before, peak0 = stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")
            sync(fn())
            stats = dev.memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
            if before is None or peak is None or peak <= peak0:
                return None  # the device's peak cannot be reset; it did not grow
            return peak - before
        if not self.can_reset:
            return None
        before = _status("VmRSS")
        _write("/proc/self/clear_refs", "5")
        sync(fn())
        return max(0, _status("VmHWM") - before)


def row_key(row: Row | dict) -> tuple[str, ...]:
    """What names a row across the timed process and the memory pass."""
    d = row if isinstance(row, dict) else asdict(row)
    return tuple(str(d[k]) for k in ("framework", "model", "quantity", "who", "what"))


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}"


class Bench:
    """Rows of one model in one framework: gradient baseline, checks, timings."""

    def __init__(
        self,
        framework: str,
        model: str,
        sync: Callable[[Any], Any],
        repeats: int,
        warmup: int,
        memory: Memory,
        rows: list[Row],
        verbose: int = 1,
        quick: bool = False,
        min_seconds: float = 0.0,
        memory_only: bool = False,
    ) -> None:
        self.framework, self.model, self.sync = framework, model, sync
        self.min_seconds, self.memory_only = min_seconds, memory_only
        self.repeats, self.warmup, self.memory = repeats, warmup, memory
        self.rows, self.verbose, self.quick = rows, verbose, quick
        self.base: float | None = None
        self.refs: dict[str, Reference] = {}

    def reference(self, quantity: str, value: Any, std_error: float | None = None, source: str = "") -> None:
        self.refs[quantity] = Reference(np.asarray(value, dtype=np.float64), std_error, source)

    def fail(self, quantity: str, who: str, what: str, reason: str) -> Row:
        row = Row(self.framework, self.model, quantity, who, what, error=f"fails: {reason}")
        self._emit(row)
        return row

    def add(
        self,
        quantity: str,
        who: str,
        what: str,
        fn: Callable[[], Any],
        value: Callable[[Any], Any] | None = None,
        *,
        tol: float = 1e-3,
        set_reference: bool = False,
        check_as: str | None = None,
        repeats: int | None = None,
    ) -> Row:
        """Check ``fn``'s result against the quantity's reference, then time it.

        ``value(out)`` turns the result into a NumPy array, or into
        ``(estimate, std_error)`` for a stochastic estimate.  With
        ``set_reference`` (or when the quantity has no reference yet) the
        result becomes the reference.  ``check_as`` names another reference
        (the per-probe samples of a trace are checked exactly, an estimate
        against their mean).
        """
        row = Row(self.framework, self.model, quantity, who, what)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                out = self.sync(fn())
                times = [time.perf_counter() - start]
            notes = dict.fromkeys(f"{w.category.__name__}: {' '.join(str(w.message).split())[:160]}" for w in caught)
            if notes:
                row.extra["warnings"] = list(notes)
            if value is not None:
                row.check = self._check(check_as or quantity, who, what, value(out), tol, set_reference)
            del out
            if not self.quick:  # --quick: the checked call is the one timed
                times = self._time(row, fn, times[0], repeats)
        except Exception as err:  # a row that fails is reported, never fatal
            row.error = f"fails: {describe(err)}"
            if self.verbose > 1:
                traceback.print_exc()
            self._emit(row)
            return row
        row.seconds, row.repeats = statistics.median(times), len(times)
        if quantity == "gradient":
            self.base = row.seconds
        if self.base:
            row.ratio = row.seconds / self.base
        self._emit(row)
        return row

    def _time(self, row: Row, fn: Callable[[], Any], first: float, repeats: int | None) -> list[float]:
        """Warm up, measure the peak memory, then time the repeats (``first``: the checked call's seconds).

        Their warnings are dropped: the checked call recorded them.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            last = first
            for _ in range(self.warmup - 1):
                start = time.perf_counter()
                self.sync(fn())
                last = time.perf_counter() - start
            row.peak_bytes = self.memory.measure(fn, self.sync, self.framework, row_key(row))
            if self.memory_only:
                return [last]
            calls = max(1, math.ceil(self.min_seconds / max(last, 1e-9)))
            times = []
            for _ in range(repeats or self.repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    self.sync(fn())
                times.append((time.perf_counter() - start) / calls)
        row.calls_per_repeat = calls
        return times

    def _check(self, quantity: str, who: str, what: str, got: Any, tol: float, set_reference: bool) -> str:
        se = None
        if isinstance(got, tuple):
            got, se = got
            se = None if se is None else float(se)
        got = np.asarray(got, dtype=np.float64)
        if not np.all(np.isfinite(got)):
            raise FloatingPointError("result has NaN or infinite entries")
        ref = self.refs.get(quantity)
        if ref is None or set_reference:
            self.refs[quantity] = Reference(got, se, f"{who}: {what}")
            return "reference"
        if got.shape != ref.value.shape:
            raise ValueError(f"result shape {got.shape} differs from the reference's {ref.value.shape}")
        if se is not None or ref.std_error is not None:
            # Two estimates with independent probes: agree within 5 combined standard errors.
            spread = float(np.hypot(se or 0.0, ref.std_error or 0.0))
            diff = float(abs(got - ref.value).max())
            sigmas = diff / spread if spread > 0 else float("inf")
            ok = sigmas <= 5.0 or diff <= tol * float(abs(ref.value).max())
            return f"{'ok' if ok else 'MISMATCH'} ({sigmas:.1f} s.e.)"
        scale = float(np.linalg.norm(ref.value))
        rel = float(np.linalg.norm(got - ref.value)) / max(scale, 1e-30)
        if rel <= tol:
            return f"ok (rel {rel:.0e})"
        unconverged = quantity.startswith("eigen") or quantity == "density"
        return f"{'unconverged' if unconverged else 'MISMATCH'} (rel {rel:.0e})"

    def _emit(self, row: Row) -> None:
        self.rows.append(row)
        if not self.verbose:
            return
        if row.error:
            text = row.error
        else:
            mem = "" if row.peak_bytes is None else f"{row.peak_bytes / 2**20:8.1f} MiB"
            ratio = f"{row.ratio:7.2f}x" if row.ratio is not None else ""
            text = f"{row.seconds * 1e3:9.2f} ms {ratio} {mem}  {row.check}"
        print(f"{self.framework:>10} {self.model:>11} | {row.who:<12} {row.what:<50} | {text}", flush=True)


def as_numpy(t: Any) -> np.ndarray:
    """Float64 NumPy copy of a framework array, or the concatenation of a list/dict of them."""
    if isinstance(t, dict):
        return np.concatenate([as_numpy(a).reshape(-1) for a in t.values()])
    if isinstance(t, (list, tuple)):
        if t and not hasattr(t[0], "shape"):
            return np.asarray(t, dtype=np.float64)
        return np.concatenate([as_numpy(a).reshape(-1) for a in t])
    if hasattr(t, "detach"):
        t = t.detach().cpu()
    elif hasattr(t, "numpy") and not isinstance(t, np.ndarray):
        t = t.numpy()
    return np.asarray(t, dtype=np.float64)


def estimate(est: Any) -> Any:
    """An ``mh.Estimate`` as ``(value, std_error)`` for a scalar with a spread, else the value."""
    value = as_numpy(est.value)
    if value.ndim == 0:
        se = float(est.std_error)
        if se == se and se > 0:
            return value, se
    return value


STEPS = 20
"""Lanczos steps and power iterations of the fixed-length eigenvalue rows."""

CONVERGED_STEPS = 150
"""Lanczos steps of the reference top eigenvalue."""

EIGEN_TOL = 0.01
"""Twenty Lanczos steps or power iterations, against Lanczos run to convergence: "unconverged" beyond 1 %."""

EIGEN_RTOL = 1e-3
"""The accuracy the ``eigen_tol`` rows ask for: PyHessian's default ``tol``."""

DENSITY_PROBES = 2
"""Starting vectors of the spectral density rows (``STEPS`` Lanczos steps each)."""

DENSITY_TOL = 0.05
"""The density's largest node in magnitude against the converged top eigenvalue: "unconverged" beyond 5 %."""


def top_node(nodes: Any) -> np.ndarray:
    """The quadrature node of largest magnitude (the density's top Ritz value), as a 1-entry array."""
    flat = np.concatenate([np.ravel(np.asarray(n, dtype=np.float64)) for n in nodes])
    return flat[np.argmax(np.abs(flat))][None]


def top_eigenvalue_rows(bench: Bench, H: Any) -> None:
    """The top eigenvalue by ``mh.eigvalsh``: 20 Lanczos steps, and to a tolerance, against a converged reference."""
    import multihess as mh

    try:
        top = mh.eigvalsh(H, k=1, which="magnitude", num_iterations=CONVERGED_STEPS)
        for quantity in ("eigen", "eigen_tol", "density"):
            bench.reference(quantity, as_numpy(top).reshape(-1)[:1], source="mh.eigvalsh to convergence")
    except Exception:
        pass
    # A fixed number of steps, then a residual tolerance, which bounds the eigenvalue's error by tol · ‖H‖
    # (and tol² · ‖H‖ / gap).
    for quantity, what, options, tol in (
        (
            "eigen",
            f"mh.eigvalsh(H, k=1, which='magnitude'), {STEPS} Lanczos steps",
            {"num_iterations": STEPS, "tol": 1e-30},
            EIGEN_TOL,
        ),
        ("eigen_tol", f"mh.eigvalsh(H, k=1, which='magnitude', tol={EIGEN_RTOL:g})", {"tol": EIGEN_RTOL}, EIGEN_RTOL),
    ):
        bench.add(
            quantity,
            "multihess",
            what,
            lambda options=options: mh.eigvalsh(H, k=1, which="magnitude", **options),
            lambda out: np.asarray(out).reshape(-1)[:1],
            tol=tol,
        )
    bench.add(
        "density",
        "multihess",
        f"mh.spectral_density(H, num_probes={DENSITY_PROBES}, num_steps={STEPS})",
        lambda: mh.spectral_density(H, num_probes=DENSITY_PROBES, num_steps=STEPS),
        lambda out: top_node(out.nodes),
        tol=DENSITY_TOL,
    )


def matched_lanczos_row(bench: Bench, H: Any, peer: str, value: float) -> None:
    """Lanczos with the fewest steps whose top eigenvalue is as accurate as a peer's ``value``: time at equal accuracy.

    The steps are found against the converged reference, as the peer's
    accuracy is: 2, 3, ... up to :data:`STEPS`.  No row when Lanczos needs
    more (or there is no reference).
    """
    import multihess as mh

    ref = bench.refs.get("eigen_tol")
    if ref is None:
        return
    truth = float(ref.value.reshape(-1)[0])
    error = abs(value - truth) / max(abs(truth), 1e-30)

    def lanczos(steps: int) -> Any:  # a tolerance no run of this length meets, on purpose
        return mh.eigvalsh(H, k=1, which="magnitude", num_iterations=steps, tol=1e-30)

    def top(steps: int) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(np.asarray(lanczos(steps))[0])

    steps = next((m for m in range(2, STEPS + 1) if abs(top(m) - truth) <= error * abs(truth)), None)
    if steps is None:
        return
    bench.add(
        "eigen_tol",
        "multihess",
        f"mh.eigvalsh(H, k=1, which='magnitude', num_iterations={steps}, tol=1e-30): "
        f"the fewest Lanczos steps as accurate as {peer} (rel {error:.0e})",
        lambda: lanczos(steps),
        lambda out: np.asarray(out).reshape(-1)[:1],
        tol=error * (1 + 1e-9),
    )
