"""Stateful TensorFlow models: Keras models and ``tf.Module`` objects evaluated with given parameter values.

Keras 3 models run through ``stateless_call``, so the user's variables are
never read inside a product nor written.  A ``tf.Module`` runs as a shallow
copy whose variables are replaced by tensors.  Vectors over a stateful model
are lists in ``trainable_variables`` order, with ``None`` in place of
parameters outside ``params=``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from .._arrays import dtype_name
from .._arrays import shape as shape_of
from .._backend import Backend, ParameterBinding
from .._trees import check_not_foreign, checked_by_name, flatten_by_name, framework_of, split_flat
from .tensorflow_moments import with_exact_moments


# ----------------------------------------------------------------------------- type tests
def _keras() -> Any:
    """The ``keras`` module when it is loaded and runs on TensorFlow, else ``None``."""
    keras = sys.modules.get("keras")
    if keras is None:
        return None
    try:
        return keras if keras.backend.backend() == "tensorflow" else None
    except Exception:  # a partially imported or very old keras
        return None


def _is_keras_variable(x: Any) -> bool:
    keras = _keras()
    return keras is not None and isinstance(x, keras.Variable)


def is_keras_layer(x: Any) -> bool:
    keras = _keras()
    return keras is not None and isinstance(x, keras.Layer)


def is_tf_array(x: Any) -> bool:
    """A tensor (eager or symbolic), a ``tf.Variable`` or a Keras variable."""
    return isinstance(x, (tf.Tensor, tf.Variable)) or _is_keras_variable(x)


def is_array_like(x: Any) -> bool:
    """An array of any framework (NumPy, torch, JAX, TensorFlow)."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def as_tensor(x: Any) -> tf.Tensor:
    return x if isinstance(x, tf.Tensor) else tf.convert_to_tensor(x)


def tf_dtype(x: Any) -> tf.DType:
    # Keras variables report their dtype as a string.
    return tf.as_dtype(x.dtype)


def stateful_parameters(model: Any) -> list[tuple[str, Any]]:
    """The trainable variables of a Keras model or ``tf.Module`` by name, in ``trainable_variables`` order."""
    if is_keras_layer(model):
        if not model.built and not model.trainable_variables:
            raise ValueError(
                f"the Keras model {model.name!r} is not built, so it has no variables yet; "
                "call it once on a batch or call model.build(input_shape) first"
            )
        paths = [v.path for v in model.trainable_variables]
        # Paths are unique in practice; numbering duplicates keeps names usable as keys if not.
        names = [p if paths.count(p) == 1 else f"{p}:{i}" for i, p in enumerate(paths)]
        return list(zip(names, model.trainable_variables))
    if isinstance(model, tf.Module):
        return [(n, v) for n, v in _module_variables(model) if v.trainable]
    raise TypeError(
        f"cannot find parameters in a {framework_of(model)}.{type(model).__name__}: pass a Keras model, "
        "a tf.Module, or a function f(params, x) together with its params"
    )


def stateful_binding(
    backend: Backend, model: Any, named: list[tuple[str, Any]], names: Sequence[str]
) -> ParameterBinding:
    """The binding of the parameters ``names`` of a Keras model or ``tf.Module`` (see ``Backend.bind``)."""
    xp, names = backend.xp, list(names)
    position = {n: i for i, (n, _) in enumerate(named)}
    missing = [n for n in names if n not in position]
    if missing:
        raise ValueError(f"no parameters named {missing}; the parameters are {list(position)}")
    index = [position[n] for n in names]
    # Snapshots: products see the values of the moment of binding.
    values = [tf.identity(as_tensor(p)) for _, p in named]
    chosen = [values[i] for i in index]
    shapes = [shape_of(p) for p in chosen]
    dtypes = [dtype_name(p) for p in chosen]
    w = tf.concat([tf.reshape(p, [-1]) for p in chosen], axis=0)

    def filled(flat: tf.Tensor, base: list[Any]) -> list[Any]:
        out = list(base)
        for i, part in zip(index, split_flat(xp, flat, names, shapes, tf.split).values()):
            out[i] = part
        return out

    if is_keras_layer(model):
        frozen = [tf.identity(as_tensor(v)) for v in model.non_trainable_variables]
        # Inference mode where call() takes it; Keras accepts a call(self, x) without it, so do we.
        mode = {"training": False} if _takes_training(model) else {}

        def apply(flat: tf.Tensor, x: Any) -> tf.Tensor:
            # stateless_call reads the given values instead of the variables and writes nothing back.
            out, _ = model.stateless_call(filled(flat, values), frozen, x, **mode)
            return out

    else:
        module_apply = _module_apply(model, [p for _, p in named])
        apply = lambda flat, x: module_apply(filled(flat, values), x)  # noqa: E731
    apply = with_exact_moments(apply)

    def to_tree(flat: tf.Tensor) -> list[Any]:
        # A list in trainable_variables order, None outside params=.
        return filled(flat, [None] * len(named))

    def from_tree(v: Any) -> tf.Tensor:
        entries = _stateful_tree_by_name(backend, v, [n for n, _ in named], set(index), names)
        return flatten_by_name(backend, entries, names, shapes, dtypes)

    def parts_of(v: Any) -> list[tf.Tensor]:
        entries = _stateful_tree_by_name(backend, v, [n for n, _ in named], set(index), names)
        return checked_by_name(backend, entries, names, shapes, dtypes)

    def from_parts(parts: Sequence[tf.Tensor]) -> list[Any]:
        out: list[Any] = [None] * len(named)
        for i, part in zip(index, parts):
            out[i] = part
        return out

    return ParameterBinding(w, names, shapes, apply, to_tree, from_tree, parts_of, from_parts)


