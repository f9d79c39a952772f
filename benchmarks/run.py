"""Curvature products side by side with hand-written code, as ratios to one gradient.

Every row is timed in one process on the same batch, after warm-up, as the
median of several repeats, and divided by the time of one gradient (forward +
backward) of the same loss in the same framework.  Usage::

    python benchmarks/run.py                      # CPU, small shapes, all installed frameworks
    python benchmarks/run.py --device cuda --scale full --frameworks torch jax

PyHessian and curvlinops rows appear when those packages import.  On a CPU,
Lanczos and spectral-density rows depend on NumPy's BLAS threads: OpenBLAS
threads keep spinning after each host-side float64 product and slow down the
framework's next product on the same cores; ``OPENBLAS_NUM_THREADS=1`` avoids it.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from models import jax_mlp, torch_models

import multihess as mh

PROBES = 10
LANCZOS_STEPS = 20


def median_time(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row(model: str, what: str, seconds: float, base: float) -> None:
    print(f"{model:>12} | {what:<52} | {seconds * 1e3:9.2f} ms | {seconds / base:7.2f}x")


def bench_torch(scale: str, device: str, repeats: int, only: list[str] | None) -> None:
    import torch

    def sync(out: Any) -> Any:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    for name, (model, x, y) in torch_models(scale, device).items():
        if not only or name in only:
            bench_torch_model(name, model, x, y, sync, repeats)


def bench_torch_model(name: str, model: Any, x: Any, y: Any, sync: Callable[[Any], Any], repeats: int) -> None:
    """Rows for one PyTorch model."""
    import torch
    from torch.func import functional_call, grad, jvp, vjp, vmap

    device = x.device
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss_fn = torch.nn.functional.cross_entropy

    def loss_of(p: dict) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    def gradient() -> Any:
        return torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))

    base = median_time(gradient, sync, repeats)
    row(name, "gradient (forward + backward)", base, base)

    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    n = H.shape[0]
    rng = np.random.default_rng(0)
    v = torch.as_tensor(rng.standard_normal(n), dtype=torch.float32, device=device)
    tree_v = {k: torch.randn_like(p) for k, p in params.items()}

    row(name, "multihess HVP (amortized)", median_time(lambda: H @ v, sync, repeats), base)
    row(name, "multihess GGN-vector product (amortized)", median_time(lambda: G @ v, sync, repeats), base)

    def func_fwd_rev() -> Any:
        return jvp(grad(loss_of), (params,), (tree_v,))[1]

    try:
        row(name, "torch.func HVP fwd-over-rev (hand-written)", median_time(func_fwd_rev, sync, repeats), base)
    except Exception as err:  # the fused-attention transformer fails here
        print(f"{name:>12} | torch.func HVP fwd-over-rev: fails ({type(err).__name__}: {str(err)[:60]})")

    def double_backward() -> Any:
        ps = list(model.parameters())
        g = torch.autograd.grad(loss_fn(model(x), y), ps, create_graph=True)
        return torch.autograd.grad(g, ps, list(tree_v.values()))

    try:
        row(name, "double-backward HVP, rebuilt per product", median_time(double_backward, sync, repeats), base)
    except Exception as err:
        print(f"{name:>12} | double-backward HVP: fails ({type(err).__name__}: {str(err)[:60]})")

    # Best hand-written 10-probe trace: vmap over a VJP of the gradient, built once.
    probes = torch.as_tensor(rng.choice([-1.0, 1.0], size=(PROBES, n)), dtype=torch.float32, device=device)

    def hand_trace() -> Any:
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        sizes = [p.numel() for p in params.values()]

        def g_flat(w: torch.Tensor) -> torch.Tensor:
            parts = torch.split(w, sizes)
            p = {k: q.view(t.shape) for (k, t), q in zip(params.items(), parts)}
            return torch.cat([t.reshape(-1) for t in grad(loss_of)(p).values()])

        _, pullback = vjp(g_flat, flat)
        return (vmap(lambda z: pullback(z)[0])(probes) * probes).sum()

    try:
        row(
            name,
            f"{PROBES}-probe trace, torch.func vmap rev-over-rev",
            median_time(hand_trace, sync, repeats),
            base,
        )
    except Exception as err:
        print(f"{name:>12} | hand-written trace: fails ({type(err).__name__}: {str(err)[:60]})")

    extra_rows(name, H, G, sync, repeats, base)
    bench_torch_third_party(name, model, x, y, v, sync, repeats, base)
    row(
        name,
        "multihess operator build + first HVP",
        median_time(lambda: mh.hessian(model, data=(x, y), loss="cross_entropy") @ v, sync, max(1, repeats // 3)),
        base,
    )


def bench_torch_third_party(
    name: str, model: Any, x: Any, y: Any, v: Any, sync: Callable[[Any], Any], repeats: int, base: float
) -> None:
    """PyHessian and curvlinops on the same model and batch, where installed."""
    import torch

    loss_fn = torch.nn.functional.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    if importlib.util.find_spec("pyhessian") is not None:
        from pyhessian import hessian as pyhessian_hessian
        from pyhessian.utils import hessian_vector_product

        try:
            comp = pyhessian_hessian(model, loss_fn, data=(x, y), cuda=x.is_cuda)
            tree = [t.reshape(p.shape) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]
            row(
                name,
                "PyHessian HVP (gradient graph kept)",
                median_time(lambda: hessian_vector_product(comp.gradsH, comp.params, tree), sync, repeats),
                base,
            )
            row(
                name,
                f"PyHessian {PROBES}-probe trace",
                median_time(lambda: comp.trace(maxIter=PROBES, tol=0.0), sync, max(1, repeats // 3), 1),
                base,
            )
            row(
                name,
                f"PyHessian top eigenvalue, {LANCZOS_STEPS} power iterations",
                median_time(lambda: comp.eigenvalues(maxIter=LANCZOS_STEPS, tol=0.0), sync, max(1, repeats // 3), 1),
                base,
            )
        except Exception as err:  # the fused-attention transformer fails here
            print(f"{name:>12} | PyHessian: fails ({type(err).__name__}: {str(err)[:60]})")
    if importlib.util.find_spec("curvlinops") is not None:
        from curvlinops import GGNLinearOperator, HessianLinearOperator, hutchinson_trace

        try:
            data, criterion = [(x, y)], torch.nn.CrossEntropyLoss()  # curvlinops reads .reduction
            H = HessianLinearOperator(model, criterion, params, data, check_deterministic=False)
            G = GGNLinearOperator(model, criterion, params, data, check_deterministic=False)
            row(name, "curvlinops HVP", median_time(lambda: H @ v, sync, repeats), base)
            row(name, "curvlinops GGN-vector product", median_time(lambda: G @ v, sync, repeats), base)
            row(
                name,
                f"curvlinops {PROBES}-probe Hutchinson trace",
                median_time(lambda: hutchinson_trace(H, PROBES), sync, max(1, repeats // 3), 1),
                base,
            )
        except Exception as err:
            print(f"{name:>12} | curvlinops: fails ({type(err).__name__}: {str(err)[:60]})")


def bench_jax(repeats: int) -> None:
    import jax
    import jax.numpy as jnp

    apply_fn, params, x, y = jax_mlp()

    def loss_of(p: dict) -> jax.Array:
        z = apply_fn(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

    def sync(out: Any) -> Any:
        return jax.block_until_ready(out)

    grad_fn = jax.jit(jax.grad(loss_of))
    base = median_time(lambda: grad_fn(params), sync, repeats)
    row("jax mlp", "gradient (jit)", base, base)
    tangent = jax.tree.map(jnp.ones_like, params)
    hand_hvp = jax.jit(lambda p, t: jax.jvp(jax.grad(loss_of), (p,), (t,))[1])
    row(
        "jax mlp",
        "hand-written HVP fwd-over-rev (jit)",
        median_time(lambda: hand_hvp(params, tangent), sync, repeats),
        base,
    )

    def ggn_product(p: dict, t: dict) -> Any:
        z, jt = jax.jvp(lambda q: apply_fn(q, x), (p,), (t,))
        prob = jax.nn.softmax(z)
        hz = prob * (jt - jnp.sum(prob * jt, axis=1, keepdims=True)) / z.shape[0]
        return jax.vjp(lambda q: apply_fn(q, x), p)[1](hz)[0]

    hand_ggn = jax.jit(ggn_product)
    row(
        "jax mlp",
        "hand-written GGN-vector product (jit)",
        median_time(lambda: hand_ggn(params, tangent), sync, repeats),
        base,
    )

    H = mh.hessian(apply_fn, params, data=(x, y), loss="cross_entropy")
    G = mh.ggn(apply_fn, params, data=(x, y), loss="cross_entropy")
    v = jnp.ones(H.shape[0], dtype=jnp.float32)
    row("jax mlp", "multihess HVP", median_time(lambda: H @ v, sync, repeats), base)
    row("jax mlp", "multihess GGN-vector product", median_time(lambda: G @ v, sync, repeats), base)
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    probes = jnp.asarray(np.random.default_rng(0).choice([-1.0, 1.0], size=(PROBES, flat.size)), dtype=flat.dtype)

    @jax.jit
    def hand_trace(w: jax.Array, Z: jax.Array) -> jax.Array:
        hvp = lambda z: jax.jvp(jax.grad(lambda q: loss_of(unravel(q))), (w,), (z,))[1]
        return jnp.sum(jax.vmap(hvp)(Z) * Z) / Z.shape[0]

    row(
        "jax mlp",
        f"hand-written {PROBES}-probe trace, vmap fwd-over-rev (jit)",
        median_time(lambda: hand_trace(flat, probes), sync, repeats),
        base,
    )
    extra_rows("jax mlp", H, G, sync, repeats, base)


def extra_rows(name: str, H: Any, G: Any, sync: Callable[[Any], Any], repeats: int, base: float) -> None:
    """Estimator and eigenvalue rows shared by the JAX and TensorFlow benchmarks."""
    if hasattr(mh, "trace"):
        row(
            name,
            f"multihess {PROBES}-probe Hutchinson trace (Hessian)",
            median_time(lambda: mh.trace(H, num_probes=PROBES, seed=0), sync, repeats),
            base,
        )
        row(
            name,
            "multihess exact GGN trace",
            median_time(lambda: mh.trace(G, method="exact"), sync, max(1, repeats // 3), 1),
            base,
        )
    if hasattr(mh, "eigvalsh"):
        row(
            name,
            f"multihess top eigenvalue, {LANCZOS_STEPS} Lanczos steps",
            median_time(
                lambda: mh.eigvalsh(H, k=1, num_iterations=LANCZOS_STEPS, tol=1e-30), sync, max(1, repeats // 3), 1
            ),
            base,
        )


def bench_tensorflow(repeats: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="tanh"), keras.layers.Dense(10)])
    x = tf.random.normal((128, 784))
    y = tf.random.uniform((128,), maxval=10, dtype=tf.int32)
    lossf = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def gradient() -> Any:
        with tf.GradientTape() as tape:
            loss = lossf(y, model(x))
        return tape.gradient(loss, model.trainable_variables)

    base = median_time(gradient, lambda o: o, repeats)
    row("tf mlp", "gradient (tf.function)", base, base)
    tangents = [tf.ones_like(v) for v in model.trainable_variables]

    @tf.function
    def hand_hvp() -> Any:
        with tf.autodiff.ForwardAccumulator([v.value for v in model.trainable_variables], tangents) as acc:
            with tf.GradientTape() as tape:
                loss = lossf(y, model(x))
            g = tape.gradient(loss, model.trainable_variables)
        return acc.jvp(g)

    row("tf mlp", "hand-written HVP fwd-over-rev (tf.function)", median_time(hand_hvp, lambda o: o, repeats), base)
    H = mh.hessian(model, data=(x, y), loss="cross_entropy")
    G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    v = tf.ones(H.shape[0])
    row("tf mlp", "multihess HVP", median_time(lambda: H @ v, lambda o: o, repeats), base)
    row("tf mlp", "multihess GGN-vector product", median_time(lambda: G @ v, lambda o: o, repeats), base)
    extra_rows("tf mlp", H, G, lambda o: o, repeats, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (JAX uses its default device)")
    parser.add_argument("--scale", default="small", choices=["small", "full"])
    parser.add_argument("--frameworks", nargs="+", default=["torch", "jax", "tensorflow"])
    parser.add_argument("--models", nargs="+", default=None, help="torch models: mlp lenet5 resnet transformer")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: its own choice)")
    args = parser.parse_args()
    if args.threads and importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(args.threads)
    print(f"{'model':>12} | {'what':<52} | {'time':>12} | ratio to one gradient")
    runners = {
        "torch": lambda: bench_torch(args.scale, args.device, args.repeats, args.models),
        "jax": lambda: bench_jax(args.repeats),
        "tensorflow": lambda: bench_tensorflow(args.repeats),
    }
    for framework in args.frameworks:
        if importlib.util.find_spec(framework) is None:
            print(f"{framework}: not installed, skipped")
            continue
        runners[framework]()


if __name__ == "__main__":
    main()
