"""Choosing the backend for the user's objects.

Every backend that exists is asked about the user's model, parameters and
data alike, through :meth:`Backend.owns`:

1. the built-in backends whose framework is already in ``sys.modules`` (a
   model or array of a framework cannot exist before the framework was
   imported, so ``import multihess`` never imports one);
2. the backends registered with :func:`register_backend`, in registration
   order;
3. the backends named by the entry-point group ``multihess.backends``
   (each entry point names a :class:`~multihess._backend.Backend` subclass);
   they are loaded only when the first two kinds leave an object unclaimed,
   which gives the same answer as asking them always, since the first
   candidate in this order that owns every object is the one chosen.

Framework objects (tensors, models, trees of them) decide.  NumPy arrays and
NumPy scalars are accepted with any framework's model (data is moved to the
parameters' framework), so they decide only when nothing else does: then a
backend whose arrays are NumPy arrays (HIPS autograd) is chosen by claiming
them.  ``backend=`` overrides all of this.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

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
    """Register a backend class by its ``name`` (usable as a decorator).

    A registered backend is what ``backend=name`` loads, and it is asked
    about the user's objects during dispatch, after the built-in backends.

    Raises
    ------
    TypeError
        When ``cls`` is not a :class:`~multihess.Backend` subclass with a
        non-empty ``name``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Backend)) or not cls.name:
        raise TypeError(
            f"register_backend expects a Backend subclass with a non-empty `name`, got {cls!r}; "
            "subclass multihess.Backend and set the class attribute name = '...'"
        )
    _registered[cls.name] = cls
    _instances.pop(cls.name, None)
    return cls


def _entry_points() -> dict[str, Any]:
    """The entry points of the group ``multihess.backends`` by name (not loaded)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """Names of every backend ``backend=`` accepts: built-in, registered and entry-point ones.

    Built-in backends are listed whether or not their framework is
    installed; entry points are listed without being loaded.
    """
    try:
        entry_point_names = list(_entry_points())
    except Exception:  # broken package metadata must not hide the other names
        entry_point_names = []
    return list(dict.fromkeys([*BUILTIN_BACKENDS, *_registered, *entry_point_names]))


def get_backend(name: str) -> Backend:
    """The backend called ``name`` ("torch", "jax", "tensorflow" or a registered or entry-point one).

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
        eps = _entry_points()
        if key not in eps:
            raise ValueError(f"unknown backend {name!r}; known backends: {available_backends()}")
        cls = eps[key].load()
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TypeError(
                f"the entry point {key!r} of group {ENTRY_POINT_GROUP!r} names {cls!r}, "
                "which is not a multihess.Backend subclass"
            )
        backend = cls()
    _instances[key] = backend
    return backend


# ----------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------
def _loaded_candidates() -> list[Backend]:
    """Built-in backends whose framework is imported, then registered ones."""
    names = [n for n, (_, _, fw) in BUILTIN_BACKENDS.items() if sys.modules.get(fw) is not None]
    names += [n for n in _registered if n not in names]
    return [get_backend(n) for n in names]


def _entry_point_candidates(load_errors: dict[str, str]) -> list[Backend]:
    """Backends of the entry-point group not already built in or registered.

    A third party's backend that fails to load must not break dispatch for
    everyone else; its failure is recorded in ``load_errors`` and named in
    the error raised when no backend claims the user's objects.
    """
    try:
        names = list(_entry_points())
    except Exception as err:  # unreadable package metadata
        load_errors[ENTRY_POINT_GROUP] = f"{type(err).__name__}: {err}"
        return []
    out = []
    for name in names:
        if name in BUILTIN_BACKENDS or name in _registered:
            continue
        try:
            out.append(get_backend(name))
        except Exception as err:
            load_errors[name] = f"{type(err).__name__}: {err}"
    return out


def _claims(backend: Backend, obj: Any) -> bool:
    """``backend.owns(obj)``; an exception counts as no (a third party's owns() must not break dispatch)."""
    try:
        return bool(backend.owns(obj))
    except Exception:
        return False


def _owners(obj: Any, candidates: Iterable[Backend]) -> list[Backend]:
    """The candidates that claim ``obj``, in candidate order."""
    return [backend for backend in candidates if _claims(backend, obj)]


# ----------------------------------------------------------------------
# The user's objects
# ----------------------------------------------------------------------
def _is_numpy(obj: Any) -> bool:
    """A NumPy array or scalar: accepted with any framework, claimed only by NumPy-array frameworks."""
    return isinstance(obj, (np.ndarray, np.generic))


def _is_neutral(obj: Any) -> bool:
    """Python numbers, strings and ``None``: data that belongs to no framework.

    NumPy scalars are not among them, although ``np.float64`` is a ``float``.
    """
    return obj is None or (isinstance(obj, (bool, int, float, complex, str, bytes)) and not _is_numpy(obj))


def _describe(obj: Any) -> str:
    return type(obj).__module__.split(".")[0] + "." + type(obj).__name__


def _objects(model: Any, weights: Any, data_leaves: list[Any]) -> list[tuple[str, Any]]:
    """``(role, object)`` for the model, every parameter leaf and every array among the data."""
    objects: list[tuple[str, Any]] = []
    if model is not None and not _is_plain_function(model):
        objects.append(("model", model))
    if weights is not None:
        leaves = all_leaves(weights) if _is_container(weights) else [weights]
        objects += [("parameters", leaf) for leaf in leaves if not _is_neutral(leaf)]
    # Data without a shape (strings, sizes, a tokenizer) is passed to the model as it is.
    objects += [("data", leaf) for leaf in data_leaves if not _is_neutral(leaf) and hasattr(leaf, "shape")]
    return objects


