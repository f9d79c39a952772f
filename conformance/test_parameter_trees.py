"""Parameter subsets and trees: the contract of ``Backend.bind`` for every backend.

For a subset ``selected`` of the parameters (in model order) a binding must
give: ``w``, the concatenation of the selected parameters raveled row-major
in that order; ``apply(w, x)``, the model with the selected parameters taken
from ``w`` and the others fixed; ``to_tree``, the user's structure with the
parameters outside the subset left out (``None``, or absent from a dict);
``from_tree``, the exact inverse of ``to_tree``, which rejects a tree with
missing or extra entries, wrong shapes, wrong dtypes or arrays of another
framework with a ``ValueError`` or ``TypeError`` naming the entry.

Values are checked against the NumPy float64 problems of :mod:`._oracles`.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from . import _oracles as oracles
from . import mh
from ._problems import Problem, make_problem, probes

DTYPES = ("float64", "float32")
# Forward passes agree with the float64 oracle to rounding in the problem's dtype.
FORWARD_RTOL = {"float64": 1e-12, "float32": 1e-5}


class ForeignArray:
    """An array of a framework no backend knows: it has a shape and a dtype, and converts to NumPy."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = np.asarray(a)
        self.shape, self.dtype = self._a.shape, self._a.dtype

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._a if dtype is None else self._a.astype(dtype)


def _subsets(names: list[str]) -> list[list[str]]:
    """Every subset of the parameters with one, two (also not adjacent) and all of them, in model order."""
    singles = [[n] for n in names]
    pairs = [list(p) for p in itertools.combinations(names, 2)]
    return singles + pairs + [list(names)]


def _left_out(tree: Any, key: str) -> bool:
    return key not in tree or tree[key] is None


def _rejects(binding: Any, tree: Any, entry: str, what: str) -> None:
    """``binding.from_tree(tree)`` must raise ValueError or TypeError whose message names ``entry``."""
    with pytest.raises((ValueError, TypeError)) as info:
        binding.from_tree(tree)
    assert entry in str(info.value), f"from_tree with {what}: the error must name the entry {entry!r}: {info.value}"


def _foreign_arrays(backend: str, a: np.ndarray) -> list[Any]:
    """Arrays of frameworks other than ``backend``'s: NumPy (unless its arrays are NumPy arrays) and an unknown one."""
    out: list[Any] = [ForeignArray(a)]
    if not mh.get_backend(backend).is_array(a):
        out.append(a)
    return out


def _forward(problem: Problem, params: dict[str, np.ndarray]) -> np.ndarray:
    """The float64 oracle of ``apply``: network outputs, or the value of the input function."""
    ref = problem.reference
    if ref.kind == "input_function":
        theta = np.concatenate([params[n].ravel() for n in ref.names])
        return np.asarray(oracles.loss_value(ref, theta))
    return oracles.forward(ref, params)


# ----------------------------------------------------------------------
# bind on a flat dict of parameters, for every subset
# ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tanh_mlp", "input_function"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_binding_of_every_subset(backend: str, name: str, dtype: str) -> None:
    problem = make_problem(name, backend, dtype)
    impl, ref = mh.get_backend(backend), problem.reference
    x = None if problem.data is None else problem.data[0]
    rtol = FORWARD_RTOL[dtype]
    for selected in _subsets(problem.names):
        binding = impl.bind(problem.model, problem.weights, selected)
        what = f"bind(selected={selected})"
        assert list(binding.names) == selected, f"{what}: names {binding.names}"
        assert [tuple(s) for s in binding.shapes] == [ref.shapes[n] for n in selected], f"{what}: shapes"
        # w: the selected parameters raveled row-major and concatenated in the order of `selected`, exactly.
        w = impl.to_numpy(binding.w)
        assert w.dtype == np.dtype(dtype), f"{what}: w has dtype {w.dtype}, the parameters {dtype}"
        np.testing.assert_array_equal(w, ref.reorder(ref.theta, selected), err_msg=f"{what}: w")

        # apply: selected parameters from its argument, the others fixed at their values.
        delta = probes(w.size, 1, seed=21)[:, 0].astype(dtype)
        moved = (w.astype(np.float64) + delta.astype(np.float64)).astype(dtype).astype(np.float64)
        params = dict(ref.params)
        start = 0
        for n in selected:
            size = int(np.prod(ref.shapes[n], dtype=np.int64))
            params[n] = moved[start : start + size].reshape(ref.shapes[n])
            start += size
        out = problem.to_numpy(binding.apply(problem.to_backend(moved), x))
        expected = _forward(problem, params)
        np.testing.assert_allclose(
            out, expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)), err_msg=f"{what}: apply(w + δ, x)"
        )

        # to_tree: the user's structure (a dict here), the parameters outside the subset left out.
        tree = binding.to_tree(problem.to_backend(moved))
        assert isinstance(tree, dict), f"{what}: to_tree must answer in the parameters' structure, a dict"
        for n in problem.names:
            if n in selected:
                assert tuple(tree[n].shape) == ref.shapes[n], f"{what}: to_tree(w)[{n!r}] shape"
                np.testing.assert_array_equal(problem.to_numpy(tree[n]), params[n], err_msg=f"to_tree(w)[{n!r}]")
            else:
                assert _left_out(tree, n), f"{what}: to_tree(w) must leave out {n!r} (None or absent)"
        # from_tree(to_tree(w)) == w, exactly and in the parameters' dtype.
        back = impl.to_numpy(binding.from_tree(tree))
        assert back.dtype == np.dtype(dtype), f"{what}: from_tree gives dtype {back.dtype}"
        np.testing.assert_array_equal(back.astype(np.float64), moved, err_msg=f"{what}: from_tree(to_tree(w))")


