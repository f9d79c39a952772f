"""Turning the user's arguments into one checked problem: backend, parameters, loss, batches."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import all_finite, dtype_name, is_floating, shape
from ._backend import Array, Backend, ParameterBinding
from ._dispatch import find_backend
from ._losses import Loss, make_loss
from ._trees import all_leaves

Batch = Any


@dataclass
class Problem:
    """A model, its selected parameters, a loss and the data, bound to one backend.

    Attributes
    ----------
    backend : Backend
    binding : ParameterBinding
        The parameters the operator differentiates with respect to (the
        union of the row and column selections).
    loss : Loss or None
        ``None`` for a plain scalar function ``fn(params)``.
    batches : list
        ``(x, y)`` pairs (``[None]`` for a plain function).
    batch_weights : list of float
        Factor of each batch's loss in the total: for ``"mean"`` the batch's
        share of the samples, for ``"sum"`` 1.
    """

    backend: Backend
    model: Any
    weights: Any
    binding: ParameterBinding
    loss: Loss | None
    batches: list[Batch]
    batch_weights: list[float]
    check_finite: bool

    def batch_loss(self, w: Array, batch: Batch) -> Array:
        """The loss of one batch at the flat parameters ``w`` (unweighted)."""
        if self.loss is None:
            return self.backend.xp.reshape(self.binding.apply(w, None), ())
        x, y = batch
        return self.loss.value(self.backend, self.binding.apply(w, x), y)

    def batch_sum(self, per_batch: Callable[[Batch], Any]) -> Any:
        """``Σ_batches weight · per_batch(batch)``: the batch-weighted total of a per-batch quantity.

        The one place where batches are combined: products, gradients and
        diagonals of the whole data are this sum, with each batch's weight
        its share of the samples (``"mean"``) or 1 (``"sum"``).
        """
        total = None
        for weight, batch in zip(self.batch_weights, self.batches):
            part = per_batch(batch)
            part = part if weight == 1.0 else part * weight
            total = part if total is None else total + part
        return total

    def bind(self, selected: Sequence[str]) -> ParameterBinding:
        """A binding of a subset (for row/column trees of a block)."""
        if list(selected) == self.binding.names:
            return self.binding
        return self.backend.bind(self.model, self.weights, list(selected))


def split_batches(data: Any) -> list[Batch]:
    """One batch ``(x, y)`` or an iterable of batches, as a list of batches."""
    # ``(x, y)`` is one batch; so is the tuple ``((x_a, x_b), y)`` of a model with two
    # inputs.  A list whose first entry is a pair is a list of batches.
    if isinstance(data, (tuple, list)) and len(data) == 2:
        if not _looks_like_batch(data[0]) or (isinstance(data, tuple) and not _looks_like_batch(data[1])):
            return [tuple(data)]
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(
            f"data must be one batch (x, y) or an iterable of such batches, got {type(data).__name__}"
        ) from None
    if not batches:
        raise ValueError("data is empty: give at least one batch (x, y)")
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"batch {i} of data is not a pair (x, y): got {type(batch).__name__}")
    return [tuple(b) for b in batches]


def _looks_like_batch(obj: Any) -> bool:
    """Whether ``obj`` is itself an ``(x, y)`` pair, i.e. ``data`` is a list of batches."""
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and not hasattr(obj, "shape")


def select_names(named: list[tuple[str, Array]], params: Any) -> list[str]:
    """Resolve ``params=`` (names, globs, arrays, or a mix) to parameter names in model order."""
    names = [n for n, _ in named]
    if params is None:
        return names
    items = [params] if isinstance(params, str) or not isinstance(params, (list, tuple, set)) else list(params)
    chosen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            hits = [n for n in names if fnmatch.fnmatchcase(n, item)]
            if not hits:
                raise ValueError(f"params={item!r} matches no parameter; the parameters are {names}")
            chosen.update(hits)
        else:
            hits = [n for n, p in named if p is item]
            if not hits:
                raise ValueError(
                    "params contains an array that is not one of the model's trainable parameters; "
                    f"select by name instead, from {names}"
                )
            chosen.update(hits)
    return [n for n in names if n in chosen]


def build_problem(
    model: Any,
    weights: Any,
    data: Any,
    loss: Any,
    params: Any,
    col_params: Any,
    reduction: str,
    backend_name: str | None,
    check_finite: bool,
    need_loss: bool = False,
) -> tuple[Problem, list[str], list[str]]:
    """Check the user's arguments and bind them; returns the problem and the row/column names."""
    batches = [None] if data is None else split_batches(data)
    data_leaves = [] if data is None else [leaf for b in batches for leaf in all_leaves(b)]
    backend = find_backend(model, weights, data_leaves, backend_name)

    if data is None:
        if loss is not None:
            raise ValueError("loss= was given without data=; pass data=(x, y), or drop loss for a scalar function")
        if need_loss:
            raise ValueError("a GGN needs model outputs and a loss: pass data=(x, y) and loss=")
        if weights is None:
            raise TypeError("a scalar function needs its parameters: call hessian(fn, params)")
        loss_obj = None
    else:
        if loss is None:
            raise ValueError(
                "data= was given without loss=; pass loss='cross_entropy' | 'mse' | 'bce_with_logits' | "
                "'poisson_nll' or a callable loss(outputs, targets)"
            )
        loss_obj = make_loss(loss, reduction)

    named = backend.named_parameters(model, weights)
    if not named:
        raise ValueError(
            "the model has no trainable parameters (none require gradients); "
            "unfreeze some or pass the parameters explicitly"
        )
    for name, p in named:
        if not is_floating(backend.xp, p):
            if params is None or name in select_names(named, params) or name in select_names(named, col_params):
                raise TypeError(
                    f"parameter {name!r} has dtype {dtype_name(p)}; curvature needs floating-point "
                    "parameters (cast the model, or exclude it with params=)"
                )
    rows = select_names(named, params)
    cols = rows if col_params is None else select_names(named, col_params)
    union = [n for n, _ in named if n in set(rows) | set(cols)]
    dtypes = {dtype_name(p) for n, p in named if n in union}
    if len(dtypes) > 1:
        raise TypeError(f"the selected parameters mix dtypes {sorted(dtypes)}; cast the model to one dtype")
    binding = backend.bind(model, weights, union)

    batches = [_convert_batch(backend, b, binding.w) for b in batches]
    problem = Problem(
        backend, model, weights, binding, loss_obj, batches, _batch_weights(backend, batches, loss_obj), check_finite
    )
    _check_problem(problem)
    return problem, rows, cols


