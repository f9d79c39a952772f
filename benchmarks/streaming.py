"""One Hessian-vector product over a streamed dataset, as a ratio to one hand-written gradient pass.

The dataset is a list of ``--batches`` batches (MLP 784-256-10, float32,
batches of ``--batch-size``), given to multihess as ``data=`` and iterated
once per product.  The reference is the framework's own gradient of the
sample-weighted mean loss over the same batches, compiled the usual way
(``jax.jit``, ``tf.function``, eager torch).  Both are timed after a warm-up
call, as medians of ``--repeats``.

    python benchmarks/streaming.py --frameworks torch jax tensorflow
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

SIZES = (784, 256, 10)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: compiles and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def numpy_batches(num: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        (rng.normal(size=(size, SIZES[0])).astype(np.float32), rng.integers(0, SIZES[-1], size)) for _ in range(num)
    ]


def torch_times(batches: list, repeats: int) -> tuple[float, float]:
    import torch

    import multihess as mh

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
    data = [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in batches]
    total = sum(len(y) for _, y in data)

    def gradient_pass() -> None:
        model.zero_grad()
        for x, y in data:
            (torch.nn.functional.cross_entropy(model(x), y) * (len(y) / total)).backward()

    H = mh.hessian(model, data=data, loss="cross_entropy", progress=False)
    v = torch.randn(H.shape[1])
    return median_seconds(gradient_pass, repeats), median_seconds(lambda: H @ v, repeats)


def jax_times(batches: list, repeats: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp

    import multihess as mh

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
        "l1": {"w": jax.random.normal(k1, (784, 256)) / 28.0, "b": jnp.zeros(256)},
        "l2": {"w": jax.random.normal(k2, (256, 10)) / 16.0, "b": jnp.zeros(10)},
    }

    def apply(p, x):
        return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]

    def batch_loss(p, x, y):
        z = apply(p, x)
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])

    grad = jax.jit(jax.grad(batch_loss))
    data = [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches]
    total = sum(len(y) for _, y in data)

    def gradient_pass() -> None:
        acc = None
        for x, y in data:
            share = len(y) / total
            g = jax.tree_util.tree_map(lambda a, s=share: a * s, grad(params, x, y))
            acc = g if acc is None else jax.tree_util.tree_map(jnp.add, acc, g)
        jax.block_until_ready(acc)

    H = mh.hessian(apply, params, data=data, loss="cross_entropy", progress=False)
    v = jnp.ones(H.shape[1])
    return median_seconds(gradient_pass, repeats), median_seconds(lambda: jax.block_until_ready(H @ v), repeats)


def tensorflow_times(batches: list, repeats: int) -> tuple[float, float]:
    import keras
    import tensorflow as tf

    import multihess as mh

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="tanh"), keras.layers.Dense(10)])
    data = [(tf.constant(x), tf.constant(y)) for x, y in batches]
    total = sum(len(y) for _, y in batches)

    @tf.function
    def batch_grad(x, y):
        with tf.GradientTape() as tape:
            z = model(x)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, z))
        return tape.gradient(loss, model.trainable_variables)

    def gradient_pass() -> None:
        acc = None
        for x, y in data:
            g = [t * (int(y.shape[0]) / total) for t in batch_grad(x, y)]
            acc = g if acc is None else [a + b for a, b in zip(acc, g)]
        _ = [a.numpy() for a in acc]

    H = mh.hessian(model, data=data, loss="cross_entropy", progress=False)
    v = tf.ones(H.shape[1])
    return median_seconds(gradient_pass, repeats), median_seconds(lambda: (H @ v).numpy(), repeats)


TIMERS = {"torch": torch_times, "jax": jax_times, "tensorflow": tensorflow_times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", default=list(TIMERS), choices=list(TIMERS))
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    batches = numpy_batches(args.batches, args.batch_size)
    print(f"MLP 784-256-10 float32, {args.batches} batches of {args.batch_size}, medians of {args.repeats}")
    print("| framework | gradient pass (s) | one HVP (s) | HVP / gradient |")
    print("|---|---|---|---|")
    for name in args.frameworks:
        grad_s, hvp_s = TIMERS[name](batches, args.repeats)
        print(f"| {name} | {grad_s:.3f} | {hvp_s:.3f} | {hvp_s / grad_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
