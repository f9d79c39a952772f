"""The same problem, weights and probes give the same products in every framework.

Each backend orders parameters its own way (JAX sorts dict keys, PyTorch
keeps insertion order), so products are compared per parameter name, in the
problem's canonical order.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ._oracles import relative_difference
from ._problems import PROBLEM_NAMES, Problem, make_problem, probes

# float64 products of two frameworks may differ only by rounding.
CROSS_RTOL = 1e-10


def _canonical_products(problem: Problem, kind: str, V: np.ndarray) -> dict[str, np.ndarray]:
    """``A V``, ``A`` dense and a block product, all in the problem's canonical parameter order."""
    ref = problem.reference
    op = getattr(problem, kind)()
    # Position in the canonical flat vector of each entry of the operator's flat vector.
    where = ref.reorder(np.arange(ref.theta.size), op.rows.names)
    out = np.empty_like(V)
    out[where] = problem.to_numpy(op.matmat(problem.to_backend(V[where])))
    dense = np.empty((V.shape[0],) * 2)
    dense[np.ix_(where, where)] = problem.to_numpy(op.dense())
    hv = np.empty(V.shape[0])
    hv[where] = problem.to_numpy(op @ problem.to_backend(V[where, 0]))
    return {f"{kind} @ V": out, f"{kind}.dense()": dense, f"{kind} @ v": hv}


@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_same_products_in_every_framework(backends: list[str], name: str) -> None:
    if len(backends) < 2:
        pytest.skip(f"cross-framework checks need two backends or more; got {backends} (repeat --backend)")
    kinds = ["hessian"] + (["ggn"] if make_problem(name, backends[0]).loss is not None else [])
    n = make_problem(name, backends[0]).reference.theta.size
    V = probes(n, n, seed=11)  # square: the shape dense() uses, traced once by compiling backends
    results = {}
    for backend in backends:
        problem = make_problem(name, backend, "float64")
        results[backend] = {k: v for kind in kinds for k, v in _canonical_products(problem, kind, V).items()}
    failures = []
    for a, b in itertools.combinations(backends, 2):
        for what in results[a]:
            gap = relative_difference(results[a][what], results[b][what])
            if not gap <= CROSS_RTOL:
                failures.append(f"{what}: {a} vs {b} differ by {gap:.3e} (relative)")
    assert not failures, "\n".join(failures)
