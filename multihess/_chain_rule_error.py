"""How much the approximate chain rule misses along a direction: ``vᵀGv`` against ``vᵀHv`` per parameter group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._ggn import GGNOperator
from ._groups import resolve_groups
from ._hessian import HessianOperator
from ._problem import Problem, build_loss_problem

ALL = "all"
"""Key of the result for the whole direction."""


@dataclass(frozen=True)
class ChainRuleResult:
    """Curvature along one direction, exact and by the approximate chain rule.

    Attributes
    ----------
    vGv : float
        ``vᵀ G v``, with ``G`` the generalized Gauss-Newton matrix.
    vHv : float
        ``vᵀ H v``, with ``H`` the exact Hessian.
    relative_error : float
        ``|vᵀGv - vᵀHv| / ‖v‖²``: the curvature effect along ``v`` relative
        to its squared length (NaN when ``v`` is zero on the group).
    """

    vGv: float
    vHv: float
    relative_error: float


def chain_rule_error(
    model: Any,
    weights: Any = None,
    *,
    data: Any,
    loss: Any,
    direction: Any = None,
    groups: Any = None,
    params: Any = None,
    reduction: str = "mean",
    backend: str | None = None,
    batch_fn: Any = None,
    progress: bool | None = None,
    cache_data: bool = False,
    distributed: Any = None,
) -> dict[str, ChainRuleResult]:
    """Compare the exact Hessian with the approximate chain rule along a direction, per parameter group.

    For each group the direction is restricted to the group's parameters
    (zero elsewhere), ``v_g``, and ``v_gᵀ G v_g``, ``v_gᵀ H v_g`` and
    ``|v_gᵀ G v_g − v_gᵀ H v_g| / ‖v_g‖²`` are reported; ``"all"`` uses the
    whole direction.  The difference is the curvature effect
    ``D_z ℓ • D²_w z`` along ``v_g``: zero when the outputs are linear in the
    group's parameters (a last linear layer, any single layer of a ReLU
    network), non-zero across layers.

    Parameters
    ----------
    model, weights, data, loss, params, reduction, backend, batch_fn, progress, cache_data, distributed
        As for :func:`hessian`; ``data`` and ``loss`` are required.  The
        gradient, ``Hv`` and ``Gv`` are one pass over the data each.
    direction : flat array or parameter tree, optional
        The direction ``v`` over the selected parameters, in the model's
        framework and dtype; default the gradient of the loss.
    groups : dict or list, optional
        Default: one group per layer, i.e. parameter names grouped by the
        part before their last ``"."`` or ``"/"``.  A dict maps group names
        to parameter names or glob patterns (one or a list); a list of names
        or patterns makes one group of each, keyed by the pattern.
    Returns
    -------
    dict of str to ChainRuleResult
        ``"all"`` first, then the groups in the order given (by default in
        the order of the parameters).

    Examples
    --------
    >>> errors = mh.chain_rule_error(model, data=(x, y), loss="cross_entropy")
    >>> errors["2"].relative_error < 1e-12  # the last layer is linear in its weights: G == H there
    True
    >>> errors["all"].relative_error > 1e-6  # across the tanh layer it is not
    True
    """
    problem = build_loss_problem(
        model, weights, data, loss, params, reduction, backend, batch_fn, progress, cache_data, distributed
    )
    return chain_rule_errors(problem, direction, groups)


def chain_rule_errors(problem: Problem, direction: Any, groups: Any) -> dict[str, ChainRuleResult]:
    """:func:`chain_rule_error` on a problem already built (shared with the operators of a report)."""
    b, binding = problem.backend, problem.binding
    H, G = HessianOperator(problem), GGNOperator(problem)
    v = _gradient(problem) if direction is None else H._flatten_input(direction)[0]
    members = _resolve_groups(problem, groups)

    # One row per group: the direction with every parameter outside the group set to zero.
    full = np.asarray(b.to_numpy(v), dtype=np.float64)
    offsets = binding.offsets()
    rows = [full]
    for names in members.values():
        row = np.zeros_like(full)
        for name in names:
            row[offsets[name]] = full[offsets[name]]
        rows.append(row)
    V = np.stack(rows)
    V_device = b.asarray(V, binding.w)
    # v → Hv and v → Gv for all rows at once; the quadratic forms are summed in float64.
    HV = np.asarray(b.to_numpy(H._matmat_rows(V_device)), dtype=np.float64)
    GV = np.asarray(b.to_numpy(G._matmat_rows(V_device)), dtype=np.float64)
    V = np.asarray(b.to_numpy(V_device), dtype=np.float64)  # the rows as the products saw them
    vHv, vGv, norm_sq = np.sum(V * HV, axis=1), np.sum(V * GV, axis=1), np.sum(V * V, axis=1)
    out = {}
    for i, key in enumerate([ALL, *members]):
        error = abs(vGv[i] - vHv[i]) / norm_sq[i] if norm_sq[i] > 0 else float("nan")
        out[key] = ChainRuleResult(float(vGv[i]), float(vHv[i]), float(error))
    return out


def _gradient(problem: Problem) -> Any:
    """The gradient of the (batch-weighted) loss at the bound parameters."""
    b, w = problem.backend, problem.binding.w
    total = problem.batch_sum(lambda batch: b.value_and_grad(lambda p: problem.batch_loss(p, batch), w)[1])
    return b.stop_gradient(total)


def _resolve_groups(problem: Problem, groups: Any) -> dict[str, list[str]]:
    """Group name → parameter names (in parameter order), checked against the selected parameters."""
    selected = set(problem.binding.names)
    named = [(n, p) for n, p in problem.backend.named_parameters(problem.model, problem.weights) if n in selected]
    out = resolve_groups(named, groups, "the selected parameters")
    if ALL in out:
        if groups is None:
            raise ValueError(
                f"a layer is named {ALL!r}, the key reserved for the whole direction; "
                "pass groups={name: parameters} with other names"
            )
        raise ValueError(f"{ALL!r} is reserved for the whole direction; rename that group")
    return out