def _convert_batch(backend: Backend, batch: Batch, like: Array) -> Batch:
    """NumPy data to framework arrays on the parameters' device (floats in their dtype)."""
    if batch is None:
        return None

    def convert(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return backend.asarray(obj, like)
        if isinstance(obj, tuple):
            return tuple(convert(o) for o in obj)
        return obj

    return tuple(convert(part) for part in batch)


def _batch_weights(backend: Backend, batches: list[Batch], loss: Loss | None) -> list[float]:
    if loss is None or len(batches) == 1 or loss.reduction == "sum":
        return [1.0] * len(batches)
    sizes = [_batch_size(backend, b) for b in batches]
    total = float(sum(sizes))
    return [s / total for s in sizes]


def _batch_size(backend: Backend, batch: Batch) -> int:
    x = batch[0]
    first = all_leaves(x)[0]
    return shape(first)[0] if backend.is_array(first) else len(first)


def _check_problem(problem: Problem) -> None:
    """One-time checks: finite parameters and data, matching shapes, a deterministic model."""
    b = problem.backend
    if problem.check_finite:
        if not all_finite(b.xp, problem.binding.w):
            raise ValueError("the parameters contain NaN or inf; the curvature there is undefined")
        for i, batch in enumerate(problem.batches):
            for leaf in all_leaves(batch):
                if b.is_array(leaf) and is_floating(b.xp, leaf) and not all_finite(b.xp, leaf):
                    raise ValueError(
                        f"batch {i} of data contains NaN or inf; clean the data or pass check_finite=False"
                    )
    if problem.loss is None:
        out = problem.binding.apply(problem.binding.w, None)
        if not b.is_array(out) or shape(out) not in ((), (1,)):
            raise ValueError(
                "fn(params) must return a scalar array of its framework; got "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )
        return
    x, y = problem.batches[0]
    first = problem.binding.apply(problem.binding.w, x)
    if not b.is_array(first):
        raise TypeError(f"the model returned {type(first).__name__}; it must return one array of outputs")
    problem.loss.check(b, first, y)
    problem.loss.value(b, first, y)  # a callable loss shows here whether it returns a scalar
    second = problem.binding.apply(problem.binding.w, x)
    a, c = b.to_numpy(first).astype(np.float64), b.to_numpy(second).astype(np.float64)
    scale = max(1.0, float(np.max(np.abs(a))) if a.size else 1.0)
    if not np.allclose(a, c, rtol=0, atol=1e-5 * scale, equal_nan=True):
        raise ValueError(
            "the model is not deterministic: two evaluations on the same batch differ "
            "(dropout or sampling in training mode?); call model.eval() or fix its randomness"
        )
