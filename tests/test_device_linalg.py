"""Lanczos, power iteration, Lanczos quadrature and the sketches run on the parameters' device.

Three things are checked here, each against an oracle computed outside the
library: what crosses between host and device per step (counted at the
framework's own conversion methods), the float32 accumulation path (JAX
without x64, or any device without float64), and float16 operators.

Oracles: quadratics ``½ wᵀAw`` whose Hessian ``A = U diag(λ) Uᵀ`` is built
in NumPy from a chosen spectrum (the eigenvalues are known in closed form),
and the Hessian of a small tanh MLP computed by ``torch.autograd.functional``
in float64 on the same (rounded) weights and inputs, decomposed by
``numpy.linalg.eigvalsh``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

try:
    import jax

    jax.config.update("jax_enable_x64", True)  # before any array exists, as the other JAX tests do
except ImportError:  # pragma: no cover - JAX is a test dependency
    pass

import multihess as mh  # noqa: E402
from multihess import _lanczos, _sketch  # noqa: E402

EPS16 = float(np.finfo(np.float16).eps)  # 2⁻¹⁰ ≈ 9.8e-4
EPS32 = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------
def spectrum_matrix(spectrum: np.ndarray, seed: int = 0) -> np.ndarray:
    """``U diag(λ) Uᵀ`` for a random orthogonal ``U``: a symmetric matrix with exactly this spectrum."""
    n = spectrum.size
    U = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0]
    A = (U * spectrum) @ U.T
    return (A + A.T) / 2


def torch_quadratic(A: np.ndarray, dtype: torch.dtype = torch.float64):
    """The Hessian operator of ``½ wᵀAw`` in PyTorch (``A`` rounded to ``dtype``)."""
    At = torch.as_tensor(A).to(dtype)
    return mh.hessian(lambda w: 0.5 * w @ (At @ w), torch.zeros(A.shape[0], dtype=dtype))


def mlp_problem(dtype: torch.dtype) -> tuple[mh.CurvatureOperator, np.ndarray]:
    """A 12-10-4 tanh MLP's cross-entropy Hessian in ``dtype``, and its float64 oracle on the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4)).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 12, generator=g).to(dtype)
    y = torch.randint(0, 4, (32,), generator=g)
    params = {name: p.detach().double() for name, p in model.named_parameters()}
    reference = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    sizes = [p.numel() for p in params.values()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(params, torch.split(flat, sizes)))
        tree = {name: parts[name].reshape(p.shape) for name, p in params.items()}
        out = torch.func.functional_call(reference, tree, (x.double(),))
        return nn.functional.cross_entropy(out, y)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    A = torch.autograd.functional.hessian(loss, flat).numpy()
    return mh.hessian(model, data=(x, y), loss="cross_entropy"), (A + A.T) / 2


def top(values: np.ndarray, k: int) -> np.ndarray:
    return np.sort(values)[::-1][:k]


# ----------------------------------------------------------------------
# Counting what crosses between host and device
# ----------------------------------------------------------------------
_READS = ("numpy", "item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__array__")


