"""Data streamed from a source of batches: weighting, passes, memory, formats and errors, in every framework.

The oracle for several batches is the Hessian of the loss over all samples
at once, computed by each framework's own autodiff written by hand
(``torch.autograd.functional.hessian``, ``jax.hessian``, nested
``tf.GradientTape``), or NumPy float64 closed forms.
"""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch

import multihess as mh

jax.config.update("jax_enable_x64", True)

N, D, C = 24, 3, 4
SIZES = (10, 8, 6)  # unequal batches: the weighting matters


def _numpy_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, D)), rng.integers(0, C, size=N), rng.normal(size=(D, C)) * 0.5


def _split(x, y):
    bounds = np.cumsum((0,) + SIZES)
    return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _softmax_regression_hessian(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Closed form: H = 1/N Σ_n (diag(p) − p pᵀ) ⊗ x xᵀ for logits x W (W raveled row-major)."""
    z = x @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    H = np.zeros((D * C, D * C))
    for n in range(len(x)):
        hz = np.diag(p[n]) - np.outer(p[n], p[n])
        H += np.kron(np.outer(x[n], x[n]), hz)
    return H / len(x)


# ----------------------------------------------------------------------------- weighting
def test_torch_loader_equals_the_whole_batch_for_builtin_and_callable_losses() -> None:
    x, y, w = _numpy_data()
    expected = _softmax_regression_hessian(x, w)
    model = torch.nn.Linear(D, C, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w.T))
    batches = [(torch.tensor(a), torch.tensor(b)) for a, b in _split(x, y)]
    callable_mean = lambda z, t: torch.nn.functional.cross_entropy(z, t)  # noqa: E731
    for loss in ("cross_entropy", callable_mean):
        H = mh.hessian(model, data=batches, loss=loss).dense().numpy()
        # The operator orders weight (C, D) row-major: W.T raveled; reorder the oracle to match.
        perm = np.arange(D * C).reshape(D, C).T.ravel()
        np.testing.assert_allclose(H, expected[np.ix_(perm, perm)], rtol=1e-10, atol=1e-12)
    # The sum reduction adds the batch losses.
    H_sum = mh.hessian(model, data=batches, loss="cross_entropy", reduction="sum").dense().numpy()
    perm = np.arange(D * C).reshape(D, C).T.ravel()
    np.testing.assert_allclose(H_sum, N * expected[np.ix_(perm, perm)], rtol=1e-10, atol=1e-12)


def test_jax_source_equals_jax_hessian_of_the_whole_batch() -> None:
    x, y, w = _numpy_data(1)
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def apply(params, inputs):
        return inputs @ params["w"]

    def whole(params):
        z = apply(params, xs)
        return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(N), ys])

    params = {"w": jnp.asarray(w)}
    expected = np.asarray(jax.hessian(whole)(params)["w"]["w"]).reshape(D * C, D * C)
    source = lambda: iter([(jnp.asarray(a), jnp.asarray(b)) for a, b in _split(x, y)])  # noqa: E731
    H = mh.hessian(apply, params, data=source, loss="cross_entropy").dense()
    np.testing.assert_allclose(np.asarray(H), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(expected, _softmax_regression_hessian(x, w), rtol=1e-10, atol=1e-12)


def test_tf_dataset_equals_tape_hessian_of_the_whole_batch() -> None:
    x, y, w = _numpy_data(2)
    W = tf.constant(w)

    def apply(params, inputs):
        return tf.linalg.matmul(inputs, params)

    with tf.GradientTape() as outer:
        outer.watch(W)
        with tf.GradientTape() as inner:
            inner.watch(W)
            z = apply(W, tf.constant(x))
            value = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(y), z))
        g = tf.reshape(inner.gradient(value, W), [-1])
    expected = tf.reshape(outer.jacobian(g, W), (D * C, D * C)).numpy()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)  # 10, 10, 4: unequal again
    H = mh.hessian(apply, W, data=dataset, loss="cross_entropy").dense().numpy()
    np.testing.assert_allclose(H, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- passes and memory
class CountingSource:
    """A re-iterable source that counts passes and how many of its batches are alive at once."""

    def __init__(self, num_batches: int, batch: int = 8) -> None:
        self.num_batches, self.batch = num_batches, batch
        self.passes = 0
        self.alive = 0
        self.most_alive = 0

    def _released(self) -> None:
        self.alive -= 1

    def __iter__(self):
        self.passes += 1
        rng = np.random.default_rng(0)
        for _ in range(self.num_batches):
            x = torch.tensor(rng.normal(size=(self.batch, D)))
            y = torch.tensor(rng.integers(0, C, size=self.batch))
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
            weakref.finalize(x, self._released)
            yield x, y
            del x, y


def test_estimators_make_one_pass_per_block_and_hold_few_batches() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(D, 5), torch.nn.Tanh(), torch.nn.Linear(5, C)).double()
    source = CountingSource(num_batches=40)
    H = mh.hessian(model, data=source, loss="cross_entropy")
    built = source.passes  # reading the first batch to check the model
    mh.trace(H, num_probes=10)
    assert source.passes - built == 1, "a 10-probe trace is one pass over the data"
    before = source.passes
    with pytest.warns(RuntimeWarning, match="did not reach"):  # 20 steps, no early stop
        mh.eigvalsh(H, k=1, num_iterations=20, tol=1e-30)
    assert source.passes - before <= 20, "a Lanczos step is one pass"
    gc.collect()
    assert source.most_alive <= 3, f"{source.most_alive} batches were alive at once"
    assert H.problem.passes >= 2


def test_one_shot_iterators_are_refused_unless_cached() -> None:
    model = torch.nn.Linear(D, C).double()
    x, y = torch.randn(6, D, dtype=torch.float64), torch.randint(0, C, (6,))
    generator = ((x[i : i + 2], y[i : i + 2]) for i in range(0, 6, 2))
    with pytest.raises(TypeError, match="one-shot iterator.*cache_data=True"):
        mh.hessian(model, data=generator, loss="cross_entropy")
    generator = ((x[i : i + 2], y[i : i + 2]) for i in range(0, 6, 2))
    H = mh.hessian(model, data=generator, loss="cross_entropy", cache_data=True)
    whole = mh.hessian(model, data=(x, y), loss="cross_entropy")
    np.testing.assert_allclose(H.dense().numpy(), whole.dense().numpy(), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- formats and errors
def test_dict_batches_through_batch_fn() -> None:
    model = torch.nn.Linear(D, C).double()
    x, y = torch.randn(8, D, dtype=torch.float64), torch.randint(0, C, (8,))
    records = [{"input": x[:4], "label": y[:4]}, {"input": x[4:], "label": y[4:]}]
    with pytest.raises(TypeError, match="batch_fn=lambda b"):
        mh.hessian(model, data=records, loss="cross_entropy")
    H = mh.hessian(model, data=records, loss="cross_entropy", batch_fn=lambda b: (b["input"], b["label"]))
    whole = mh.hessian(model, data=(x, y), loss="cross_entropy")
    np.testing.assert_allclose(H.dense().numpy(), whole.dense().numpy(), rtol=1e-12, atol=1e-14)


def test_bad_batches_are_named() -> None:
    model = torch.nn.Linear(D, C).double()
    x, y = torch.randn(8, D, dtype=torch.float64), torch.randint(0, C, (8,))
    with pytest.raises(ValueError, match="batch 1 of data is empty"):
        mh.hessian(model, data=[(x, y), (x[:0], y[:0])], loss="cross_entropy").dense()
    with pytest.raises(TypeError, match="y of batch 0 is a Python list"):
        mh.hessian(model, data=(x, [0, 1, 2, 3, 0, 1, 2, 3]), loss="cross_entropy")
    with pytest.raises(TypeError, match="x of batch 0 is float32 but the parameters are float64"):
        mh.hessian(model, data=(x.float(), y), loss="cross_entropy")
    with pytest.raises(ValueError, match="data is empty"):
        mh.hessian(model, data=[], loss="cross_entropy")
    wrong = [(x, y), (x, y), (torch.randn(8, D + 1, dtype=torch.float64), y)]
    H = mh.hessian(model, data=wrong, loss="cross_entropy")
    with pytest.raises(RuntimeError) as info:
        H @ torch.ones(H.shape[1], dtype=torch.float64)
    assert any("batch 2 of data" in note for note in getattr(info.value, "__notes__", []))


def test_progress_bar_over_the_batches(capsys: pytest.CaptureFixture) -> None:
    model = torch.nn.Linear(D, C).double()
    source = CountingSource(num_batches=5)
    v = torch.ones(D * C + C, dtype=torch.float64)
    mh.hessian(model, data=source, loss="cross_entropy", progress=True) @ v
    assert "pass over data" in capsys.readouterr().err
    mh.hessian(model, data=source, loss="cross_entropy", progress=False) @ v
    assert "pass over data" not in capsys.readouterr().err


class RecordedBar:
    """Stands in for tqdm: what an estimator's bar was told."""

    made: list[RecordedBar] = []

    def __init__(self, plan) -> None:
        self.desc, self.total, self.count, self.closed = plan.desc, plan.total, plan.done, False
        RecordedBar.made.append(self)

    def update(self, n: int) -> None:
        self.count += n

    def close(self) -> None:
        self.closed = True


def test_estimators_count_their_planned_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mh._progress, "_passes_bar", RecordedBar)
    RecordedBar.made = []
    model = torch.nn.Sequential(torch.nn.Linear(D, 5), torch.nn.Tanh(), torch.nn.Linear(5, C)).double()
    source = CountingSource(num_batches=3)
    H = mh.hessian(model, data=source, loss="cross_entropy", progress=True)
    before = source.passes
    with pytest.warns(RuntimeWarning, match="did not reach"):
        mh.eigvalsh(H, k=1, num_iterations=6, tol=1e-30)
    lanczos = RecordedBar.made[-1]
    assert (lanczos.desc, lanczos.total) == ("eigvalsh (lanczos)", 6)
    assert lanczos.count == source.passes - before == 6 and lanczos.closed
    # A budget of about 4 probes per product: 10 probes are 3 passes, each counted once.
    n = H.shape[0]
    budget = 4 * 2 * n * (8 + 8)
    before = source.passes
    mh.trace(H, 10, memory_budget=budget)
    hutchinson = RecordedBar.made[-1]
    assert (hutchinson.desc, hutchinson.total, hutchinson.count) == ("trace (hutchinson)", 3, 3)
    assert source.passes - before == 3
    H.dense()
    assert RecordedBar.made[-1].desc == "dense" and RecordedBar.made[-1].count == -(-n // 64)
    made = len(RecordedBar.made)
    mh.trace(mh.hessian(model, data=source, loss="cross_entropy", progress=False), 10)
    mh.trace(torch.eye(4, dtype=torch.float64), 10)  # a dense matrix makes no passes
    assert len(RecordedBar.made) == made, "no bar with progress=False, nor without passes"


def test_later_batches_are_checked_on_their_first_pass() -> None:
    model = torch.nn.Linear(D, C).double()
    x, y = torch.randn(8, D, dtype=torch.float64), torch.randint(0, C, (8,))
    bad = y.clone()
    bad[3] = C  # one class too many
    H = mh.hessian(model, data=[(x, y), (x, y), (x, bad)], loss="cross_entropy")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        H @ torch.ones(H.shape[1], dtype=torch.float64)


def test_a_loss_module_sums_over_batches_with_its_own_reduction() -> None:
    model = torch.nn.Linear(D, C).double()
    x, t = torch.randn(12, D, dtype=torch.float64), torch.randn(12, C, dtype=torch.float64)
    batches = [(x[:5], t[:5]), (x[5:], t[5:])]
    H = mh.hessian(model, data=batches, loss=torch.nn.MSELoss(reduction="sum")).dense().numpy()
    # Closed form: Σ (W x + b - t)² has Hessian 2 Σ_n [x_n; 1][x_n; 1]ᵀ ⊗ I_C, ordered weight (C, D) then bias.
    xa = np.concatenate([x.numpy(), np.ones((12, 1))], axis=1)
    gram = 2 * xa.T @ xa
    expected = np.zeros((C * (D + 1), C * (D + 1)))
    for c in range(C):
        rows = [c * D + d for d in range(D)] + [C * D + c]
        expected[np.ix_(rows, rows)] = gram
    np.testing.assert_allclose(H, expected, rtol=1e-10, atol=1e-12)