def find_backend(model: Any, weights: Any, data_leaves: list[Any], override: str | None = None) -> Backend:
    """Pick the backend for a model, its parameter tree and its data.

    Parameters
    ----------
    model : object
        The model, ``f(params, x)``, a scalar function, or ``None``.  Plain
        Python functions carry no framework and are not asked about.
    weights : tree or None
        The parameters of a functional model: every leaf is asked about.
    data_leaves : list
        Every leaf of every batch.
    override : str or Backend, optional
        ``backend=``: that backend, provided no other framework claims one
        of the objects.

    Returns
    -------
    Backend
        The first backend (built-in, registered, entry point, in that order)
        that claims every framework object among them; when there are only
        NumPy arrays, the first that claims all of those.

    Raises
    ------
    TypeError
        When the objects come from two frameworks, from no known one, or
        only NumPy arrays are given and no backend claims them.
    """
    objects = _objects(model, weights, data_leaves)
    load_errors: dict[str, str] = {}
    candidates = _loaded_candidates()
    if override is not None:
        backend = get_backend(override)
        candidates = [backend] + [c for c in candidates if c is not backend]
        _check_override(backend, objects, candidates, load_errors)
        return backend

    framework = [(role, obj) for role, obj in objects if not _is_numpy(obj)]
    numpy_objects = [(role, obj) for role, obj in objects if _is_numpy(obj)]
    deciding = framework or numpy_objects
    chosen = _choose(deciding, candidates)
    if chosen is None:
        # The entry-point backends come last in the order, so asking them only now
        # chooses the same backend as asking them from the start.
        candidates = candidates + _entry_point_candidates(load_errors)
        chosen = _choose(deciding, candidates)
    if chosen is not None:
        return chosen
    if not framework:
        raise TypeError(
            "could not tell which framework to use: "
            + ("no framework array or model was given" if not numpy_objects else "no backend claims NumPy arrays")
            + f"; pass parameters/data as framework arrays or name the backend with backend=, one of "
            f"{available_backends()}" + _load_note(load_errors)
        )
    _raise_unclaimed_or_mixed(framework, candidates, load_errors)


def _choose(objects: list[tuple[str, Any]], candidates: list[Backend]) -> Backend | None:
    """The first candidate that claims every object (a wrong one is usually rejected by the first object)."""
    if not objects:
        return None
    for backend in candidates:
        if all(_claims(backend, obj) for _, obj in objects):
            return backend
    return None


def _check_override(
    backend: Backend, objects: list[tuple[str, Any]], candidates: list[Backend], load_errors: dict[str, str]
) -> None:
    """With ``backend=``, every framework object must be the named backend's (NumPy arrays always are)."""
    for role, obj in objects:
        if _is_numpy(obj) or _claims(backend, obj):
            continue
        others = _owners(obj, candidates[1:]) or _owners(obj, _entry_point_candidates(load_errors))
        if others:
            raise TypeError(
                f"backend={backend.name!r} was named but the {role} ({_describe(obj)}) belong to "
                f"{others[0].name!r}; convert everything to one framework, or name backend={others[0].name!r}"
            )
        raise TypeError(
            f"{role} of type {_describe(obj)} belongs to no known backend, not even the one named "
            f"(backend={backend.name!r}); pass a model or arrays of that framework" + _load_note(load_errors)
        )


def _raise_unclaimed_or_mixed(
    objects: list[tuple[str, Any]], candidates: list[Backend], load_errors: dict[str, str]
) -> NoReturn:
    """Say why no backend claims every object: one that no backend claims, or two frameworks."""
    claims = []
    for role, obj in objects:
        owners = _owners(obj, candidates)
        if not owners:
            raise TypeError(
                f"{role} of type {_describe(obj)} belongs to no known backend; pass a model or arrays of one of "
                f"the backends {available_backends()}, or register a backend for it (mh.register_backend, or "
                f"the entry-point group {ENTRY_POINT_GROUP!r})" + _load_note(load_errors)
            )
        claims.append((role, obj, owners))
    first_role, first_obj, first_owners = claims[0]
    for role, obj, owners in claims[1:]:
        if first_owners[0] not in owners:
            raise TypeError(
                f"arrays from two frameworks: the {first_role} ({_describe(first_obj)}) belong to "
                f"{first_owners[0].name!r} but the {role} ({_describe(obj)}) to {owners[0].name!r}; "
                "convert everything to one framework"
            )
    # Only reached when owns() answers differently for the same object.
    raise TypeError("no single backend claims every model, parameter and data array; name one with backend=")


def _load_note(load_errors: dict[str, str]) -> str:
    if not load_errors:
        return ""
    return " (backends that could not be loaded: " + "; ".join(f"{n}: {r}" for n, r in load_errors.items()) + ")"


def _is_container(obj: Any) -> bool:
    return isinstance(obj, (dict, list, tuple))


def _is_plain_function(obj: Any) -> bool:
    """A Python function or other callable that is not a framework model object."""
    import functools
    import types

    return isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial))