class HostTraffic(TorchFunctionMode):
    """Every read of a torch tensor's values on the host, with its number of entries, outside products.

    Reads happen through ``Tensor.numpy``, ``item``, ``tolist``, ``float()``,
    ``bool()`` and NumPy's ``__array__``; whatever route the code takes, one
    of these sees it.  Sends are counted at ``backend.asarray``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []
        self.sends: list[int] = []
        self.products = 0
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS and not self.paused and isinstance(args[0], torch.Tensor):
            self.reads.append(int(args[0].numel()))
        return func(*args, **(kwargs or {}))


@contextmanager
def torch_traffic(op: mh.CurvatureOperator, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostTraffic]:
    traffic = HostTraffic()
    product, asarray = op._matmat_rows, op.backend.asarray

    def counted_product(V):
        traffic.products += 1
        traffic.paused = True  # what a product does inside is the operator's business, not the Krylov code's
        try:
            return product(V)
        finally:
            traffic.paused = False

    def counted_asarray(a, like):
        traffic.sends.append(int(np.asarray(a).size))
        return asarray(a, like)

    monkeypatch.setattr(op, "_matmat_rows", counted_product)
    monkeypatch.setattr(op.backend, "asarray", counted_asarray)
    with traffic, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tol=1e-30 is not met on purpose
        yield traffic


@pytest.fixture(scope="module")
def quadratic() -> tuple[mh.CurvatureOperator, np.ndarray]:
    spectrum = np.linspace(-1.0, 4.0, 300) ** 3
    return torch_quadratic(spectrum_matrix(spectrum)), spectrum


@pytest.mark.parametrize("steps", [10, 30])
def test_lanczos_reads_a_few_scalars_per_step(quadratic, monkeypatch, steps: int) -> None:
    op, _ = quadratic
    n = op.shape[0]
    with torch_traffic(op, monkeypatch) as traffic:
        mh.eigvalsh(op, k=2, num_iterations=steps, tol=1e-30)
    assert traffic.products == steps
    # One read of three scalars (α, ‖w‖², ‖Qᵀw‖²) per Gram-Schmidt pass; a second pass is rare.
    assert max(traffic.reads) <= 3, traffic.reads
    assert steps <= len(traffic.reads) <= 2 * steps + 2
    # The start goes to the device once; nothing of length n after that.
    assert sum(size >= n for size in traffic.sends) == 1, traffic.sends


def test_eigenvectors_are_formed_on_the_device(quadratic, monkeypatch) -> None:
    op, spectrum = quadratic
    n = op.shape[0]
    with torch_traffic(op, monkeypatch) as traffic:
        values, vectors = mh.eigvalsh(op, k=3, return_eigenvectors=True)
    assert max(traffic.reads) <= 3 and sum(size >= n for size in traffic.sends) == 1
    np.testing.assert_allclose(values, top(spectrum, 3), rtol=1e-8)
    A = spectrum_matrix(spectrum)
    X = vectors.numpy()
    assert vectors.dtype == torch.float64 and X.shape == (n, 3)
    assert np.all(np.linalg.norm(A @ X - X * values, axis=0) <= 1e-6 * np.abs(spectrum).max())


def test_power_iteration_reads_a_few_scalars_per_step(quadratic, monkeypatch) -> None:
    op, _ = quadratic
    with torch_traffic(op, monkeypatch) as traffic:
        mh.eigvalsh(op, k=2, method="power", num_iterations=15, tol=1e-30)
    assert traffic.products == 30
    assert max(traffic.reads) <= 3 and len(traffic.reads) <= traffic.products + 4
    assert sum(size >= op.shape[0] for size in traffic.sends) == 2  # one start per eigenvalue


def test_quadrature_reads_a_few_scalars_per_start_and_step(quadratic, monkeypatch) -> None:
    op, spectrum = quadratic
    probes, steps = 4, 12
    with torch_traffic(op, monkeypatch) as traffic:
        sd = mh.spectral_density(op, num_probes=probes, num_steps=steps, seed=1)
    assert traffic.products == steps
    assert max(traffic.reads) <= 3 * probes and len(traffic.reads) <= 2 * steps
    assert sum(size >= op.shape[0] for size in traffic.sends) == 1  # every start, in one transfer
    # Gauss quadrature: nodes inside the spectrum, weights summing to 1.
    assert spectrum.min() - 1e-9 <= sd.nodes.min() and sd.nodes.max() <= spectrum.max() + 1e-9
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("method", ["xtrace", "hutch++"])
def test_sketches_keep_tall_matrices_on_the_device(method: str, monkeypatch) -> None:
    # Rank 6 < 10 test vectors: the sketch captures the whole range, the estimate is exact.  What comes
    # back is at most s × (3s + r) = 400 numbers, below n.
    n, rank = 600, 6
    spectrum = np.concatenate([np.random.default_rng(3).uniform(0.5, 3.0, rank), np.zeros(n - rank)])
    op = torch_quadratic(spectrum_matrix(spectrum))
    rng = np.random.default_rng(0)
    with torch_traffic(op, monkeypatch) as traffic:
        if method == "xtrace":
            sketch = _sketch.exchangeable_sketch(op, rng, 10, "gaussian", 2**30)
            value = float(np.mean(sketch.trace_samples()))
        else:
            low_rank, samples = _sketch.hutch_plus_plus(op, rng, 30, "gaussian", 2**30)
            value = low_rank + float(np.mean(samples))
    assert max(traffic.reads) < n, traffic.reads  # only small matrices come back
    assert sum(size >= n for size in traffic.sends) == (1 if method == "xtrace" else 2)
    assert value == pytest.approx(spectrum.sum(), rel=1e-10)


def test_xdiag_estimate_on_the_device() -> None:
    # More Gaussian test vectors than dimensions: the sketch spans everything, the diagonal is exact.
    n = 30
    A = spectrum_matrix(np.linspace(-2.0, 5.0, n), seed=5)
    op = torch_quadratic(A)
    sketch = _sketch.exchangeable_sketch(op, np.random.default_rng(1), 2 * n + 2, "gaussian", 2**30)
    mean, error = sketch.diagonal_estimate()
    assert isinstance(mean, torch.Tensor) and mean.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), np.diag(A), rtol=0, atol=1e-10 * np.abs(A).max())
    assert float(error.max()) <= 1e-10 * np.abs(A).max()


def test_lanczos_on_other_frameworks_reads_a_few_scalars_per_step(monkeypatch) -> None:
    # JAX and TensorFlow arrays are immutable: the basis grows in blocks (merged as it grows).
    steps = 40
    spectrum = np.linspace(-1.0, 4.0, 120) ** 3
    A = spectrum_matrix(spectrum)
    operators = {
        name: framework_quadratic(A, name, dtype) for name, dtype in [("jax", "float32"), ("tensorflow", "float64")]
    }
    eager_passes = []
    eager_pass = _lanczos.Rows._pass
    monkeypatch.setattr(
        _lanczos.Rows, "_pass", lambda self, w, parts: eager_passes.append(len(parts)) or eager_pass(self, w, parts)
    )
    for name, op in operators.items():
        reads, sends = [], []
        eager_passes.clear()
        backend = op.backend
        to_numpy, asarray = backend.to_numpy, backend.asarray

        def counted_to_numpy(x, reads=reads, to_numpy=to_numpy):
            out = to_numpy(x)
            reads.append(int(np.size(out)))
            return out

        def counted_asarray(a, like, sends=sends, asarray=asarray):
            sends.append(int(np.size(a)))
            return asarray(a, like)

        monkeypatch.setattr(backend, "to_numpy", counted_to_numpy)
        monkeypatch.setattr(backend, "asarray", counted_asarray)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            values = mh.eigvalsh(op, k=3, num_iterations=steps, tol=1e-30)
        assert max(reads) <= 3 and steps <= len(reads) <= 2 * steps + 2, name
        assert sum(size >= A.shape[0] for size in sends) == 1, name
        # The passes against the last two vectors run compiled; op by op only the rarer full passes.
        assert len(eager_passes) <= steps // 2, (name, eager_passes)
        # 40 steps on 120 well separated values: the top three are converged.
        rtol = 1e-5 if name == "jax" else 1e-10
        np.testing.assert_allclose(values, top(spectrum, 3), rtol=rtol, err_msg=name)


def test_lanczos_solves_the_tridiagonal_problem_once_when_the_tolerance_is_out_of_reach(quadratic, monkeypatch) -> None:
    op, spectrum = quadratic
    solves = []
    eigh = np.linalg.eigh
    monkeypatch.setattr(_lanczos.np.linalg, "eigh", lambda T: solves.append(len(T)) or eigh(T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tol=1e-30 is below what float64 resolves
        values = mh.eigvalsh(op, k=1, num_iterations=30, tol=1e-30)
    assert solves == [30]
    solves.clear()
    converged = mh.eigvalsh(op, k=1, num_iterations=200, tol=1e-10)  # reachable: checked as it goes
    assert len(solves) > 1
    np.testing.assert_allclose(converged, top(spectrum, 1), rtol=1e-9)
    np.testing.assert_allclose(values, top(spectrum, 1), rtol=1e-3)  # the same Krylov space, 30 steps


def test_immutable_basis_joins_rows_only_when_the_whole_basis_is_read(monkeypatch) -> None:
    # JAX arrays take no item assignment: rows are kept as they come.  Oracle: the same rows stacked in NumPy.
    jnp = pytest.importorskip("jax.numpy")
    backend = mh.get_backend("jax")
    n, rng = 50, np.random.default_rng(0)
    rows = rng.standard_normal((23, n))
    device = _lanczos.Device.of(backend, jnp.zeros(n))
    basis = _lanczos.Rows(device, (), n, 4)
    assert not device.writable
    joins = []
    concat = device.xp.concat

    def counted(arrays, axis=0):
        joins.append(len(arrays))
        return concat(arrays, axis=axis)

    monkeypatch.setattr(device.xp, "concat", counted)

    def stacked(parts) -> np.ndarray:
        return np.concatenate([np.asarray(p) for p in parts], axis=-2)

    for i in range(20):
        basis.append(jnp.asarray(rows[i : i + 1]))
        np.testing.assert_array_equal(stacked(basis.recent(2)), rows[max(0, i - 1) : i + 1])
    assert joins == []  # 20 steps against the last two rows join nothing
    np.testing.assert_array_equal(stacked(basis.parts()), rows[:20])
    assert joins == [19]  # the whole basis was read: every row but the newest, joined once
    assert [p.shape[0] for p in basis.parts()] == [19, 1]  # the newest row stays apart
    for i in range(20, 23):
        basis.append(jnp.asarray(rows[i : i + 1]))
        np.testing.assert_array_equal(stacked(basis._older()), rows[:i])
        np.testing.assert_array_equal(stacked(basis.recent(3)), rows[i - 2 : i + 1])
    sizes = [p.shape[0] for p in basis.parts()]
    assert sizes[-1] == 1 and all(a > 2 * b for a, b in zip(sizes[:-2], sizes[1:-1])), sizes
    np.testing.assert_array_equal(stacked(basis.parts()), rows)
    np.testing.assert_allclose(np.asarray(basis.combine(np.eye(23)[:2])), rows[:2], rtol=1e-15)


# ----------------------------------------------------------------------
# Repeated eigenvalues across several blocks and buffer growths
# ----------------------------------------------------------------------
def framework_quadratic(A: np.ndarray, framework: str, dtype: str = "float64") -> mh.CurvatureOperator:
    """The Hessian operator of ``½ wᵀAw`` in ``framework``, in ``dtype``."""
    n = A.shape[0]
    if framework == "torch":
        return torch_quadratic(A, getattr(torch, dtype))
    if framework == "jax":
        jax = pytest.importorskip("jax")
        if dtype == "float64" and not jax.config.jax_enable_x64:
            pytest.skip("float64 JAX arrays need jax_enable_x64")
        A_j = jax.numpy.asarray(A, dtype=dtype)
        return mh.hessian(lambda w: 0.5 * w @ (A_j @ w), jax.numpy.zeros(n, dtype=dtype))
    tf = pytest.importorskip("tensorflow")
    A_t = tf.constant(A, dtype=dtype)

    def quadratic(w):
        row = tf.reshape(w, (1, n))
        return 0.5 * tf.reduce_sum((row @ A_t) * row)

    return mh.hessian(quadratic, tf.zeros(n, dtype=dtype))


@pytest.mark.parametrize("framework", ["torch", "jax", "tensorflow"])
def test_repeated_eigenvalues_across_many_restarts(framework: str) -> None:
    # Five distinct values, eight times each: every Krylov space is invariant after five steps, so the
    # ten wanted values take eight restarts and the whole space.  The basis grows past a buffer's
    # first capacity (32 rows) and through several merged blocks.
    spectrum = np.repeat([5.0, 4.0, -4.5, 1.0, 0.0], 8)
    op = framework_quadratic(spectrum_matrix(spectrum, seed=2), framework)
    for which in ("largest", "magnitude"):
        key = spectrum if which == "largest" else np.abs(spectrum)
        expected = spectrum[np.argsort(-key, kind="stable")[:10]]
        values = mh.eigvalsh(op, k=10, which=which)
        np.testing.assert_allclose(values, expected, rtol=1e-8, atol=1e-12, err_msg=which)


# ----------------------------------------------------------------------
# Partial reorthogonalization keeps the basis semi-orthogonal
# ----------------------------------------------------------------------
def lanczos_basis(op: mh.CurvatureOperator, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values and the Lanczos basis (rows, in float64 on the host) of all ``steps`` steps.

    The tolerance is below the resolution, so no convergence ends the run early.
    """
    apply = _lanczos.DeviceOperator(op)
    n = op.shape[0]
    rng = np.random.default_rng(seed)
    result = _lanczos.lanczos_extreme(
        apply, n, 3, "largest", steps, 1e-300, 1e-300, lambda: rng.standard_normal(n), resolution=1.0
    )
    Q = np.concatenate([np.asarray(op.backend.to_numpy(part), dtype=np.float64) for part in result.basis.parts()])
    return np.sort(result.values)[::-1], Q