# ----------------------------------------------------------------------
# from_tree rejects trees that do not match, naming the entry
# ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_from_tree_rejects_mismatched_trees(backend: str, dtype: str) -> None:
    problem = make_problem("tanh_mlp", backend, dtype)
    impl, ref = mh.get_backend(backend), problem.reference
    names = problem.names
    for selected in (names, names[1:3]):
        binding = impl.bind(problem.model, problem.weights, selected)
        good = binding.to_tree(binding.w)
        target = selected[-1]

        missing = {k: v for k, v in good.items() if k != target}
        _rejects(binding, missing, target, f"entry {target!r} missing")
        unset = {**good, target: None}
        _rejects(binding, unset, target, f"entry {target!r} set to None")

        bogus = {**good, "bogus": problem.to_backend(np.ones(2))}
        _rejects(binding, bogus, "bogus", "an entry that is no parameter")
        outside = [n for n in names if n not in selected]
        if outside:
            extra = {**good, outside[0]: problem.weights[outside[0]]}
            _rejects(binding, extra, outside[0], "an entry outside the subset")

        shape = ref.shapes[target]
        bad_shape = np.ones(shape[::-1] if len(shape) > 1 else (shape[0] + 1,))
        wrong = {**good, target: problem.to_backend(bad_shape)}
        _rejects(binding, wrong, target, f"a wrong shape for {target!r}")

        for foreign in _foreign_arrays(backend, np.ones(ref.shapes[target], dtype=dtype)):
            mixed = {**good, target: foreign}
            _rejects(binding, mixed, target, f"a {type(foreign).__name__} for {target!r}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_tree_rejects_a_wrong_dtype(backend: str, dtype: str) -> None:
    problem = make_problem("tanh_mlp", backend, dtype)
    impl = mh.get_backend(backend)
    other = impl.xp.float32 if dtype == "float64" else impl.xp.float64
    for selected in (problem.names, problem.names[1:3]):
        binding = impl.bind(problem.model, problem.weights, selected)
        good = binding.to_tree(binding.w)
        for target in selected:
            cast = {**good, target: impl.xp.astype(good[target], other)}
            _rejects(binding, cast, target, f"a wrong dtype for {target!r}")
        # Every entry cast: from_tree must not answer a vector of another dtype.
        every = {n: (None if a is None else impl.xp.astype(a, other)) for n, a in good.items()}
        with pytest.raises((ValueError, TypeError)) as info:
            binding.from_tree(every)
        assert any(n in str(info.value) for n in selected), f"the error must name an entry: {info.value}"


# ----------------------------------------------------------------------
# Nested trees of dicts and lists
# ----------------------------------------------------------------------
def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"layer1": {"weight", "bias"}, "layer2": [weight, bias]}``: a dict and a list inside a dict."""
    return {
        "layer1": {"weight": flat["layer1.weight"], "bias": flat["layer1.bias"]},
        "layer2": [flat["layer2.weight"], flat["layer2.bias"]],
    }


def _flat(nested: dict[str, Any]) -> dict[str, Any]:
    return {
        "layer1.weight": nested["layer1"]["weight"],
        "layer1.bias": nested["layer1"]["bias"],
        "layer2.weight": nested["layer2"][0],
        "layer2.bias": nested["layer2"][1],
    }


def _nested_get(tree: Any, key: str) -> Any:
    """The entry of a nested tree answered by to_tree for the problem's parameter ``key`` (None if left out)."""
    layer, part = key.split(".")
    inner = tree.get(layer) if isinstance(tree, dict) else None
    if inner is None:
        return None
    if isinstance(inner, dict):
        return inner.get(part)
    return inner[0 if part == "weight" else 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_trees(backend: str, dtype: str) -> None:
    problem = make_problem("tanh_mlp", backend, dtype)
    impl, ref = mh.get_backend(backend), problem.reference
    weights = _nested(problem.weights)
    model = lambda params, x: problem.model(_flat(params), x)  # noqa: E731
    named = impl.named_parameters(model, weights)
    backend_names = [n for n, _ in named]
    assert len(set(backend_names)) == len(backend_names) == len(ref.names), f"names must be unique: {backend_names}"
    # Which problem parameter each backend name stands for, by the identity of the arrays.
    key_of = {}
    for n, array in named:
        keys = [k for k, v in problem.weights.items() if v is array]
        assert len(keys) == 1, f"named_parameters must list the arrays of the tree itself; {n!r} is none of them"
        key_of[n] = keys[0]
    x = problem.data[0]
    for selected in ([backend_names[0]], backend_names[1:3], backend_names):
        keys = [key_of[n] for n in selected]
        binding = impl.bind(model, weights, selected)
        what = f"nested tree, bind(selected={selected})"
        np.testing.assert_array_equal(impl.to_numpy(binding.w), ref.reorder(ref.theta, keys), err_msg=what)
        v = probes(binding.size, 1, seed=22)[:, 0].astype(dtype).astype(np.float64)
        params = dict(ref.params)
        start = 0
        for k in keys:
            size = int(np.prod(ref.shapes[k], dtype=np.int64))
            params[k] = v[start : start + size].reshape(ref.shapes[k])
            start += size
        out = problem.to_numpy(binding.apply(problem.to_backend(v), x))
        expected = oracles.forward(ref, params)
        rtol = FORWARD_RTOL[dtype]
        np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)), err_msg=what)

        tree = binding.to_tree(problem.to_backend(v))
        assert isinstance(tree, dict) and isinstance(tree.get("layer1"), (dict, type(None))), f"{what}: {tree!r}"
        for k in ref.names:
            entry = _nested_get(tree, k)
            if k in keys:
                assert entry is not None, f"{what}: to_tree lost {k!r}"
                np.testing.assert_array_equal(problem.to_numpy(entry), params[k], err_msg=f"{what}: to_tree {k!r}")
            else:
                assert entry is None, f"{what}: to_tree must leave out {k!r}"
        back = impl.to_numpy(binding.from_tree(tree))
        assert back.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(back.astype(np.float64), v, err_msg=f"{what}: from_tree(to_tree(w))")


