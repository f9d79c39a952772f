"""Public constructors of curvature operators: ``hessian``, ``ggn`` and their relatives."""

from __future__ import annotations

from typing import Any

from ._blocks import BlockOperator
from ._finite_difference import FiniteDifferenceHessian
from ._ggn import GGNOperator
from ._hessian import HessianOperator
from ._operator import CurvatureOperator, SumOperator
from ._problem import Problem, build_problem

_COMMON_DOC = """
    Parameters
    ----------
    model : nn.Module, keras.Model, tf.Module or callable
        A stateful model, ``f(params, x)`` together with ``weights``, or a
        scalar function ``fn(params)`` (then no ``data`` and no ``loss``).
    weights : tree of arrays, optional
        The parameters of a functional model or scalar function: an array,
        dict, list or framework pytree.
    data : (x, y) or iterable of (x, y), optional
        One batch or several; the loss is their sample-weighted mean (or sum).
    loss : str or callable, optional
        ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"``, ``"poisson_nll"``
        or a framework-native ``loss(outputs, targets) -> scalar``.
    params : str, array, or list of them, optional
        Subset of parameters (names, glob patterns, or the arrays
        themselves) indexing the rows; default all trainable parameters.
    col_params : optional
        Subset indexing the columns, for a cross block; default ``params``.
    reduction : {"mean", "sum"}
        Reduction of the built-in loss, as in PyTorch.
    backend : str, optional
        ``"torch"``, ``"jax"``, ``"tensorflow"`` or a registered backend;
        by default inferred from the model and arrays.
    check_finite : bool
        Reject NaN/inf in the parameters (here), in each batch (the first
        time it is seen) and in vectors passed to products.  The check of a
        vector reads it once more and waits for one number on the host:
        about a tenth of a product on a small MLP on a CPU, nothing to speak
        of on larger models.  ``False`` skips it, and a NaN in a vector then
        goes into the product.
    batch_fn : callable, optional
        ``batch_fn(batch) -> (x, y)`` for batches that are not pairs, such as
        dicts: ``batch_fn=lambda b: (b["input_ids"], b["labels"])``.
    progress : bool, optional
        Progress bars (tqdm, when installed) over the batches of a pass and
        over the passes an estimator plans (``eigvalsh (lanczos): 7/20
        passes``): shown once the work has taken a second by default, from
        the start with ``True``, never with ``False``.
    cache_data : bool
        Hold the batches of a one-shot iterator (a generator) in memory so
        that it can be passed over more than once; other sources are
        streamed, one pass per product.
    distributed : bool or process group, optional
        Under ``torch.distributed``: each rank passes its own shard as
        ``data`` and every product, gradient and estimate is summed over the
        ranks with global sample weights (``True`` for the default group).
        Every rank draws the same probes, so every rank gets the same
        numbers.  Works on gloo (CPU) and NCCL (GPU, one device per rank).
"""


def _operator(
    kind: str,
    model: Any,
    weights: Any,
    data: Any,
    loss: Any,
    params: Any,
    col_params: Any,
    reduction: str,
    backend: str | None,
    check_finite: bool,
    data_options: dict[str, Any],
    **options: Any,
) -> CurvatureOperator:
    problem, rows, cols = build_problem(
        model,
        weights,
        data,
        loss,
        params,
        col_params,
        reduction,
        backend,
        check_finite,
        need_loss=kind in ("ggn", "curvature_effect"),
        **data_options,
    )
    full = _full_operator(kind, problem, **options)
    if rows == problem.binding.names and cols == problem.binding.names:
        return full
    row_binding = problem.bind(rows)
    col_binding = row_binding if cols == rows else problem.bind(cols)
    return BlockOperator(full, row_binding, col_binding)


def _data_options(batch_fn: Any, progress: bool | None, cache_data: bool, distributed: Any) -> dict[str, Any]:
    return {"batch_fn": batch_fn, "progress": progress, "cache_data": cache_data, "distributed": distributed}


def _full_operator(kind: str, problem: Problem, **options: Any) -> CurvatureOperator:
    if kind == "hessian":
        return HessianOperator(problem)
    if kind == "ggn":
        return GGNOperator(problem)
    if kind == "curvature_effect":
        return SumOperator([(1.0, HessianOperator(problem)), (-1.0, GGNOperator(problem))])
    if kind == "finite_difference":
        return FiniteDifferenceHessian(problem, **options)
    raise ValueError(f"unknown operator kind {kind!r}")


