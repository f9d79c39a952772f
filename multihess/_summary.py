"""Per-block curvature in one call: trace, diagonal and top eigenvalue of each parameter group's block."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import ParameterBinding
from ._blocks import BlockOperator
from ._checks import check_choice, check_count, check_memory_budget, check_operator
from ._diagonal import _to_framework
from ._estimate import Estimate
from ._exact_ggn import ggn_diagonal_samples
from ._ggn import GGNOperator
from ._groups import resolve_groups as resolve_named_groups
from ._operator import CurvatureOperator
from ._probes import (
    DISTRIBUTIONS,
    RunningMoments,
    apply_rows,
    chunks,
    draw_probes,
    order_by_name,
    planned_chunks,
    probe_dtype,
    rows_per_chunk,
)
from ._problem import Problem
from ._progress import planned_passes
from ._spectral import eigvalsh

SUMMARY_METHODS = ("exact", "mc", "hutchinson")


@dataclass(frozen=True)
class BlockSummary:
    """Curvature of one parameter group: its diagonal block ``A[g, g]``.

    Attributes
    ----------
    names : list of str
        The group's parameters, in the operator's order.
    trace : Estimate
        Trace of the block (a float with its standard error).
    diagonal : Estimate
        Diagonal of the block: 1-D arrays of the model's framework over the
        group's parameters, in the order of ``names``.
    top_eigenvalue : float or None
        Largest eigenvalue of the block, by Lanczos (``None`` when not asked for).
    """

    names: list[str]
    trace: Estimate
    diagonal: Estimate
    top_eigenvalue: float | None
    _binding: ParameterBinding = field(repr=False, compare=False)

    def diagonal_tree(self) -> Any:
        """The diagonal as a parameter tree of the group (dict for an ``nn.Module``, list for Keras, pytree for JAX)."""
        return self._binding.to_tree(self.diagonal.value)


def summary(
    op: CurvatureOperator,
    groups: Any = None,
    *,
    num_probes: int = 10,
    method: str | None = None,
    distribution: str = "rademacher",
    seed: int = 0,
    num_samples: int | None = None,
    top_eigenvalue: bool = True,
    memory_budget: int | None = None,
) -> dict[str, BlockSummary]:
    """Trace, diagonal and top eigenvalue of the diagonal block of every parameter group, in one call.

    Parameters
    ----------
    op : CurvatureOperator
        A symmetric operator: a Hessian, a GGN, or a diagonal block of one.
    groups : dict or list, optional
        Default: one group per layer, parameter names grouped by the part
        before their last ``"."`` or ``"/"``.  A dict maps group names to
        parameter names or glob patterns (one or a list); a list of names or
        patterns makes one group of each, keyed by the pattern.
    num_probes : int
        Hutchinson probes per group (``method="hutchinson"``).
    method : {"exact", "mc", "hutchinson"}, optional
        How traces and diagonals are obtained.  Default ``"exact"`` for a
        GGN (one pass of per-sample products serves every group), else
        ``"hutchinson"``: for each group, probes that are zero outside it,
        all groups' probes batched through the operator together.
    distribution : {"rademacher", "gaussian"}
        Entries of the probes.
    seed : int
        Seed of ``numpy.random.default_rng`` for probes, sampled labels and
        the Lanczos starting vectors (groups draw in the order of their
        sorted names, so a seed means the same numbers in every framework).
    num_samples : int, optional
        Labels sampled per input for ``method="mc"`` (default 1).
    top_eigenvalue : bool
        Also compute each block's largest eigenvalue (Lanczos, :func:`eigvalsh`).
    memory_budget : int, optional
        Bytes the probe and product blocks (or per-sample products) may take
        at once; default 1 GiB.

    Returns
    -------
    dict of str to BlockSummary
        One entry per group, in the order of the groups.

    Examples
    --------
    >>> G = mh.ggn(model, data=(x, y), loss="cross_entropy")
    >>> for layer, s in mh.summary(G).items():
    ...     print(layer, s.trace.value > 0, s.top_eigenvalue > 0)
    0 True True
    2 True True
    """
    op = check_operator(op, "summary")
    num_probes = check_count(num_probes, "num_probes")
    distribution = check_choice(distribution, "distribution", DISTRIBUTIONS)
    budget = check_memory_budget(memory_budget)
    is_ggn = isinstance(op.inner if isinstance(op, BlockOperator) else op, GGNOperator)
    method = ("exact" if is_ggn else "hutchinson") if method is None else method
    method = check_choice(method, "method", SUMMARY_METHODS)
    if num_samples is not None and method != "mc":
        raise ValueError(f"num_samples applies to method='mc' only; method={method!r} uses num_probes")
    members = resolve_groups(op, groups)
    offsets = op.rows.offsets()
    positions = {
        g: np.concatenate([np.arange(offsets[n].start, offsets[n].stop) for n in names]) for g, names in members.items()
    }

    if method == "hutchinson":
        estimates = _block_hutchinson(op, members, positions, num_probes, distribution, seed, budget)
    else:
        samples = ggn_diagonal_samples(op, method, num_samples, seed, budget)
        estimates = {g: _from_samples(samples[:, idx], method) for g, idx in positions.items()}

    out = {}
    for g, names in members.items():
        block = _block(op, names)
        trace_est, diag_value, diag_error, num = estimates[g]
        top = float(eigvalsh(block, k=1, seed=seed)[0]) if top_eigenvalue else None
        diag = _to_framework(block, diag_value, diag_error, num, method)
        out[g] = BlockSummary(names, trace_est, diag, top, block.rows)
    return out


def resolve_groups(op: CurvatureOperator, groups: Any) -> dict[str, list[str]]:
    """Group name → parameter names (in the operator's order), checked against the operator's parameters."""
    return resolve_named_groups(_named_arrays(op), groups, "the operator's parameters")


def _problem_of(op: CurvatureOperator) -> Problem | None:
    """The problem an operator was built from, if it keeps one."""
    while True:
        if getattr(op, "problem", None) is not None:
            return op.problem
        if isinstance(op, BlockOperator):
            op = op.inner
        elif getattr(op, "terms", None):
            op = op.terms[0][1]
        else:
            return None


def _named_arrays(op: CurvatureOperator) -> list[tuple[str, Any]]:
    """``(name, array)`` of the operator's parameters, so that groups may name parameters by the arrays themselves."""
    problem = _problem_of(op)
    names = set(op.rows.names)
    if problem is None:
        return [(n, None) for n in op.rows.names]
    named = dict(problem.backend.named_parameters(problem.model, problem.weights))
    return [(n, named.get(n)) for n in op.rows.names if n in names]


def _block(op: CurvatureOperator, names: list[str]) -> CurvatureOperator:
    """The diagonal block of ``op`` for the parameters ``names``."""
    if names == op.rows.names:
        return op
    problem = _problem_of(op)
    if problem is None:
        raise ValueError(f"cannot restrict a {type(op).__name__} to a parameter group; pass groups=None")
    full = op.inner if isinstance(op, BlockOperator) else op
    binding = problem.bind(names)
    return BlockOperator(full, binding, binding)


def _from_samples(samples: np.ndarray, method: str) -> tuple[Estimate, np.ndarray, np.ndarray, int]:
    """Trace and diagonal of one group from rows of independent (or, for exact, one) diagonal estimates."""
    if method == "exact":
        return Estimate(float(samples[0].sum()), 0.0, 0, method), samples[0], np.zeros_like(samples[0]), 0
    diag, trace = RunningMoments(), RunningMoments()
    diag.add(samples)
    trace.add(samples.sum(axis=1))
    num = samples.shape[0]
    return Estimate(float(trace.mean), float(trace.std_error()), num, method), diag.mean, diag.std_error(), num


def _block_hutchinson(
    op: CurvatureOperator,
    members: dict[str, list[str]],
    positions: dict[str, np.ndarray],
    num_probes: int,
    distribution: str,
    seed: int,
    budget: int,
) -> dict[str, tuple[Estimate, np.ndarray, np.ndarray, int]]:
    """Hutchinson on every diagonal block at once: probes zero outside their group, products batched together."""
    rng = np.random.default_rng(seed)
    n, dtype = op.shape[1], probe_dtype(op)
    sizes = dict(zip(op.rows.names, op.rows.sizes))
    # Every group's probes embedded in the full vector, one block of rows per group, drawn in sorted group order.
    order = sorted(members)
    rows = np.zeros((len(order) * num_probes, n), dtype=dtype)
    for i, g in enumerate(order):
        names = members[g]
        block = draw_probes(
            rng, num_probes, len(positions[g]), distribution, order_by_name(names, [sizes[m] for m in names]), dtype
        )
        rows[i * num_probes : (i + 1) * num_probes][:, positions[g]] = block
    traces = {g: RunningMoments() for g in members}
    diagonals = {g: RunningMoments() for g in members}
    with planned_passes(planned_chunks(op, budget, rows.shape[0]), "summary (hutchinson)"):
        for start, stop in chunks(rows.shape[0], rows_per_chunk(op, budget)):
            AZ = apply_rows(op, rows[start:stop])
            for i, g in enumerate(order):
                lo, hi = max(start, i * num_probes), min(stop, (i + 1) * num_probes)
                if lo >= hi:
                    continue
                idx = positions[g]
                z = rows[lo:hi][:, idx].astype(np.float64)
                az = AZ[lo - start : hi - start][:, idx].astype(np.float64)
                traces[g].add(np.einsum("ij,ij->i", z, az))  # z_gᵀ A_gg z_g
                diagonals[g].add(z * az)  # z_g ⊙ A_gg z_g
    out = {}
    for g in members:
        est = Estimate(float(traces[g].mean), float(traces[g].std_error()), num_probes, "hutchinson")
        out[g] = (est, diagonals[g].mean, diagonals[g].std_error(), num_probes)
    return out
