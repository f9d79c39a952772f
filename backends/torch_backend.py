"""PyTorch adapter: ``torch.func`` primitives plus kept-graph products.

In eager PyTorch, reverse-over-reverse with the gradient graph kept is the
fastest Hessian-vector product: the forward pass and first backward run once
per batch, and every further product is one backward pass through the kept
graph.  The same trick gives GGN products (a kept output graph for ``J^T u``
and a kept VJP graph, linear in its cotangent, for ``J v``).  Ops without a
double-backward formula (the fused CPU/GPU attention kernels behind
``scaled_dot_product_attention``) are handled by rebuilding the graph with
PyTorch's math attention kernel, which is made of differentiable primitives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import array_api_compat.torch
import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn

from .._arrays import dtype_name
from .._backend import Array, Backend, Linearization, ParameterBinding
from .._per_sample import generic_squares
from .._trees import (
    TreeLayout,
    TreeTools,
    check_not_foreign,
    flatten_by_name,
    named_leaves,
    split_flat,
    vector_trees,
)
from . import torch_per_sample

_MATERIALIZE = (
    "materialize the model first (model.to_empty(device=...) and then load or initialize the weights) "
    "and keep the data on a real device"
)


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to the twice-differentiable math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _missing_derivative(err: BaseException) -> bool:
    """Whether an autograd error says a (higher) derivative is not implemented."""
    text = str(err)
    return isinstance(err, (RuntimeError, NotImplementedError)) and (
        "not implemented" in text or "does not support" in text or "vmap" in text
    )


class _KeptGraph:
    """Graphs built once per (w, batch) and reused by every product on them.

    Builds under the default kernels first; when a product reports a missing
    derivative, rebuilds under math attention and stays there.
    """

    def __init__(self, build: Callable[[torch.Tensor, Any], Any]) -> None:
        self._build = build
        # The cached point and batch themselves (not their ids, which Python may reuse).
        self._key: tuple[Any, Any] | None = None
        self._value: Any = None
        self.math_attention = False

    def get(self, w: torch.Tensor, batch: Any) -> Any:
        if self._key is None or self._key[0] is not w or self._key[1] is not batch:
            self._value = None  # free the previous graph before building the next
            context = _math_attention() if self.math_attention else contextlib.nullcontext()
            with context, torch.enable_grad():
                self._value = self._build(w.detach().requires_grad_(True), batch)
            self._key = (w, batch)
        return self._value

    def clear(self) -> None:
        """Drop the kept graph (built again on the next use)."""
        self._key, self._value = None, None

    def run(self, w: torch.Tensor, batch: Any, use: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        try:
            return use(self.get(w, batch))
        except (RuntimeError, NotImplementedError) as err:
            if self.math_attention or not _missing_derivative(err):
                raise
            self.math_attention, self._key = True, None
            return use(self.get(w, batch))


def _grad_rows(outputs: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor, batched: bool = True) -> torch.Tensor:
    """Vector-Jacobian products for each row of ``rows`` through a kept graph: vmapped, or one backward per row."""
    if not outputs.requires_grad:
        return torch.zeros((rows.shape[0],) + inputs.shape, dtype=inputs.dtype, device=inputs.device)
    if rows.shape[0] == 1:
        # One row: a plain backward; is_grads_batched would run it under vmap, which costs more.
        return torch.autograd.grad(outputs, inputs, rows[0], retain_graph=True)[0][None]
    if batched:
        try:
            return torch.autograd.grad(outputs, inputs, rows, retain_graph=True, is_grads_batched=True)[0]
        except RuntimeError as err:
            if not _missing_derivative(err):
                raise
    # Some backward formulas have no batching rule: one backward per row.
    return torch.stack([torch.autograd.grad(outputs, inputs, r, retain_graph=True)[0] for r in rows])


# Products with several rows take whichever pass is fastest (torch_per_sample.FastestPass): the kept graph's
# backward pass vmapped over the rows ("vmap"), one backward pass per row ("loop") and, for Hessians,
# torch.func.vjp of torch.func.grad with the pullback built once per batch and vmapped ("func").  None wins
# everywhere: for 10 rows on a 2-core CPU, on the benchmark MLP the vmapped pass took 21 ms and the loop 25 ms;
# on the transformer 249 ms and 140 ms; on LeNet-5 the kept graph's vmap falls back to the loop (max-pool's
# double backward has no batching rule: 177 ms) where torch.func's pullback batches (106 ms).
_ROW_TRIALS = 2


class TorchBackend(Backend):
    """The PyTorch backend (``backend="torch"``)."""

    name = "torch"
    eager = True
    tree = TreeTools(pytree.tree_flatten_with_path, lambda spec, leaves: pytree.tree_unflatten(leaves, spec))

    @property
    def xp(self) -> Any:
        return array_api_compat.torch

    # ------------------------------------------------------------------ detection
    def owns(self, obj: Any) -> bool:
        if isinstance(obj, (torch.Tensor, nn.Module)):
            return True
        leaves = [leaf for _, leaf in named_leaves(self.tree, obj)[0]]
        if len(leaves) == 1 and leaves[0] is obj:  # not a container
            return False
        arrays = [leaf for leaf in leaves if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]
        return bool(arrays) and all(_is_tensor(a) for a in arrays)

    def is_array(self, obj: Any) -> bool:
        return _is_tensor(obj)

    def to_numpy(self, x: Array) -> np.ndarray:
        """``x`` on the host as NumPy; bfloat16, which NumPy lacks, comes back as float32 (exactly: a widening)."""
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()

    def asarray(self, a: np.ndarray | Array, like: Array) -> Array:
        if isinstance(a, torch.Tensor):
            if a.is_meta:
                raise ValueError(
                    f"a {tuple(a.shape)} tensor is on torch's 'meta' device, which holds no values; {_MATERIALIZE}"
                )
            # Pinned host memory copies to the GPU asynchronously; .to() is free on the same device.
            return a.to(like.device, non_blocking=a.device.type == "cpu" and a.is_pinned())
        a = np.asarray(a)
        dtype = like.dtype if a.dtype.kind == "f" else None
        return torch.as_tensor(a, dtype=dtype, device=like.device)

    # ------------------------------------------------------------------ parameters
    def named_parameters(self, model: Any, weights: Any) -> list[tuple[str, Array]]:
        if isinstance(model, nn.Module) and weights is None:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        else:
            named = [(n, leaf) for n, leaf in named_leaves(self.tree, weights)[0] if _is_tensor(leaf)]
        on_meta = [n for n, p in named if p.is_meta]
        if on_meta:
            raise ValueError(
                f"parameters {on_meta[:3]}{' ...' if len(on_meta) > 3 else ''} are on torch's 'meta' device, "
                f"which holds shapes but no values; {_MATERIALIZE}"
            )
        return named

    def bind(self, model: Any, weights: Any, selected: Sequence[str]) -> ParameterBinding:
        """Bind a subset; every parameter and buffer is a snapshot taken now (see :meth:`Backend.bind`)."""
        xp, names = self.xp, list(selected)
        if not (isinstance(model, nn.Module) and weights is None):
            layout = TreeLayout.of(self.tree, weights, _is_tensor)
            layout.check_selected(names)
            chosen = [layout.leaves[layout.position[n]] for n in names]
            w = torch.cat([p.detach().reshape(-1) for p in chosen]).clone()
            shapes = [tuple(p.shape) for p in chosen]
            # Snapshots of the parameters left fixed, as w is of the selected ones.
            layout.leaves = [leaf.detach().clone() if _is_tensor(leaf) else leaf for leaf in layout.leaves]

            def apply(flat: torch.Tensor, x: Any) -> torch.Tensor:
                tree = layout.filled(split_flat(xp, flat, names, shapes, torch.split))
                return model(tree) if x is None else model(tree, x)

            return ParameterBinding(w, names, shapes, apply, *vector_trees(self, layout, names, chosen))

        named = dict(self.named_parameters(model, weights))
        chosen = [named[n] for n in names]
        w = torch.cat([p.detach().reshape(-1) for p in chosen]).clone()
        shapes = [tuple(p.shape) for p in chosen]
        dtypes = [dtype_name(p) for p in chosen]
        # Snapshots of the other parameters and of the buffers: products see the model as it was
        # bound, and a model in training mode updating BatchNorm statistics cannot touch the user's.
        fixed = {n: p.detach().clone() for n, p in named.items() if n not in set(names)}
        fixed.update({n: b.detach().clone() for n, b in model.named_buffers()})

        def apply(flat: torch.Tensor, x: Any) -> torch.Tensor:
            args = x if isinstance(x, tuple) else (x,)
            # torch.split: one concatenation backward, where slices each write a full-length zero vector.
            parts = split_flat(xp, flat, names, shapes, torch.split)
            return torch.func.functional_call(model, {**fixed, **parts}, args)

        def to_tree(flat: torch.Tensor) -> dict[str, torch.Tensor]:
            return split_flat(xp, flat, names, shapes)

        def from_tree(tree: Any) -> torch.Tensor:
            if not isinstance(tree, dict):
                check_not_foreign(self, tree)
                raise TypeError(
                    f"v must be a flat tensor or a dict keyed by parameter names {names}, got {type(tree).__name__}"
                )
            return flatten_by_name(self, dict(tree), names, shapes, dtypes)

        return ParameterBinding(w, names, shapes, apply, to_tree, from_tree)

    # ------------------------------------------------------------------ primitives
    def value_and_grad(self, f: Callable[[Array], Array], w: Array) -> tuple[Array, Array]:
        g, value = torch.func.grad_and_value(f)(w)
        return value, g

    def jvp(self, f: Callable[[Array], Array], w: Array, v: Array) -> tuple[Array, Array]:
        return torch.func.jvp(f, (w,), (v,))

    def vjp(self, f: Callable[[Array], Array], w: Array, u: Array) -> tuple[Array, Array]:
        out, pullback = torch.func.vjp(f, w)
        return out, pullback(u)[0]

    def vmap(self, f: Callable[..., Array], in_axes: tuple[int | None, ...]) -> Callable[..., Array] | None:
        return torch.func.vmap(f, in_dims=in_axes)

    # ------------------------------------------------------------------ fast paths
    def hvp_function(self, loss: Callable[[Array, Any], Array]) -> Callable[[Array, Any, Array], Array]:
        def build(w_leaf: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            (g,) = torch.autograd.grad(loss(w_leaf, batch), w_leaf, create_graph=True, allow_unused=True)
            if g is None:  # the loss does not depend on w at all
                g = torch.zeros_like(w_leaf)
            return w_leaf, g

        def build_pullback(w_leaf: torch.Tensor, batch: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor]]:
            gradient = torch.func.grad(lambda p: loss(p, batch))
            return torch.func.vjp(gradient, w_leaf.detach())[1]

        graphs, pullbacks = _KeptGraph(build), _KeptGraph(build_pullback)
        passes = torch_per_sample.FastestPass(("vmap", "loop", "func"), _ROW_TRIALS)

        def hvp(w: Array, batch: Any, V: Array) -> Array:
            def kept(batched: bool) -> torch.Tensor:
                return graphs.run(w, batch, lambda k: _grad_rows(k[1], k[0], V, batched=batched))

            def func() -> torch.Tensor:
                return pullbacks.run(w, batch, lambda pullback: torch.func.vmap(pullback)(V)[0])

            out = passes(V.shape[0], {"vmap": lambda: kept(True), "loop": lambda: kept(False), "func": func}, V)
            if passes.chosen() not in (None, "func"):
                pullbacks.clear()  # its graph is not needed: free it
            return out

        return hvp

    def linearize(self, f: Callable[[Array, Any], Array], w: Array, x: Any) -> Linearization:
        def build(w_leaf: torch.Tensor, x: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            z = f(w_leaf, x)
            # J^T u is linear in u: differentiating it with respect to a dummy
            # cotangent gives J v by a second backward pass (no forward mode needed).
            dummy = torch.zeros_like(z, requires_grad=True)
            (jt_dummy,) = torch.autograd.grad(z, w_leaf, dummy, create_graph=True)
            return w_leaf, z, dummy, jt_dummy

        graphs = _KeptGraph(build)
        forward, backward = (torch_per_sample.FastestPass(("vmap", "loop"), _ROW_TRIALS) for _ in range(2))
        out = graphs.get(w, x)[1].detach()

        def rows_through(
            passes: torch_per_sample.FastestPass, ends: Callable[[Any], tuple[Any, Any]], R: Array
        ) -> Array:
            def kept(batched: bool) -> torch.Tensor:
                return graphs.run(w, x, lambda k: _grad_rows(*ends(k), R, batched=batched))

            return passes(R.shape[0], {"vmap": lambda: kept(True), "loop": lambda: kept(False)}, R)

        def jvp_rows(V: Array) -> Array:
            return rows_through(forward, lambda k: (k[3], k[2]), V)

        def vjp_rows(U: Array) -> Array:
            return rows_through(backward, lambda k: (k[1], k[0]), U)

        return Linearization(
            out,
            lambda v: jvp_rows(v[None])[0],
            lambda u: vjp_rows(u[None])[0],
            jvp_rows,
            vjp_rows,
        )

    def per_sample_squares(
        self, f: Callable[[Array, Any], Array], per_cotangent: bool = False
    ) -> Callable[[Array, Any, Callable[[Array], Array], int], Array]:
        """Squared per-sample products, structured where the op is recognized (see :mod:`.torch_per_sample`).

        Linear layers, convolutions, inference-mode batch norm and layer norm
        are summed without holding per-sample products; other reads of the
        parameters take the generic route, restricted to their entries.
        """
        generic = lambda g, pc: generic_squares(self, g, pc)  # noqa: E731
        return torch_per_sample.per_sample_squares(f, per_cotangent, generic)

    def stop_gradient(self, x: Array) -> Array:
        return x.detach()

    def all_reduce(self, x: Array, group: Any) -> Array:
        """Sum over the ranks of a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed= needs torch.distributed initialized on every rank "
                "(torch.distributed.init_process_group) before the operator is used"
            )
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=None if group is True else group)
        return out