def full_passes(monkeypatch) -> list[int]:
    """Counts the Gram-Schmidt passes against the whole basis (``recent=None``), by basis size."""
    passes: list[int] = []
    orthogonalize = _lanczos.Rows.orthogonalize

    def counted(self, w, active=None, recent=None):
        if recent is None:
            passes.append(self.size)
        return orthogonalize(self, w, active, recent)

    monkeypatch.setattr(_lanczos.Rows, "orthogonalize", counted)
    return passes


@pytest.mark.parametrize(
    ("framework", "dtype"), [("torch", "float64"), ("torch", "float32"), ("jax", "float32"), ("tensorflow", "float64")]
)
def test_partial_reorthogonalization_keeps_the_basis_semi_orthogonal(monkeypatch, framework: str, dtype: str) -> None:
    # Three outliers above a bulk: their Ritz values converge within a few steps, after which plain
    # Lanczos loses orthogonality completely (checked below) and finds spurious copies of them.
    spectrum = np.r_[10.0, 9.9, 9.8, np.random.default_rng(1).uniform(-1.0, 1.0, 400)]
    op = framework_quadratic(spectrum_matrix(spectrum, seed=3), framework, dtype)
    eps = _lanczos.DeviceOperator(op).eps
    steps = 80
    passes = full_passes(monkeypatch)
    values, Q = lanczos_basis(op, steps)
    assert Q.shape == (steps, op.shape[0])
    assert np.max(np.abs(Q @ Q.T - np.eye(steps))) <= np.sqrt(eps)
    # The Ritz values are A's to the products' precision (float64 oracle: the chosen spectrum).
    np.testing.assert_allclose(values[:3], [10.0, 9.9, 9.8], rtol=0, atol=100 * eps * 10.0)
    assert values[3] <= spectrum[3:].max() + 100 * eps * 10.0  # no spurious copies of the outliers
    # Reorthogonalizing only when the bounds call for it: a fraction of the steps go over the whole basis.
    assert 0 < len(passes) <= steps // 3, passes

    # Without any reorthogonalization the same run is far from orthogonal: the check above can fail.
    monkeypatch.setattr(_lanczos.Semiorthogonality, "bound", lambda self, *args, **kwargs: 0.0)
    monkeypatch.setattr(_lanczos.Semiorthogonality, "accept", lambda self, reorthogonalized: None)
    _, Q_plain = lanczos_basis(op, steps)
    assert np.max(np.abs(Q_plain @ Q_plain.T - np.eye(steps))) > 0.1


