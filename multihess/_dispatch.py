"""Choosing the backend for the user's objects.

Built-in backends are candidates only when their framework is already in
``sys.modules``: a model or array of a framework cannot exist before the
framework was imported, so ``import multihess`` never imports one.  Third
parties register through the entry-point group ``multihess.backends`` (an
entry point names a :class:`~multihess._backend.Backend` subclass); those are
looked up only when a name or an object is not claimed by a built-in.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from ._backend import Backend
from ._trees import all_leaves

ENTRY_POINT_GROUP = "multihess.backends"

# name -> (module inside this package, class name, framework module)
BUILTIN_BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": (".backends.torch_backend", "TorchBackend", "torch"),
    "jax": (".backends.jax_backend", "JaxBackend", "jax"),
    "tensorflow": (".backends.tensorflow_backend", "TensorFlowBackend", "tensorflow"),
}
ALIASES = {"pytorch": "torch", "tf": "tensorflow", "keras": "tensorflow"}

_instances: dict[str, Backend] = {}
_registered: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Register a backend class by its ``name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)) or not cls.name:
        raise TypeError("register_backend expects a Backend subclass with a non-empty `name`")
    _registered[cls.name] = cls
    _instances.pop(cls.name, None)
    return cls


def _entry_point_classes() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` ("torch", "jax", "tensorflow" or a registered one).

    Raises
    ------
    ValueError
        For a name that no built-in, registered or entry-point backend has.
    ImportError
        When the backend's framework is not installed.
    """
    if isinstance(name, Backend):
        return name
    key = ALIASES.get(name, name)
    if key in _instances:
        return _instances[key]
    if key in _registered:
        backend = _registered[key]()
    elif key in BUILTIN_BACKENDS:
        module, cls_name, framework = BUILTIN_BACKENDS[key]
        try:
            mod = importlib.import_module(module, package=__package__)
        except ImportError as err:
            raise ImportError(
                f"backend {key!r} needs {framework}, which could not be imported ({err}); "
                f"install it, e.g. pip install 'multihess[{key}]'"
            ) from err
        backend = getattr(mod, cls_name)()
    else:
        eps = _entry_point_classes()
        if key not in eps:
            known = sorted(set(BUILTIN_BACKENDS) | set(_registered) | set(eps))
            raise ValueError(f"unknown backend {name!r}; known backends: {known}")
        cls = eps[key].load()
        backend = cls()
    _instances[key] = backend
    return backend


def _loaded_candidates() -> list[Backend]:
    out = [get_backend(n) for n, (_, _, fw) in BUILTIN_BACKENDS.items() if sys.modules.get(fw) is not None]
    out += [get_backend(n) for n in _registered]
    return out


def _owner(obj: Any, candidates: Iterable[Backend]) -> Backend | None:
    for backend in candidates:
        try:
            if backend.owns(obj):
                return backend
        except Exception:  # a third-party owns() must not break dispatch
            continue
    return None


def _describe(obj: Any) -> str:
    return type(obj).__module__.split(".")[0] + "." + type(obj).__name__


def find_backend(model: Any, weights: Any, data_leaves: list[Any], override: str | None = None) -> Backend:
    """Pick the backend for a model, its parameter tree and its data.

    Every framework object among them must belong to the same backend;
    NumPy arrays and Python numbers are accepted anywhere.

    Raises
    ------
    TypeError
        When the objects come from two frameworks, or from none known.
    """
    if override is not None:
        backend = get_backend(override)
        candidates = [backend] + [c for c in _loaded_candidates() if c is not backend]
    else:
        backend = None
        candidates = _loaded_candidates()

    objects: list[tuple[str, Any]] = []
    if model is not None and not _is_plain_function(model):
        objects.append(("model", model))
    if weights is not None:
        objects += (
            [("parameters", leaf) for leaf in all_leaves(weights)]
            if _is_container(weights)
            else [("parameters", weights)]
        )
    objects += [("data", leaf) for leaf in data_leaves]

    owners: list[tuple[str, Any, Backend]] = []
    for role, obj in objects:
        if obj is None or isinstance(obj, (np.ndarray, np.generic, int, float, bool)):
            continue
        owner = _owner(obj, candidates)
        if owner is None and role != "data":
            owner = _owner(obj, _third_party_candidates())
        if owner is None:
            if role == "data" and not hasattr(obj, "shape"):
                continue
            raise TypeError(
                f"{role} of type {_describe(obj)} belongs to no known backend; pass a PyTorch, JAX or "
                "TensorFlow model/array, or register a backend for it"
            )
        owners.append((role, obj, owner))

    for role, obj, owner in owners:
        chosen = backend or owners[0][2]
        if owner is not chosen:
            raise TypeError(
                f"arrays from two frameworks: the {owners[0][0]} belong to {owners[0][2].name!r} "
                f"but the {role} ({_describe(obj)}) to {owner.name!r}; convert everything to one framework"
            )
    if backend is not None:
        return backend
    if not owners:
        raise TypeError(
            "could not tell which framework to use: no framework array or model was given; "
            "pass parameters/data as framework arrays or name one with backend='torch'|'jax'|'tensorflow'"
        )
    return owners[0][2]


def _third_party_candidates() -> list[Backend]:
    out = []
    try:
        eps = _entry_point_classes()
    except Exception:
        return out
    for name in eps:
        if name in BUILTIN_BACKENDS or name in _registered:
            continue
        try:
            out.append(get_backend(name))
        except Exception:
            continue
    return out


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (dict, list, tuple))


def _is_plain_function(obj: Any) -> bool:
    """A Python function or other callable that is not a framework model object."""
    import types

    return isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType))
