"""Turning the user's arguments into one checked problem: backend, parameters, loss, batches."""

from __future__ import annotations

import fnmatch
import functools
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._arrays import all_finite, dtype_name, is_floating, shape
from ._backend import Array, Backend, ParameterBinding
from ._data import DataSource
from ._dispatch import find_backend
from ._losses import CallableLoss, Loss, make_loss
from ._progress import pass_done, progress_bar
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
    source : DataSource or None
        The batches, streamed once per pass (``None`` for a plain function).
    reduction : {"mean", "sum"}
        How batches combine: the sample-weighted mean of the batch losses,
        or their sum.  Callable losses combine the same way.
    progress : bool or None
        Progress bars over the batches of a pass: ``None`` shows one once a
        pass has taken a second, ``False`` never.
    distributed : None, True or a process group
        Each process passes its own shard of the data; the total of every
        pass and its sample count are summed over the processes
        (``Backend.all_reduce``), so every process gets the whole data's result.
    """

    backend: Backend
    model: Any
    weights: Any
    binding: ParameterBinding
    loss: Loss | None
    source: DataSource | None
    reduction: str
    check_finite: bool
    progress: bool | None = None
    distributed: Any = None
    sample_shape: tuple[int, ...] | None = None
    """Shape of one sample's outputs, read on the first batch; later batches' targets are checked against it."""
    passes: int = 0
    """Passes over the data made so far (one per batched product)."""
    _prepared_single: Batch | None = field(default=None, repr=False)
    _checked: set[int] = field(default_factory=set, repr=False)

    def batch_loss(self, w: Array, batch: Batch) -> Array:
        """The loss of one batch at the flat parameters ``w`` (unweighted)."""
        return model_loss(self.backend, self.loss, self.binding.apply, w, batch)

    def loss_function(self) -> Callable[[Array, Batch], Array]:
        """:meth:`batch_loss` as a function that holds the model and the loss but not this problem.

        For the functions operators compile: a compiled program may serve
        later operators on the same model (JAX), and must not keep this
        problem's parameters and data alive for them.
        """
        return functools.partial(model_loss, self.backend, self.loss, self.binding.apply)

    def batches(self) -> Iterator[tuple[int, Batch]]:
        """One pass over the data: ``(number of samples, batch)`` with each batch on the parameters' device.

        One in-memory batch is converted once and handed out as the same
        object every pass, so backends can keep its graphs; a source is
        read lazily, one batch at a time, and each batch is checked the first
        time it is seen.
        """
        if self.source.single is not None:
            if self._prepared_single is None:
                self._prepared_single = self.prepare(self.source.single, 0)
            yield batch_size(self._prepared_single), self._prepared_single
            return
        for index, raw in enumerate(self._with_progress(self.source)):
            batch = self.prepare(raw, index)
            yield batch_size(batch), batch

    def prepare(self, raw: Batch, index: int) -> Batch:
        """A raw ``(x, y)`` batch converted to the parameters' device, checked on its first pass."""
        batch = convert_batch(self.backend, raw, self.binding.w, index)
        if index not in self._checked:
            check_batch(self, batch, index)
            self._checked.add(index)
        return batch

    @property
    def one_batch(self) -> bool:
        """Whether a pass is one call in one process: one batch of data, or none (a function of the parameters)."""
        return not self.distributed and (self.source is None or self.source.single is not None)

    def batch_sum(self, per_batch: Callable[[Batch], Any]) -> Any:
        """``Σ_batches weight · per_batch(batch)`` over one pass: the data's total of a per-batch quantity.

        The one place where batches are combined: products, gradients and
        diagonals of the whole data are this sum, with each batch weighted by
        its share of the samples (``"mean"``) or by 1 (``"sum"``), for
        built-in and callable losses alike.  The mean is accumulated as
        ``Σ n_b · part_b`` and divided by ``Σ n_b`` at the end of the pass,
        so the dataset's size need not be known in advance.
        """
        if self.source is None:
            result = per_batch(None)
            pass_done(self.progress)  # one product of a function of the parameters: a pass of its own
            return result
        self.passes += 1
        mean = self.reduction == "mean" and self.source.single is None
        total, samples = None, 0
        for index, (n, batch) in enumerate(self.batches()):
            try:
                part = per_batch(batch)
            except Exception as err:
                if self.source.single is None and hasattr(err, "add_note"):
                    err.add_note(f"(while processing batch {index} of data)")
                raise
            part = part * n if mean else part
            total = part if total is None else total + part
            samples += n
        if self.distributed:
            total, samples = self._across_processes(total, samples)
        pass_done(self.progress)
        return total * (1.0 / samples) if mean else total

    def _across_processes(self, total: Any, samples: int) -> tuple[Any, int]:
        """The pass's total and sample count summed over every process (every process gets the same)."""
        b, like = self.backend, self.binding.w
        if isinstance(total, np.ndarray):  # host-side accumulations (exact GGN diagonals)
            total = np.asarray(b.to_numpy(b.all_reduce(b.asarray(total, like), self.distributed)), dtype=total.dtype)
        else:
            total = b.all_reduce(total, self.distributed)
        count = b.all_reduce(b.asarray(np.array([samples], dtype=np.int64), like), self.distributed)
        return total, int(b.to_numpy(count)[0])

    def _with_progress(self, source: DataSource) -> Iterable[Batch]:
        if self.progress is False:
            return source
        return progress_bar(source, total=source.num_batches, desc="pass over data", force=bool(self.progress))

    def bind(self, selected: Sequence[str]) -> ParameterBinding:
        """A binding of a subset (for row/column trees of a block)."""
        if list(selected) == self.binding.names:
            return self.binding
        return self.backend.bind(self.model, self.weights, list(selected))