@pytest.mark.parametrize("framework", ["torch", "jax", "tensorflow"])
def test_quadrature_keeps_every_basis_semi_orthogonal(monkeypatch, framework: str) -> None:
    spectrum = np.r_[10.0, 9.9, 9.8, np.random.default_rng(1).uniform(-1.0, 1.0, 400)]
    op = framework_quadratic(spectrum_matrix(spectrum, seed=3), framework, "float32")
    apply = _lanczos.DeviceOperator(op)
    made = []
    monkeypatch.setattr(_lanczos.Rows, "__init__", keep_made(made, _lanczos.Rows.__init__))
    passes = full_passes(monkeypatch)
    steps, p = 60, 3
    starts = np.random.default_rng(0).choice([-1.0, 1.0], size=(p, op.shape[0]))
    nodes, weights = _lanczos.lanczos_quadrature(apply, starts, steps, breakdown=1e-300)
    (basis,) = made
    Q = np.concatenate([np.asarray(op.backend.to_numpy(part), dtype=np.float64) for part in basis.parts()], axis=1)
    assert Q.shape == (p, steps, op.shape[0])
    for i in range(p):
        assert np.max(np.abs(Q[i] @ Q[i].T - np.eye(steps))) <= np.sqrt(apply.eps), i
        # Each outlier once among the nodes (a lost orthogonality repeats them), to the products' precision.
        outliers = np.sort(nodes[i][nodes[i] > 5.0])[::-1]
        np.testing.assert_allclose(outliers, [10.0, 9.9, 9.8], rtol=0, atol=1e-4)
    np.testing.assert_allclose(weights.sum(axis=1), np.sum(starts**2, axis=1), rtol=1e-10)
    assert 0 < len(passes) <= steps // 3, passes