# ----------------------------------------------------------------------------- tf.Module evaluation
def _substituted(obj: Any, values: dict[int, tf.Tensor], memo: dict[int, Any]) -> Any:
    """A copy of ``obj`` with the variables in ``values`` (keyed by ``id``) replaced.

    Modules and the lists, tuples and dicts they hold are copied shallowly
    (every other attribute is shared with the original); the original
    module and its variables are left untouched.  Shared objects stay
    shared in the copy.
    """
    key = id(obj)
    if key in values:
        return values[key]
    if key in memo:
        return memo[key]
    if isinstance(obj, tf.Module) and not is_keras_layer(obj):
        new = object.__new__(type(obj))
        memo[key] = new
        # Written into __dict__ directly: the module's __setattr__ would track the tensors as dependencies.
        new.__dict__.update({k: _substituted(v, values, memo) for k, v in vars(obj).items()})
        return new
    if isinstance(obj, tuple):
        items = [_substituted(v, values, memo) for v in obj]
        out = type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        memo[key] = out
        return out
    if isinstance(obj, list):  # also TensorFlow's ListWrapper, replaced by a plain list
        new_list: list[Any] = []
        memo[key] = new_list
        new_list.extend(_substituted(v, values, memo) for v in obj)
        return new_list
    if isinstance(obj, dict):  # also TensorFlow's _DictWrapper
        new_dict: dict[Any, Any] = {}
        memo[key] = new_dict
        new_dict.update({k: _substituted(v, values, memo) for k, v in obj.items()})
        return new_dict
    return obj


def _module_variables(module: tf.Module) -> list[tuple[str, tf.Variable]]:
    """Every variable of a ``tf.Module`` (once each) with its dotted attribute path."""
    out: dict[int, tuple[str, tf.Variable]] = {}
    for path, var in module._flatten(predicate=lambda v: isinstance(v, tf.Variable), with_path=True):
        out.setdefault(id(var), (".".join(str(p) for p in path), var))
    return list(out.values())


def _call_module(module: Any, x: Any) -> Any:
    return module(*x) if isinstance(x, tuple) else module(x)


def _takes_training(layer: Any) -> bool:
    """Whether ``layer.call`` accepts a ``training`` argument (by name, or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(layer.call).parameters.values()
    except (TypeError, ValueError):  # no signature to read: Keras's own layers all take it
        return True
    return any(p.name == "training" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _module_apply(module: tf.Module, variables: list[tf.Variable]) -> Callable[[list[tf.Tensor], Any], tf.Tensor]:
    """``apply(values, x)``: the module evaluated with ``values`` in place of its variables.

    Every variable, trainable or not, is replaced (non-trainable ones by
    snapshots taken now), so a module that updates a variable during its
    call cannot change the user's module.
    """
    trainable_ids = [id(v) for v in variables]
    others = {id(v): tf.identity(v) for _, v in _module_variables(module) if id(v) not in set(trainable_ids)}

    def apply(values: list[tf.Tensor], x: Any) -> tf.Tensor:
        replaced = {**others, **dict(zip(trainable_ids, values))}
        copy = _substituted(module, replaced, {})
        try:
            return _call_module(copy, x)
        except AttributeError as err:
            if "Tensor" not in str(err):
                raise
            raise TypeError(
                f"the tf.Module {type(module).__name__} uses a tf.Variable method during its call ({err}); "
                "multihess evaluates a tf.Module with tensors in place of its variables so that the module is "
                "never modified. Move variable updates out of __call__, or pass a function f(params, x)"
            ) from err

    return apply


def _stateful_tree_by_name(
    backend: Backend, v: Any, names: list[str], chosen: set[int], selected: list[str]
) -> dict[str, Any]:
    """Entries of a vector tree for a Keras model or ``tf.Module``, keyed by parameter name.

    The tree is a list in ``trainable_variables`` order, with ``None`` in
    place of parameters outside ``params=`` (the form products answer in).
    """
    if isinstance(v, (list, tuple)) and not is_array_like(v):
        if len(v) != len(names):
            raise ValueError(
                f"v is a list of {len(v)} entries but the model has {len(names)} trainable variables; pass one "
                "tensor per entry of trainable_variables (None for those outside params=), or a flat vector"
            )
        extra = [names[i] for i, leaf in enumerate(v) if i not in chosen and leaf is not None]
        if extra:
            raise ValueError(f"v has entries for {extra}, which are outside params={selected}; put None there")
        return {names[i]: leaf for i, leaf in enumerate(v) if i in chosen and leaf is not None}
    check_not_foreign(backend, v)
    raise TypeError(
        f"v must be a flat tensor or a list in trainable_variables order (None outside params=), got {type(v).__name__}"
    )
