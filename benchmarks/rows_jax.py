"""JAX rows: multihess beside hand-written ``jax.jit`` code.

Hand-written products, each compiled once with ``jax.jit`` and called on the
same parameters, batch and vectors:

* HVP: forward-over-reverse ``jvp(grad(f))`` and reverse-over-reverse ``vjp(grad(f))``.
* GGN: ``jvp`` of the network, the analytic softmax Hessian, ``vjp``.
* 10-probe trace: ``vmap`` over the probes of either HVP.
* Exact GGN diagonal: per-sample gradients (``vmap``) through the columns of
  the square root of the softmax Hessian, ``lax.map`` over the classes.
* Dense last-layer block: ``jax.hessian``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from harness import Bench, as_numpy, estimate, top_eigenvalue_rows
from models import Model, jax_models

import multihess as mh

PROBES = 10


def models(scale: str, device: str) -> dict[str, Model]:
    return jax_models(scale)


def sync(device: str) -> Callable[[Any], Any]:
    import jax

    def wait(out: Any) -> Any:
        # An estimate's arrays are waited for too: a diagonal stays on the device and would otherwise time its launch.
        leaves = jax.tree.leaves(out, is_leaf=lambda a: hasattr(a, "value"))
        jax.block_until_ready([(a.value, a.std_error) if hasattr(a, "value") else a for a in leaves])
        return out

    return wait


def run(name: str, spec: Model, bench: Bench) -> None:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    apply_fn, params, x, y = spec.model, spec.params, spec.x, spec.y

    def cross_entropy(z: jax.Array) -> jax.Array:
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

    def loss_of(p: Any) -> jax.Array:
        return cross_entropy(apply_fn(p, x))

    flat, unravel = ravel_pytree(params)
    n = flat.size
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.standard_normal(n), jnp.float32)
    tree_v = unravel(v)
    Z = jnp.asarray(rng.choice([-1.0, 1.0], size=(PROBES, n)), jnp.float32)
    tree_np = lambda t: as_numpy(ravel_pytree(t)[0])  # noqa: E731

    grad_fn = jax.jit(jax.grad(loss_of))
    bench.add("gradient", "hand-written", "jit(grad)", lambda: grad_fn(params))

    # --- Hessian-vector products
    fwd_rev = jax.jit(lambda p, t: jax.jvp(jax.grad(loss_of), (p,), (t,))[1])
    rev_rev = jax.jit(lambda p, t: jax.vjp(jax.grad(loss_of), p)[1](t)[0])
    bench.add("hvp", "hand-written", "jit fwd∘rev", lambda: fwd_rev(params, tree_v), tree_np)
    bench.add("hvp", "hand-written", "jit rev∘rev", lambda: rev_rev(params, tree_v), tree_np)
    H = mh.hessian(apply_fn, params, data=(x, y), loss="cross_entropy")
    G = mh.ggn(apply_fn, params, data=(x, y), loss="cross_entropy")
    bench.add("hvp", "multihess", "H @ v (operator built once)", lambda: H @ v, as_numpy)
    bench.add("hvp", "multihess", "H @ tree (operator built once)", lambda: H @ tree_v, tree_np)
    H_unchecked = mh.hessian(apply_fn, params, data=(x, y), loss="cross_entropy", check_finite=False)
    bench.add("hvp", "multihess", "H @ tree, check_finite=False", lambda: H_unchecked @ tree_v, tree_np)

    # --- GGN-vector products
    @jax.jit
    def ggn_product(p: Any, t: Any) -> Any:
        f = lambda q: apply_fn(q, x)  # noqa: E731
        z, jv = jax.jvp(f, (p,), (t,))
        prob = jax.nn.softmax(z)
        hz = prob * (jv - jnp.sum(prob * jv, axis=1, keepdims=True)) / z.shape[0]
        return jax.vjp(f, p)[1](hz)[0]

    bench.add("ggn", "hand-written", "jit jvp, H_z, vjp", lambda: ggn_product(params, tree_v), tree_np)
    bench.add("ggn", "multihess", "G @ v (operator built once)", lambda: G @ v, as_numpy)
    bench.add("ggn", "multihess", "G @ tree (operator built once)", lambda: G @ tree_v, tree_np)
    G_unchecked = mh.ggn(apply_fn, params, data=(x, y), loss="cross_entropy", check_finite=False)
    bench.add("ggn", "multihess", "G @ tree, check_finite=False", lambda: G_unchecked @ tree_v, tree_np)

    # --- 10-probe traces on the same probes Z; checked against multihess products with Z
    try:
        bench.reference("trace", (as_numpy(H.matmat(Z.T)).T * as_numpy(Z)).sum(1), source="multihess H.matmat(Z)")
    except Exception:
        pass
    g_flat = lambda w: jax.grad(lambda q: loss_of(unravel(q)))(w)  # noqa: E731
    trace_fwd = jax.jit(lambda w, Z: jnp.sum(jax.vmap(lambda z: jax.jvp(g_flat, (w,), (z,))[1])(Z) * Z, axis=1))
    trace_rev = jax.jit(lambda w, Z: jnp.sum(jax.vmap(jax.vjp(g_flat, w)[1])(Z)[0] * Z, axis=1))
    bench.add("trace", "hand-written", "jit vmap over probes, fwd∘rev", lambda: trace_fwd(flat, Z), as_numpy)
    bench.add("trace", "hand-written", "jit vmap over probes, rev∘rev", lambda: trace_rev(flat, Z), as_numpy)
    ref = bench.refs.get("trace")
    if ref is not None:
        bench.reference("trace_estimate", ref.value.mean(), ref.value.std(ddof=1) / np.sqrt(PROBES), ref.source)
    bench.add(
        "trace",
        "multihess",
        "mh.trace(H, 10), Hutchinson",
        lambda: mh.trace(H, num_probes=PROBES, seed=0),
        estimate,
        check_as="trace_estimate",
    )

    # --- exact GGN diagonal and trace
    @jax.jit
    def ggn_diag(p: Any) -> Any:
        prob = jax.nn.softmax(apply_fn(p, x))
        scale = 1.0 / np.sqrt(x.shape[0])

        def per_sample(q: Any, xn: jax.Array, sn: jax.Array) -> jax.Array:
            return jnp.sum(apply_fn(q, xn[None])[0] * sn)

        def per_class(c: jax.Array) -> Any:
            root = jnp.sqrt(prob[:, c])[:, None]
            s = root * (jax.nn.one_hot(c, prob.shape[1]) - prob) * scale  # column c of √H_z per sample
            g = jax.vmap(jax.grad(per_sample), in_axes=(None, 0, 0))(p, x, s)
            return jax.tree.map(lambda t: jnp.sum(t**2, axis=0), g)

        return jax.tree.map(lambda t: t.sum(0), jax.lax.map(per_class, jnp.arange(prob.shape[1])))

    bench.add(
        "ggn_diag",
        "hand-written",
        "jit per-sample vmap(grad) through √H_z, lax.map over classes",
        lambda: ggn_diag(params),
        tree_np,
    )
    bench.add(
        "ggn_diag", "multihess", "mh.diagonal(G, method='exact')", lambda: mh.diagonal(G, method="exact"), estimate
    )
    ref = bench.refs.get("ggn_diag")
    if ref is not None:
        bench.reference("ggn_trace", ref.value.sum(), source=ref.source)
    bench.add("ggn_trace", "multihess", "mh.trace(G, method='exact')", lambda: mh.trace(G, method="exact"), estimate)

    # --- top eigenvalue, checked against Lanczos run to convergence
    top_eigenvalue_rows(bench, H)

    # --- dense Hessian of the last layer's block
    head = spec.head
    hand_dense = jax.jit(jax.hessian(lambda hp, p: loss_of({**p, head: hp})))

    def dense_matrix() -> Any:
        blocks = hand_dense(params[head], params)
        keys = sorted(params[head])
        sizes = {k: params[head][k].size for k in keys}
        return jnp.concatenate(
            [jnp.concatenate([blocks[a][b].reshape(sizes[a], sizes[b]) for b in keys], 1) for a in keys], 0
        )

    bench.add("dense", "hand-written", "jit(jax.hessian)", dense_matrix, as_numpy)
    H_head = mh.hessian(apply_fn, params, data=(x, y), loss="cross_entropy", params=f"{head}.*")
    bench.add(
        "dense",
        "multihess",
        f"mh.hessian(..., params='{head}.*').dense(), operator built once",
        H_head.dense,
        as_numpy,
    )
    bench.add(
        "build",
        "multihess",
        "mh.hessian(...) @ v, operator built per call",
        lambda: mh.hessian(apply_fn, params, data=(x, y), loss="cross_entropy") @ v,
        as_numpy,
        check_as="hvp",
    )