def keep_made(made: list, init_rows: Callable[..., None]) -> Callable[..., None]:
    """``Rows.__init__`` (passed as ``init_rows``), recording every instance in ``made``."""

    def init(self, *args, **kwargs) -> None:
        init_rows(self, *args, **kwargs)
        made.append(self)

    return init


def test_semiorthogonality_bounds_the_inner_products() -> None:
    # The bounds, recomputed from the very α and β of a run without reorthogonalization, against the
    # inner products measured on its basis: a bound that underestimates would let rounding through.
    spectrum = np.r_[10.0, 9.9, np.linspace(-1.0, 1.0, 200)]
    A = spectrum_matrix(spectrum, seed=4)
    n, steps = A.shape[0], 40
    rng = np.random.default_rng(0)
    q = rng.standard_normal(n)
    Q, alpha, beta = [q / np.linalg.norm(q)], [], []
    omega = _lanczos.Semiorthogonality(float(np.finfo(np.float64).eps))
    checked: list[int] = []
    for j in range(steps):
        w = A @ Q[-1] - (beta[-1] * Q[-2] if beta else 0.0)
        alpha.append(float(Q[-1] @ w))
        w = w - alpha[-1] * Q[-1]
        for recent in Q[-2:]:  # what is left on the last two vectors, as the local pass removes it
            w -= (recent @ w) * recent
        b = float(np.linalg.norm(w))
        bound = omega.bound(alpha, beta, b, scale=10.0)
        omega.accept(reorthogonalized=False)
        older = np.array(Q[:-2]).reshape(-1, n)  # the vectors the local pass left alone
        measured = np.max(np.abs(older @ (w / b)), initial=0.0)
        if measured > 1e-2:  # orthogonality is lost: the recurrence no longer models anything
            break
        if measured > 1e-12:  # above rounding: a bound, and not so loose that it reorthogonalizes for nothing
            assert measured <= bound <= 1e3 * measured, (j, bound, measured)
            checked.append(j)
        beta.append(b)
        Q.append(w / b)
    assert len(checked) >= 5, checked  # the loss of orthogonality went through that range