def hessian(
    model: Any,
    weights: Any = None,
    *,
    data: Any = None,
    loss: Any = None,
    params: Any = None,
    col_params: Any = None,
    reduction: str = "mean",
    backend: str | None = None,
    check_finite: bool = True,
    batch_fn: Any = None,
    progress: bool | None = None,
    cache_data: bool = False,
    distributed: Any = None,
) -> CurvatureOperator:
    """The exact Hessian of the loss with respect to the parameters, as a lazy operator.
    {common}
    Returns
    -------
    CurvatureOperator
        Supports ``H @ v``, ``H.matmat(V)``, ``H.shape``, ``H.dtype`` and ``H.dense()``.

    Examples
    --------
    >>> H = mh.hessian(model, data=(x, y), loss="cross_entropy")  # a 4-8-3 tanh network
    >>> H.shape
    (67, 67)
    >>> w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    >>> (mh.hessian(lambda w: (w**4).sum(), w) @ torch.ones(2, dtype=torch.float64)).tolist()  # 12 w²
    [12.0, 48.0]
    """
    return _operator(
        "hessian",
        model,
        weights,
        data,
        loss,
        params,
        col_params,
        reduction,
        backend,
        check_finite,
        _data_options(batch_fn, progress, cache_data, distributed),
    )


def ggn(
    model: Any,
    weights: Any = None,
    *,
    data: Any = None,
    loss: Any = None,
    params: Any = None,
    col_params: Any = None,
    reduction: str = "mean",
    backend: str | None = None,
    check_finite: bool = True,
    batch_fn: Any = None,
    progress: bool | None = None,
    cache_data: bool = False,
    distributed: Any = None,
) -> CurvatureOperator:
    """The generalized Gauss-Newton matrix ``J^T H_z J`` (approximate chain rule), as a lazy operator.
    {common}
    Returns
    -------
    CurvatureOperator
    """
    return _operator(
        "ggn",
        model,
        weights,
        data,
        loss,
        params,
        col_params,
        reduction,
        backend,
        check_finite,
        _data_options(batch_fn, progress, cache_data, distributed),
    )


def curvature_effect(
    model: Any,
    weights: Any = None,
    *,
    data: Any = None,
    loss: Any = None,
    params: Any = None,
    col_params: Any = None,
    reduction: str = "mean",
    backend: str | None = None,
    check_finite: bool = True,
    batch_fn: Any = None,
    progress: bool | None = None,
    cache_data: bool = False,
    distributed: Any = None,
) -> CurvatureOperator:
    """The curvature effect ``H - G = D_z ℓ • D²_w z``: what the approximate chain rule drops.
    {common}
    Returns
    -------
    CurvatureOperator
    """
    return _operator(
        "curvature_effect",
        model,
        weights,
        data,
        loss,
        params,
        col_params,
        reduction,
        backend,
        check_finite,
        _data_options(batch_fn, progress, cache_data, distributed),
    )


def finite_difference_hessian(
    model: Any,
    weights: Any = None,
    *,
    data: Any = None,
    loss: Any = None,
    params: Any = None,
    col_params: Any = None,
    reduction: str = "mean",
    backend: str | None = None,
    check_finite: bool = True,
    batch_fn: Any = None,
    progress: bool | None = None,
    cache_data: bool = False,
    distributed: Any = None,
    step: float | None = None,
) -> CurvatureOperator:
    """Hessian products by central differences of gradients, for checking exact products.
    {common}
    step : float, optional
        Relative step (default: cube root of machine epsilon); the absolute
        step is ``step · max(1, ‖w‖) / ‖v‖``.

    Returns
    -------
    CurvatureOperator
    """
    return _operator(
        "finite_difference",
        model,
        weights,
        data,
        loss,
        params,
        col_params,
        reduction,
        backend,
        check_finite,
        _data_options(batch_fn, progress, cache_data, distributed),
        step=step,
    )


for _fn in (hessian, ggn, curvature_effect, finite_difference_hessian):
    _fn.__doc__ = _fn.__doc__.replace("{common}", _COMMON_DOC)
