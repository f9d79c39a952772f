"""Operators on the same JAX model share compiled programs, and only when the programs are the same.

A second operator at new parameter values must compile nothing and still
be right; a model that reads a changed global or closed-over value, or a
changed Python constant, must not run the first operator's program.  Every
product is checked against ``jax.hessian`` / ``jax.jacfwd`` in float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)

import multihess as mh  # noqa: E402
from multihess.backends import jax_programs  # noqa: E402

_compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, duration, **kwargs: _compiles.append(name) if name.endswith("backend_compile_duration") else None
)


@contextlib.contextmanager
def counted_compiles() -> Iterator[list[str]]:
    """The XLA compilations made inside the block."""
    start = len(_compiles)
    seen: list[str] = []
    yield seen
    seen.extend(_compiles[start:])


def mlp(params: dict, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def init(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.standard_normal((5, 7)) * 0.5),
        "b1": jnp.asarray(rng.standard_normal(7) * 0.1),
        "w2": jnp.asarray(rng.standard_normal((7, 3)) * 0.5),
        "b2": jnp.asarray(rng.standard_normal(3) * 0.1),
    }


def data() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(9)
    return jnp.asarray(rng.standard_normal((11, 5))), jnp.asarray(rng.integers(0, 3, 11))


def cross_entropy(z: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))


def hessian_oracle(apply_fn, params: dict, x: jax.Array, y: jax.Array) -> np.ndarray:
    """The dense Hessian of the mean cross-entropy in the flat order of ``ravel_pytree`` (sorted keys)."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda f: cross_entropy(apply_fn(unravel(f), x), y))(flat))


def ggn_oracle(apply_fn, params: dict, x: jax.Array, y: jax.Array) -> np.ndarray:
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    z = apply_fn(params, x)
    J = np.asarray(jax.jacfwd(lambda f: apply_fn(unravel(f), x))(flat)).reshape(z.size, -1)
    p = np.asarray(jax.nn.softmax(z))
    Hz = np.zeros((z.size, z.size))
    for n in range(z.shape[0]):
        block = (np.diag(p[n]) - np.outer(p[n], p[n])) / z.shape[0]
        Hz[n * 3 : (n + 1) * 3, n * 3 : (n + 1) * 3] = block
    return J.T @ Hz @ J


def products(op, n: int) -> np.ndarray:
    v = jnp.asarray(np.random.default_rng(3).standard_normal(n))
    return np.asarray(op @ v), np.asarray(v)


def test_new_parameter_values_reuse_the_compiled_products():
    x, y = data()
    first, second = init(0), init(1)
    for make, oracle in ((mh.hessian, hessian_oracle), (mh.ggn, ggn_oracle)):
        op = make(mlp, first, data=(x, y), loss="cross_entropy")
        out, v = products(op, op.shape[1])
        np.testing.assert_allclose(out, oracle(mlp, first, x, y) @ v, rtol=1e-10, atol=1e-12)
        with counted_compiles() as compiles:
            op2 = make(mlp, second, data=(x, y), loss="cross_entropy")
            out2, v = products(op2, op2.shape[1])
        assert compiles == [], f"{make.__name__}: a new operator at new parameter values compiled {len(compiles)}x"
        np.testing.assert_allclose(out2, oracle(mlp, second, x, y) @ v, rtol=1e-10, atol=1e-12)


def test_a_changed_closed_over_array_is_not_shared():
    x, y = data()
    params = init(2)
    state = {"scale": jnp.asarray(1.0)}

    def scaled(p: dict, x: jax.Array) -> jax.Array:
        return mlp(p, x) * state["scale"]  # read at trace time, as jax.jit would

    H = mh.hessian(scaled, params, data=(x, y), loss="cross_entropy")
    out, v = products(H, H.shape[1])
    np.testing.assert_allclose(out, hessian_oracle(scaled, params, x, y) @ v, rtol=1e-10, atol=1e-12)
    state["scale"] = jnp.asarray(3.0)
    H2 = mh.hessian(scaled, params, data=(x, y), loss="cross_entropy")
    out2, v = products(H2, H2.shape[1])
    expected = hessian_oracle(scaled, params, x, y) @ v
    assert not np.allclose(out2, out, rtol=1e-3), "the scale does change the Hessian"
    np.testing.assert_allclose(out2, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [2.0])
def test_a_changed_python_constant_is_not_shared(scale: float):
    x, y = data()
    params = init(3)
    results = []
    for factor in (1.0, scale):

        def apply_fn(p: dict, x: jax.Array, factor: float = factor) -> jax.Array:
            return mlp(p, x) * factor

        H = mh.hessian(apply_fn, params, data=(x, y), loss="cross_entropy")
        out, v = products(H, H.shape[1])
        np.testing.assert_allclose(out, hessian_oracle(apply_fn, params, x, y) @ v, rtol=1e-10, atol=1e-12)
        results.append(out)
    assert not np.allclose(results[0], results[1], rtol=1e-3)


def test_changed_frozen_parameters_are_not_shared():
    """With ``params=`` a subset, the others are constants of the program: new values, new program."""
    x, y = data()
    first = init(4)
    second = {**first, "w1": first["w1"] * 2.0}
    for params in (first, second):
        H = mh.hessian(mlp, params, data=(x, y), loss="cross_entropy", params="w2")
        out = np.asarray(H.dense())
        full = hessian_oracle(mlp, params, x, y)
        # ravel_pytree order (sorted keys): b1 (7), b2 (3), w1 (35), w2 (21).
        np.testing.assert_allclose(out, full[45:, 45:], rtol=1e-10, atol=1e-12)


def test_forgotten_programs_compile_again():
    x, y = data()
    H = mh.hessian(mlp, init(5), data=(x, y), loss="cross_entropy")
    products(H, H.shape[1])
    jax_programs.forget()
    with counted_compiles() as compiles:
        H2 = mh.hessian(mlp, init(6), data=(x, y), loss="cross_entropy")
        out, v = products(H2, H2.shape[1])
    assert compiles, "nothing was remembered, so the new operator compiles its own program"
    np.testing.assert_allclose(out, hessian_oracle(mlp, init(6), x, y) @ v, rtol=1e-10, atol=1e-12)


def test_a_changed_matmul_precision_compiles_its_own_program():
    """Precision is applied when a program is lowered: the shared runner (a ``jax.jit``) keys its executables on it."""
    x, y = data()
    H = mh.hessian(mlp, init(7), data=(x, y), loss="cross_entropy")
    products(H, H.shape[1])
    with jax.default_matmul_precision("highest"), counted_compiles() as compiles:
        H2 = mh.hessian(mlp, init(8), data=(x, y), loss="cross_entropy")
        out, v = products(H2, H2.shape[1])
    assert compiles, "a program lowered under another matmul precision is not the same program"
    np.testing.assert_allclose(out, hessian_oracle(mlp, init(8), x, y) @ v, rtol=1e-10, atol=1e-12)