# ----------------------------------------------------------------------
# The float32 accumulation path
# ----------------------------------------------------------------------
def test_float32_accumulation_in_torch(monkeypatch) -> None:
    # A device without float64 (Apple's MPS) accumulates in float32: forced here on the CPU.
    monkeypatch.setattr(_lanczos, "accumulation_dtype", lambda xp, like: xp.float32)
    op, A = mlp_problem(torch.float32)
    assert _lanczos.DeviceOperator(op).device.dtype == torch.float32
    oracle = np.linalg.eigvalsh(A)
    scale = np.abs(oracle).max()
    values, vectors = mh.eigvalsh(op, k=3, return_eigenvectors=True)
    # Within the float32 tolerance of the conformance suite: the products' rounding, a few hundred ε.
    np.testing.assert_allclose(values, top(oracle, 3), rtol=0, atol=1e3 * EPS32 * scale)
    assert vectors.dtype == torch.float32
    X = vectors.double().numpy()
    assert np.all(np.linalg.norm(A @ X - X * values, axis=0) <= 1e-2 * scale)
    sd = mh.spectral_density(op, num_probes=3, num_steps=20)
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, rtol=1e-6)
    assert oracle[0] - 1e-4 * scale <= sd.nodes.min() and sd.nodes.max() <= oracle[-1] + 1e-4 * scale


_JAX_FLOAT32 = """
import json, sys, warnings
import numpy as np
import jax, jax.numpy as jnp
import multihess as mh
from multihess._lanczos import DeviceOperator
spectrum = np.array(json.loads(sys.argv[1]))
A = np.array(json.loads(sys.argv[2]))
A_j = jnp.asarray(A, dtype=jnp.float32)
op = mh.hessian(lambda w: 0.5 * w @ (A_j @ w), jnp.zeros(A.shape[0], dtype=jnp.float32))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    values = mh.eigvalsh(op, k=4)
    magnitude = mh.eigvalsh(op, k=4, which="magnitude")
    power = mh.eigvalsh(op, k=2, method="power")
    sd = mh.spectral_density(op, num_probes=3, num_steps=A.shape[0])
print(json.dumps({
    "x64": bool(jax.config.jax_enable_x64),
    "dtype": str(DeviceOperator(op).device.dtype),
    "values": values.tolist(), "magnitude": magnitude.tolist(), "power": power.tolist(),
    "nodes": sd.nodes.tolist(), "weights": sd.weights.tolist(),
    "warnings": [str(w.message) for w in caught],
}))
"""


