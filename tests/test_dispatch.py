"""Backend dispatch: by type, by name, by registration and by entry point."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import torch

import multihess as mh
from multihess import _dispatch
from multihess._dispatch import find_backend


class TaggedArray:
    """An array of a framework that only a registered backend knows."""

    def __init__(self, n: int) -> None:
        self.shape, self.dtype = (n,), np.dtype("float64")


class _ClaimingBackend(mh.Backend):
    """A backend that only claims objects (dispatch asks nothing else)."""

    claims: tuple[type, ...] = ()

    @property
    def xp(self) -> Any:
        return np

    def owns(self, obj: Any) -> bool:
        return isinstance(obj, self.claims)

    def is_array(self, obj: Any) -> bool:
        return isinstance(obj, self.claims)

    def to_numpy(self, x: Any) -> np.ndarray:
        raise NotImplementedError

    def asarray(self, a: np.ndarray, like: Any) -> Any:
        raise NotImplementedError

    def named_parameters(self, model: Any, weights: Any) -> list:
        raise NotImplementedError

    def bind(self, model: Any, weights: Any, selected: Any) -> Any:
        raise NotImplementedError

    def value_and_grad(self, f: Any, w: Any) -> Any:
        raise NotImplementedError

    def jvp(self, f: Any, w: Any, v: Any) -> Any:
        raise NotImplementedError

    def vjp(self, f: Any, w: Any, u: Any) -> Any:
        raise NotImplementedError

    def stop_gradient(self, x: Any) -> Any:
        return x


class TaggedBackend(_ClaimingBackend):
    name = "tagged"
    claims = (TaggedArray,)


class NumpyBackend(_ClaimingBackend):
    name = "numpy_frame"
    claims = (np.ndarray, np.generic)


class RaisingBackend(_ClaimingBackend):
    name = "raising"

    def owns(self, obj: Any) -> bool:
        raise RuntimeError("a broken owns() must not break dispatch")


@pytest.fixture
def register():
    """Register backend classes for one test; they are forgotten after it (registration is process-wide)."""
    names = []

    def add(cls: type[mh.Backend]) -> mh.Backend:
        mh.register_backend(cls)
        names.append(cls.name)
        return mh.get_backend(cls.name)

    yield add
    for name in names:
        _dispatch._registered.pop(name, None)
        _dispatch._instances.pop(name, None)


def _fn(params, x=None):
    return params


def test_numpy_only_input_names_no_framework() -> None:
    with pytest.raises(TypeError, match="could not tell which framework"):
        mh.hessian(lambda w: (w**2).sum(), np.ones(3))


def test_unknown_model_type_is_a_clear_error() -> None:
    class NotAModel:
        shape = (3,)

    with pytest.raises(TypeError, match="belongs to no known backend"):
        mh.hessian(lambda w: w, NotAModel())


def test_register_backend_by_class(register) -> None:
    from multihess.backends.torch_backend import TorchBackend

    class RenamedTorch(TorchBackend):
        name = "renamed_torch"

    register(RenamedTorch)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    H = mh.hessian(lambda w: (w**3).sum(), w, backend="renamed_torch")
    assert H.backend.name == "renamed_torch"
    # d²/dw² Σ w³ = diag(6 w)
    assert np.allclose(H.dense().numpy(), np.diag([6.0, -12.0]), rtol=0, atol=1e-12)
    # Both claim torch tensors; without backend= the built-in comes first.
    assert mh.hessian(lambda w: (w**3).sum(), w).backend.name == "torch"
    with pytest.raises(TypeError, match="Backend subclass"):
        mh.register_backend(object)


# ----------------------------------------------------------------------
# Registered backends are asked about models, parameters and data alike
# ----------------------------------------------------------------------
def test_registered_backend_claims_parameters_or_data(register) -> None:
    tagged = register(TaggedBackend)
    assert find_backend(_fn, TaggedArray(3), []) is tagged
    assert find_backend(_fn, {"a": [TaggedArray(2)], "n": 3}, []) is tagged
    # Data alone decides too, with NumPy parameters accepted alongside (they belong to no framework).
    assert find_backend(_fn, np.ones(3), [TaggedArray(4), TaggedArray(4), "a label"]) is tagged


def test_arrays_of_two_frameworks_name_both(register) -> None:
    register(TaggedBackend)
    with pytest.raises(TypeError, match=r"two frameworks: the parameters .* 'torch' but the data .* 'tagged'"):
        find_backend(_fn, torch.ones(2), [TaggedArray(2)])
    with pytest.raises(TypeError, match=r"backend='tagged' was named but the parameters .* belong to 'torch'"):
        find_backend(_fn, torch.ones(2), [], override="tagged")


def test_numpy_arrays_decide_only_when_nothing_else_does(register) -> None:
    numpy_frame = register(NumpyBackend)
    assert find_backend(_fn, np.ones(3), [np.ones((2, 3)), np.arange(2)]) is numpy_frame
    assert find_backend(_fn, {"w": np.float64(1.0)}, []) is numpy_frame
    # NumPy data is accepted with any framework's model or parameters.
    assert find_backend(_fn, torch.ones(3), [np.ones((2, 3)), np.arange(2)]).name == "torch"
    assert find_backend(torch.nn.Linear(3, 2), None, [np.ones((2, 3))]).name == "torch"
    assert find_backend(_fn, np.ones(3), [], override="torch").name == "torch"


def test_a_broken_owns_does_not_break_dispatch(register) -> None:
    register(RaisingBackend)
    tagged = register(TaggedBackend)
    assert find_backend(_fn, TaggedArray(3), []) is tagged


def test_errors_name_every_backend_that_exists(register) -> None:
    register(TaggedBackend)
    with pytest.raises(TypeError, match=r"could not tell .* one of \['torch', 'jax', 'tensorflow', 'tagged'\]"):
        find_backend(_fn, np.ones(3), [])
    with pytest.raises(TypeError, match=r"belongs to no known backend; .*'tagged'.*mh\.register_backend"):
        find_backend(_fn, object(), [])
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; known backends: .*'tagged'"):
        mh.get_backend("nope")


def test_entry_point_backend(tmp_path: pathlib.Path) -> None:
    """A third party's backend, found through the entry-point group ``multihess.backends``."""
    (tmp_path / "thirdparty_curv.py").write_text(
        textwrap.dedent(
            """
            from multihess.backends.torch_backend import TorchBackend

            class ThirdPartyBackend(TorchBackend):
                name = "thirdparty"
            """
        )
    )
    dist = tmp_path / "thirdparty_curv-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-curv\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[multihess.backends]\nthirdparty = thirdparty_curv:ThirdPartyBackend\nbroken = no_such_module:Backend\n"
    )
    code = textwrap.dedent(
        """
        import numpy as np, torch, multihess as mh
        w = torch.tensor([1.0, 2.0], dtype=torch.float64)
        H = mh.hessian(lambda w: (w ** 4).sum(), w, backend="thirdparty")
        print(H.backend.name, H.dense().diagonal().tolist())
        # Dispatch without backend=: torch comes first; a broken entry point breaks nothing and is named.
        print(mh.hessian(lambda w: (w ** 4).sum(), w).backend.name)
        try:
            mh.hessian(lambda w: (w ** 4).sum(), np.ones(2))
        except TypeError as err:
            print(err)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second, message = result.stdout.splitlines()[:3]
    # d²/dw² Σ w⁴ = 12 w²
    assert first.split() == ["thirdparty", "[12.0,", "48.0]"]
    assert second == "torch"
    assert "could not tell which framework" in message and "'thirdparty'" in message, message
    assert "broken: ModuleNotFoundError" in message, message
