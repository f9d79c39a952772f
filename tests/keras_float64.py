"""Keras layers in float64 for tests that compare with float64 oracles."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras


@contextlib.contextmanager
def float64_layers() -> Iterator[None]:
    """Layers built inside compute and store in float64; the global default is restored afterwards."""
    # Keras fixes its global dtype policy when the first layer is built: set and restore it too.
    before, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(before)
        keras.config.set_dtype_policy(policy)