def test_float32_accumulation_in_jax_without_x64() -> None:
    # JAX without jax_enable_x64 has no float64: the Krylov code must find that and accumulate in float32.
    # A fresh process, since other tests switch x64 on for the whole process.
    pytest.importorskip("jax")
    import json

    spectrum = np.concatenate([[6.0, -5.5, 4.0, 3.5, 3.0], np.linspace(-2.0, 2.0, 45)])
    A = spectrum_matrix(spectrum, seed=7)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_JAX_FLOAT32), json.dumps(spectrum.tolist()), json.dumps(A.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert not out["x64"] and out["dtype"] == "float32"
    assert out["warnings"] == []
    # The float32 rounding of A moves its eigenvalues by about ε₃₂ ‖A‖; the products add a few ε₃₂ ‖A‖.
    atol = 1e2 * EPS32 * 6.0
    np.testing.assert_allclose(out["values"], [6.0, 4.0, 3.5, 3.0], rtol=0, atol=atol)
    np.testing.assert_allclose(out["magnitude"], [6.0, -5.5, 4.0, 3.5], rtol=0, atol=atol)
    np.testing.assert_allclose(out["power"], [6.0, 4.0], rtol=0, atol=1e-2)  # tol √ε₃₂ on residuals
    # With n steps every node that carries weight is an eigenvalue.
    nodes, weights = np.array(out["nodes"]), np.array(out["weights"])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    carried = nodes[weights > 1e-4]
    assert np.min(np.abs(carried[:, None] - spectrum[None, :]), axis=1).max() <= 1e-3 * 6.0


# ----------------------------------------------------------------------
# float16 operators
# ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def half_mlp() -> tuple[mh.CurvatureOperator, np.ndarray]:
    return mlp_problem(torch.float16)


def test_float16_top_eigenvalues(half_mlp) -> None:
    # Products in float16 (ε₁₆ ≈ 9.8e-4), accumulation in float64.  Documented tolerance:
    # each converged value within (tol + 8 ε₁₆)·‖A‖ of the float64 truth, with tol = √ε₁₆ by default;
    # the well separated top value within 8 ε₁₆ ‖A‖ (the products' own error is about ε₁₆ ‖A‖).
    op, A = half_mlp
    oracle = np.linalg.eigvalsh(A)
    scale = np.abs(oracle).max()
    tol = float(np.sqrt(EPS16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # it converges: no warning
        values, vectors = mh.eigvalsh(op, k=3, return_eigenvectors=True)
    expected = top(oracle, 3)
    assert abs(values[0] - expected[0]) <= 8 * EPS16 * scale
    np.testing.assert_allclose(values, expected, rtol=0, atol=(tol + 8 * EPS16) * scale)
    assert vectors.dtype == torch.float16
    x = vectors[:, 0].double().numpy()
    assert np.linalg.norm(A @ x - values[0] * x) <= (tol + 8 * EPS16) * scale


def test_float16_never_claims_a_tolerance_it_cannot_reach(half_mlp) -> None:
    # 1e-6 is far below float16's rounding: the run must say it did not converge, whatever the
    # breakdowns on the way, instead of reporting Rayleigh quotients of random vectors as eigenvalues.
    op, A = half_mlp
    with pytest.warns(RuntimeWarning, match="did not reach tol=1e-06 .* below what float16 arithmetic resolves"):
        values = mh.eigvalsh(op, k=2, tol=1e-6, num_iterations=60)
    oracle = np.linalg.eigvalsh(A)
    np.testing.assert_allclose(values, top(oracle, 2), rtol=0, atol=8 * EPS16 * np.abs(oracle).max())


def test_breakdown_threshold_stays_below_the_tolerance() -> None:
    from multihess._spectral import breakdown_threshold

    for eps in (np.finfo(np.float64).eps, EPS32, EPS16, 2.0**-7):
        tol = float(np.sqrt(eps))
        assert breakdown_threshold(tol, eps) <= tol  # the default tolerance is never undercut
        assert breakdown_threshold(1e-30, eps) <= np.sqrt(eps)  # nor is a residual of √ε called rounding
    assert breakdown_threshold(1e-30, np.finfo(np.float64).eps) == pytest.approx(1e3 * np.finfo(np.float64).eps)