def model_loss(
    backend: Backend, loss: Loss | None, apply: Callable[[Array, Any], Array], w: Array, batch: Batch
) -> Array:
    """The loss of one batch at the flat parameters ``w``; the model's scalar when there is no loss."""
    if loss is None:
        return backend.xp.reshape(apply(w, None), ())
    x, y = batch
    return loss.value(backend, apply(w, x), y)


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
    batch_fn: Callable[[Any], Any] | None = None,
    progress: bool | None = None,
    cache_data: bool = False,
    distributed: Any = None,
) -> tuple[Problem, list[str], list[str]]:
    """Check the user's arguments and bind them; returns the problem and the row/column names."""
    source = None if data is None else DataSource(data, batch_fn, cache_data)
    first = None if source is None else _first_batch(source)
    backend = find_backend(model, weights, [] if first is None else all_leaves(first), backend_name)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

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
        if not isinstance(loss_obj, CallableLoss):
            reduction = loss_obj.reduction  # a loss object's own reduction (nn.MSELoss(reduction="sum"))

    if weights is None and isinstance(model, (types.FunctionType, types.MethodType, functools.partial)):
        # A function holds no parameters of its own (a JAX apply function, a TF function of variables).
        raise TypeError(
            f"the model {getattr(model, '__name__', type(model).__name__)!r} is a function and no parameters were "
            "given: pass its parameter tree as the second argument, e.g. "
            "mh.hessian(apply_fn, params, data=(x, y), loss=...)"
        )
    named = backend.named_parameters(model, weights)
    if not named:
        raise ValueError(
            f"the model has no trainable parameters for {backend.name}: no floating-point array "
            "to differentiate (torch: none require gradients; unfreeze some) — or pass the parameters explicitly"
        )
    rows = select_names(named, params)
    cols = rows if col_params is None else select_names(named, col_params)
    for name, p in named:
        # An integer array outside the selection is a constant of the model.
        if (name in rows or name in cols) and not is_floating(backend.xp, p):
            raise TypeError(
                f"parameter {name!r} has dtype {dtype_name(p)}; curvature needs floating-point "
                "parameters (cast the model, or exclude it with params=)"
            )
    union = [n for n, _ in named if n in set(rows) | set(cols)]
    dtypes = {dtype_name(p) for n, p in named if n in union}
    if len(dtypes) > 1:
        raise TypeError(f"the selected parameters mix dtypes {sorted(dtypes)}; cast the model to one dtype")
    binding = backend.bind(model, weights, union)

    if distributed is not None and distributed is not False and source is None:
        raise ValueError("distributed= shards the data across processes; it needs data=")
    problem = Problem(
        backend, model, weights, binding, loss_obj, source, reduction, check_finite, progress, distributed or None
    )
    _check_problem(problem, None if first is None else problem.prepare(first, 0))
    return problem, rows, cols


def build_loss_problem(
    model: Any,
    weights: Any,
    data: Any,
    loss: Any,
    params: Any,
    reduction: str,
    backend_name: str | None,
    batch_fn: Callable[[Any], Any] | None,
    progress: bool | None,
    cache_data: bool,
    distributed: Any,
) -> Problem:
    """One problem over ``params`` with model outputs and a loss, for H and G together (reports, chain-rule errors)."""
    problem, _, _ = build_problem(
        model,
        weights,
        data,
        loss,
        params,
        None,
        reduction,
        backend_name,
        True,
        need_loss=True,
        batch_fn=batch_fn,
        progress=progress,
        cache_data=cache_data,
        distributed=distributed,
    )
    return problem


def _first_batch(source: DataSource) -> Batch:
    """The first batch of a pass (read now, to detect the framework and check the model once)."""
    for batch in source:
        return batch
    raise ValueError("data is empty: give at least one batch (x, y)")  # pragma: no cover - DataSource raises first


