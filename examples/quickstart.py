"""A small network in every installed framework: HVP, GGN-vector product, dense Hessian.

Each result is compared with a central finite difference of gradients, so the
script also shows that the numbers are right.  Run: ``python examples/quickstart.py``.
"""

from __future__ import annotations

import importlib.util

import numpy as np

import multihess as mh

RNG = np.random.default_rng(0)
X = RNG.standard_normal((32, 4))
Y = RNG.integers(0, 3, size=32)
V = RNG.standard_normal(4 * 8 + 8 + 8 * 3 + 3)


def report(framework: str, H, G, fd, v) -> None:
    backend = mh.get_backend(framework)
    hv, gv, fdv = (np.asarray(backend.to_numpy(op @ v)) for op in (H, G, fd))
    dense = np.asarray(backend.to_numpy(H.dense()))
    error = np.linalg.norm(hv - fdv) / np.linalg.norm(fdv)
    print(f"{framework:>10}: {H.shape[0]} parameters | ‖Hv‖={np.linalg.norm(hv):.6f} ‖Gv‖={np.linalg.norm(gv):.6f}")
    print(f"{'':>10}  Hv vs finite differences: rel. error {error:.1e}")
    top = np.linalg.eigvalsh(dense)[-1]
    print(f"{'':>10}  dense Hessian symmetric: {np.allclose(dense, dense.T)}; top eigenvalue {top:.6f}")
    # Central differences in float64 agree to ~1e-8; anything worse is a wrong product.
    if error > 1e-6 or not np.allclose(dense @ np.asarray(backend.to_numpy(v)), hv, rtol=1e-8, atol=1e-10):
        raise SystemExit(f"{framework}: products disagree (rel. error {error:.1e})")


def run_torch() -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    data = (torch.from_numpy(X), torch.from_numpy(Y))
    v = torch.from_numpy(V)
    H = mh.hessian(model, data=data, loss="cross_entropy")
    G = mh.ggn(model, data=data, loss="cross_entropy")
    fd = mh.finite_difference_hessian(model, data=data, loss="cross_entropy")
    report("torch", H, G, fd, v)


def run_jax() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    def apply_fn(params, x):
        return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

    params = {
        "w1": jnp.asarray(RNG.standard_normal((4, 8)) / 2),
        "b1": jnp.zeros(8),
        "w2": jnp.asarray(RNG.standard_normal((8, 3)) / 3),
        "b2": jnp.zeros(3),
    }
    data = (jnp.asarray(X), jnp.asarray(Y))
    H = mh.hessian(apply_fn, params, data=data, loss="cross_entropy")
    G = mh.ggn(apply_fn, params, data=data, loss="cross_entropy")
    fd = mh.finite_difference_hessian(apply_fn, params, data=data, loss="cross_entropy")
    report("jax", H, G, fd, jnp.asarray(V))


def run_tensorflow() -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    data = (tf.constant(X), tf.constant(Y))
    H = mh.hessian(model, data=data, loss="cross_entropy")
    G = mh.ggn(model, data=data, loss="cross_entropy")
    fd = mh.finite_difference_hessian(model, data=data, loss="cross_entropy")
    report("tensorflow", H, G, fd, tf.constant(V))


if __name__ == "__main__":
    ran = 0
    for module, run in (("torch", run_torch), ("jax", run_jax), ("tensorflow", run_tensorflow)):
        if importlib.util.find_spec(module) is None:
            print(f"{module:>10}: not installed, skipped")
            continue
        run()
        ran += 1
    if not ran:
        raise SystemExit("no framework installed: pip install torch==2.13.0 jax tensorflow-cpu")