# ----------------------------------------------------------------------
# The same through the operators: trees in, trees out, on parameter blocks
# ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_block_products_on_trees(backend: str, kind: str) -> None:
    dtype = "float64"
    problem = make_problem("tanh_mlp", backend, dtype)
    ref = problem.reference
    rows, cols = ["layer1.bias", "layer2.weight"], ["layer1.weight", "layer2.bias"]
    op = getattr(problem, kind)(params=rows, col_params=cols)
    oracle = problem.oracle_hessian if kind == "hessian" else problem.oracle_ggn
    v = probes(op.shape[1], 1, seed=23)[:, 0]
    tree = op.cols.to_tree(problem.to_backend(v))
    out = op @ tree
    assert isinstance(out, dict), f"a dict of parameters must come back as a dict, got {type(out).__name__}"
    expected = oracle(op.rows.names, op.cols.names) @ v  # v is laid out in the order of op.cols.names
    start = 0
    for n in op.rows.names:
        size = int(np.prod(ref.shapes[n], dtype=np.int64))
        np.testing.assert_allclose(
            problem.to_numpy(out[n]).ravel(), expected[start : start + size], rtol=1e-10, atol=1e-12, err_msg=n
        )
        start += size
    for n in cols:
        assert _left_out(out, n), f"({kind} block @ tree) must leave out the column parameter {n!r}"