def convert_batch(backend: Backend, batch: Batch, like: Array, index: int) -> Batch:
    """A batch on the parameters' device: NumPy floats in the parameters' dtype, framework arrays moved.

    Framework float data must already have the parameters' dtype: casting it
    silently would hide a model and data that do not go together.
    """

    def convert(obj: Any, role: str) -> Any:
        if isinstance(obj, tuple):
            return tuple(convert(o, f"{role}[{i}]") for i, o in enumerate(obj))
        if isinstance(obj, np.ndarray):
            return backend.asarray(obj, like)
        if backend.is_array(obj):
            if is_floating(backend.xp, obj) and dtype_name(obj) != dtype_name(like):
                raise TypeError(
                    f"{role} of batch {index} is {dtype_name(obj)} but the parameters are {dtype_name(like)}; "
                    "cast the data or the model to one dtype"
                )
            return backend.asarray(obj, like)
        if isinstance(obj, list):
            raise TypeError(
                f"{role} of batch {index} is a Python list; pass an array (a list of inputs for a model with "
                "several inputs goes in a tuple: ((x_a, x_b), y))"
            )
        return obj

    x, y = batch
    return convert(x, "x"), convert(y, "y")


def batch_size(batch: Batch) -> int:
    """Number of samples of a batch: the leading axis of its first input array."""
    first = all_leaves(batch[0])[0]
    return shape(first)[0] if hasattr(first, "shape") else len(first)


def check_batch(problem: Problem, batch: Batch, index: int) -> None:
    """Checks of one batch, made the first time it is seen: not empty, finite, targets that fit the loss."""
    b = problem.backend
    if batch_size(batch) == 0:
        raise ValueError(f"batch {index} of data is empty (0 samples); drop it from the data")
    if problem.loss is not None and problem.sample_shape is not None:
        problem.loss.check_targets(b, batch[1], problem.sample_shape)  # labels in range, target shapes
    if problem.check_finite:
        for leaf in all_leaves(batch):
            if b.is_array(leaf) and is_floating(b.xp, leaf) and not all_finite(b.xp, leaf):
                raise ValueError(
                    f"batch {index} of data contains NaN or inf; clean the data or pass check_finite=False"
                )


def _check_problem(problem: Problem, first: Batch | None) -> None:
    """One-time checks: finite parameters, outputs that fit the loss on the first batch, a deterministic model."""
    b = problem.backend
    if problem.check_finite and not all_finite(b.xp, problem.binding.w):
        raise ValueError("the parameters contain NaN or inf; the curvature there is undefined")
    if problem.loss is None:
        out = problem.binding.apply(problem.binding.w, None)
        if not b.is_array(out) or shape(out) not in ((), (1,)):
            raise ValueError(
                "fn(params) must return a scalar array of its framework; got "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )
        return
    x, y = first
    out = problem.binding.apply(problem.binding.w, x)
    if not b.is_array(out):
        raise TypeError(f"the model returned {type(out).__name__}; it must return one array of outputs")
    problem.loss.check(b, out, y)
    problem.sample_shape = shape(out)[1:]
    problem.loss.value(b, out, y)  # a callable loss shows here whether it returns a scalar
    _check_deterministic(problem, x, b.to_numpy(out).astype(np.float64))


def _check_deterministic(problem: Problem, x: Any, first: np.ndarray) -> None:
    """Refuse a model whose evaluations on one batch differ (dropout or sampling left on).

    A second evaluation that differs is not proof: on some CPUs a kernel
    now and then takes another path and rounds differently (float32 logits
    a few 1e-5 apart).  Then a third evaluation decides: randomness makes
    all three differ, a stray kernel leaves two equal, and the result is a
    warning with the size of the difference.
    """
    b = problem.backend
    scale = max(1.0, float(np.max(np.abs(first))) if first.size else 1.0)
    tol = 1e-5 * scale

    def evaluation() -> np.ndarray:
        return b.to_numpy(problem.binding.apply(problem.binding.w, x)).astype(np.float64)

    def same(a: np.ndarray, c: np.ndarray) -> bool:
        return bool(np.allclose(a, c, rtol=0, atol=tol, equal_nan=True))

    second = evaluation()
    if same(first, second):
        return
    third = evaluation()
    if not (same(first, third) or same(second, third)):
        raise ValueError(
            "the model is not deterministic: three evaluations on the same batch differ "
            "(dropout or sampling in training mode?); call model.eval() or fix its randomness"
        )
    gap = float(np.nanmax(np.abs(first - second)))
    warnings.warn(
        f"two of three evaluations of the model on the same batch differed by up to {gap:.3g} "
        f"({gap / scale:.2g} of the largest output): the framework's kernels round differently from call to "
        "call on this machine; products and estimates carry differences of that size",
        RuntimeWarning,
        stacklevel=4,
    )
