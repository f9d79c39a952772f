"""TensorFlow adapter: ``tf.GradientTape`` products compiled with ``tf.function``.

Models are Keras 3 models and layers (evaluated with ``stateless_call``, so
the user's variables are never read inside a product nor written),
``tf.Module`` objects (evaluated through a shallow copy whose variables are
replaced by tensors), functions ``f(params, x)`` of a tensor, list, dict or
any ``tf.nest`` structure ``params``, and plain scalar functions
``fn(params)``.

Parameter names are ``variable.path`` for Keras (``"sequential/dense/kernel"``),
the dotted attribute path for a ``tf.Module`` (``"layers.0.w"``) and the
dotted key path of the structure for ``f(params, x)`` (``"dense.kernel"``; a
bare tensor is ``"params"``).  The flat vector follows
``trainable_variables`` for stateful models and ``tf.nest`` order (dict keys
sorted) for structures.  A tree shaped like the parameters is a list in
``trainable_variables`` order for stateful models (``None`` in place of
parameters outside ``params=``) and the structure of ``params`` otherwise.

Choices, measured on CPU (Keras MLP 784-256-10, batch 128, float32, each
variant compiled with ``tf.function``):

* Hessian-vector products are reverse-over-reverse: the gradient is built
  once under an outer tape and each vector costs one more backward pass.
  Forward-over-reverse through ``tf.autodiff.ForwardAccumulator`` measured
  1.5x slower (TensorFlow computes forward-mode derivatives op by op from
  the reverse-mode ones); it stays available as ``hvp_mode="forward"``.
* JVPs transpose the VJP: ``J v = d/du (J^T u) · v`` with a second tape on
  a dummy cotangent ``u`` (``J^T u`` is linear in ``u``).  This measured
  1.6x faster than ``ForwardAccumulator`` for a JVP and 1.2x for a GGN
  product; ``jvp_mode="accumulator"`` selects the latter.
* Products with ``k`` vectors run in one compiled call: the shared part
  (forward pass, gradient) once, then ``tf.map_fn`` over the vectors.
  ``tf.vectorized_map`` was at best 1.3x faster at ``k = 10`` but 1.5-2x
  slower at ``k = 64`` (it holds every vector's intermediates at once), and
  an unrolled Python loop traced 10x longer, so
  :meth:`TensorFlowBackend.vmap` returns ``None``.  Under XLA
  (``jit_compile=True``) the vectors are unrolled after all, 16 per
  program: XLA's CPU while loops ran backward passes through convolutions
  5-13x slower than the same passes written out.  Per-sample products
  (exact GGN diagonals), where a loop would trace one model copy per
  sample, do use ``tf.vectorized_map`` — except for models with einsums or
  batched matmuls (Keras ``EinsumDense``, ``MultiHeadAttention``) while
  oneDNN's CPU kernels are on: there the vectorized per-sample gradients
  corrupted the heap and aborted the process (TensorFlow 2.21, Keras 3), so
  those pairs go through ``tf.map_fn``, slower and sound.  Under oneDNN,
  models with convolutions or fused batch norms evaluate each sample as a
  batch of two copies of it (half the cotangent each): gradients on a batch
  of one crashed the process (a ResNet in inference mode), vectorized or not.
* ``tf.function`` keeps exact shapes (no ``reduce_retracing``): the core's
  losses read static shapes, and repeated products on one batch with the
  same number of vectors reuse one trace.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from .._arrays import shape as shape_of
from .._backend import (
    Array,
    Backend,
    Linearization,
    ParameterBinding,
    parameters_joined,
    product_on_parts,
    quadratic_forms,
)
from .._per_sample import generic_squares
from .._trees import (
    TreeLayout,
    TreeTools,
    framework_of,
    named_leaves,
    split_flat,
    vector_trees,
)
from . import tensorflow_namespace
from .tensorflow_calls import FlatCall
from .tensorflow_models import (
    as_tensor,
    is_array_like,
    is_keras_layer,
    is_tf_array,
    stateful_binding,
    stateful_parameters,
    tf_dtype,
)
from .tensorflow_moments import with_exact_moments

_ZERO = tf.UnconnectedGradients.ZERO
_UNROLLED_ROWS = 16
"""Rows per XLA-compiled batched product, whose rows are unrolled (see ``TensorFlowBackend._each_row``)."""
_HVP_MODES = ("reverse", "forward")
_JVP_MODES = ("transpose", "accumulator")


# ----------------------------------------------------------------------------- tf.nest structures
def _flatten_with_path(tree: Any) -> tuple[list[tuple[tuple[Any, ...], Any]], Any]:
    """``keras.tree`` paths of the leaves of a ``tf.nest`` structure (namedtuple fields by name); treedef: the tree.

    ``keras.tree`` orders leaves as ``tf.nest`` does (mapping keys sorted),
    which rebuilds the structure; a structure where the two disagree is refused
    rather than filled in the wrong order.
    """
    import keras

    with_path = keras.tree.flatten_with_path(tree)
    flat = tf.nest.flatten(tree)
    if len(with_path) != len(flat) or any(a is not b for (_, a), b in zip(with_path, flat)):
        raise TypeError(
            f"params of type {type(tree).__name__} is a structure whose leaves cannot be named in tf.nest order; "
            "pass a tensor, or nested dicts, lists, tuples and namedtuples of tensors"
        )
    return [(_field_names(tree, path), leaf) for path, leaf in with_path], tree


def _field_names(tree: Any, path: tuple[Any, ...]) -> tuple[Any, ...]:
    """``path`` with the positions inside namedtuples replaced by their field names."""
    out, node = [], tree
    for key in path:
        fields = getattr(node, "_fields", None) if isinstance(node, tuple) else None
        out.append(fields[key] if fields is not None else key)
        node = node[key]
    return tuple(out)


def _onednn_kernels_on() -> bool:
    """Whether TensorFlow runs oneDNN's CPU kernels (the default of x86 builds unless ``TF_ENABLE_ONEDNN_OPTS=0``)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        built = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # the private probe moved: assume the kernels are on
        built = True
    return built and os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() not in ("0", "false", "off")


_UNSAFE_TO_VECTORIZE = frozenset({"Einsum", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"})
"""Op types whose vectorized gradients corrupted the heap under oneDNN (``tf.einsum`` lowers to batched matmuls)."""

_UNSAFE_ON_ONE_SAMPLE = frozenset(
    {"Conv2D", "Conv3D", "DepthwiseConv2dNative", "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
)
"""Op types whose gradients on a batch of one sample crashed the process under oneDNN (a ResNet: invalid
pointer or segmentation fault), vectorized or not; on a batch of two copies of the sample they run."""


def _op_types(f: Callable[[Array, Any], Array], w: tf.Tensor, x: Any) -> set[str]:
    """The op types in the graph of ``f(w, x)`` (traced once more; one sample of ``x`` is enough)."""
    specs = tf.nest.map_structure(lambda a: tf.TensorSpec.from_tensor(a) if tf.is_tensor(a) else a, (w, x))
    return _graph_op_types(tf.function(lambda *args: f(*args)).get_concrete_function(*specs).graph)


def _op_types_under_onednn(f: Callable[[Array, Any], Array], w: tf.Tensor, x: Any) -> set[str]:
    """:func:`_op_types` while oneDNN's kernels are on, else nothing: the unsafe ops are unsafe only there."""
    return _op_types(f, w, x) if _onednn_kernels_on() else set()


class _VectorizedUnlessUnsafe:
    """``dense(w, batch, chunk)``, vectorized over each chunk unless the model has ops unsafe to vectorize.

    The ops of :data:`_UNSAFE_TO_VECTORIZE` are looked for, while oneDNN's
    kernels are on, in the loss traced once on the first call's batch (the
    ops come from the model, not from the shapes); with them the chunk runs
    as a while loop.
    """

    def __init__(self, program: Callable[..., tf.Tensor], loss: Callable[[Array, Any], Array]) -> None:
        self.program, self.loss = program, loss
        self.vectorized: bool | None = None

    def __call__(self, w: tf.Tensor, batch: Any, chunk: int) -> tf.Tensor:
        if self.vectorized is None:
            self.vectorized = not _op_types_under_onednn(self.loss, w, batch) & _UNSAFE_TO_VECTORIZE
        return self.program(w, batch, chunk, self.vectorized)


def _in_groups(program: Callable[..., tf.Tensor], group: int | None) -> Callable[..., tf.Tensor]:
    """``program(w, batch, rows)`` called on at most ``group`` rows at a time (all at once for ``None``), joined.

    Groups of one size share one trace; only the last, shorter group adds one.
    """
    if group is None:
        return program

    def grouped(w: tf.Tensor, batch: Any, rows: tf.Tensor) -> tf.Tensor:
        k = int(rows.shape[0])
        if k <= group:
            return program(w, batch, rows)
        return tf.concat([program(w, batch, rows[i : i + group]) for i in range(0, k, group)], 0)

    return grouped


def _tile_samples(a: tf.Tensor, times: int) -> tf.Tensor:
    """``a`` repeated ``times`` times along the sample axis 0: ``[a; a; ...]``."""
    return tf.tile(a, [times] + [1] * (len(a.shape) - 1))


# ----------------------------------------------------------------------------- the backend
INEXACT_UNDER_XLA = frozenset({"MaxPoolGradGrad", "MaxPoolGradGradV2", "MaxPool3DGradGrad"})
"""Ops whose XLA lowering is far less precise than TensorFlow's kernels.

The second derivative of max pooling: on a CPU, TensorFlow 2.21's XLA gave a
LeNet-5's Hessian-vector product 3 % off in float32 (its own kernels: 3e-7
off the float64 product), and compiles no float64 kernel for it at all.
"""


class XlaUnlessInexact:
    """A program compiled by XLA, unless its first trace holds an op of :data:`INEXACT_UNDER_XLA`.

    The first call traces the XLA variant (tracing compiles nothing yet) and
    looks through its graph and the functions it calls (loop bodies, nested
    tapes).  If an inexact op is there, a ``RuntimeWarning`` says so and
    every call runs the plain ``tf.function`` instead: slower, but right.
    The ops come from the model, not from the shapes, so one look serves
    every later signature.
    """

    def __init__(self, xla: Any, plain: Any) -> None:
        self.xla, self.plain = xla, plain
        self.chosen: Any = None

    def __call__(self, *args: Any) -> Any:
        if self.chosen is None:
            inexact = sorted(_graph_op_types(self.xla.get_concrete_function(*args).graph) & INEXACT_UNDER_XLA)
            if inexact:
                warnings.warn(
                    f"jit_compile=True: XLA computes {', '.join(inexact)} (second derivatives of max pooling) "
                    "far less precisely than TensorFlow (3 % off in float32); this product runs without XLA",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.chosen = self.plain if inexact else self.xla
        return self.chosen(*args)


def _graph_op_types(graph: Any) -> set[str]:
    """The op types of a traced graph and of every function in its library."""
    definition = graph.as_graph_def()
    found = {node.op for node in definition.node}
    for function in definition.library.function:
        found.update(node.op for node in function.node_def)
    return found


class TensorFlowBackend(Backend):
    """The TensorFlow backend (``backend="tensorflow"``, also ``"tf"`` and ``"keras"``).

    Parameters
    ----------
    hvp_mode : {"reverse", "forward"}
        Hessian-vector products by reverse-over-reverse (default, faster in
        TensorFlow) or forward-over-reverse (``ForwardAccumulator`` around a
        ``GradientTape``).
    jvp_mode : {"transpose", "accumulator"}
        JVPs by transposing a VJP (default, faster) or by
        ``tf.autodiff.ForwardAccumulator``.
    jit_compile : bool
        Passed to ``tf.function``: compile products with XLA.  Off by default
        because XLA rejects some ops, compiles each shape anew, and takes
        longer on some models than TensorFlow's own kernels.  On small
        models it removes the flat parameter vector's copies.  Programs
        with second derivatives of max pooling, which XLA gets wrong, run
        without it, with a warning.

    Examples
    --------
    >>> H = mh.hessian(model, data=(x, y), loss="mse", backend=TensorFlowBackend(jit_compile=True))  # doctest: +SKIP
    """

    name = "tensorflow"
    eager = False
    xp = tensorflow_namespace
    tree = TreeTools(_flatten_with_path, lambda structure, leaves: tf.nest.pack_sequence_as(structure, leaves))

    def __init__(self, hvp_mode: str = "reverse", jvp_mode: str = "transpose", jit_compile: bool = False) -> None:
        if hvp_mode not in _HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {_HVP_MODES}, got {hvp_mode!r}")
        if jvp_mode not in _JVP_MODES:
            raise ValueError(f"jvp_mode must be one of {_JVP_MODES}, got {jvp_mode!r}")
        self.hvp_mode = hvp_mode
        self.jvp_mode = jvp_mode
        self.jit_compile = bool(jit_compile)

    # ------------------------------------------------------------------ detection
    def owns(self, obj: Any) -> bool:
        if is_tf_array(obj) or isinstance(obj, tf.Module) or is_keras_layer(obj):
            return True
        if callable(obj) and framework_of(obj) in ("tensorflow", "keras"):
            return True  # a tf.function-wrapped apply function
        if not tf.nest.is_nested(obj):
            return False
        arrays = [leaf for leaf in tf.nest.flatten(obj) if is_array_like(leaf) or is_tf_array(leaf)]
        # Non-array leaves (sizes, activation functions) are allowed; arrays of another framework are not.
        return bool(arrays) and all(is_tf_array(a) for a in arrays)

    def is_array(self, obj: Any) -> bool:
        return is_tf_array(obj)

    def to_numpy(self, x: Array) -> np.ndarray:
        """``x`` on the host as NumPy; bfloat16 comes back as float32 (exactly), as in every backend."""
        x = as_tensor(x)
        if x.dtype == tf.bfloat16:
            x = tf.cast(x, tf.float32)
        return np.asarray(x.numpy())

    def asarray(self, a: np.ndarray | Array, like: Array) -> Array:
        if is_tf_array(a):
            # TensorFlow places ops by their inputs' devices and copies as needed: nothing to move here.
            return a
        a = np.asarray(a)
        if a.dtype.kind == "f":
            # Floats take the parameters' dtype; labels keep their integer dtype.
            a = a.astype(tf_dtype(like).as_numpy_dtype, copy=False)
        device = getattr(like, "device", "") if tf.executing_eagerly() else ""
        if device:
            with tf.device(device):
                return tf.constant(a)
        return tf.constant(a)

    # ------------------------------------------------------------------ parameters
    def _stateful(self, model: Any, weights: Any) -> bool:
        return weights is None and (is_keras_layer(model) or isinstance(model, tf.Module))

    def named_parameters(self, model: Any, weights: Any) -> list[tuple[str, Array]]:
        if weights is None:
            return stateful_parameters(model)
        return [(n, leaf) for n, leaf in named_leaves(self.tree, weights)[0] if is_tf_array(leaf)]

    def bind(self, model: Any, weights: Any, selected: Sequence[str]) -> ParameterBinding:
        """Bind a subset; every parameter is a snapshot taken now (see :meth:`Backend.bind`)."""
        xp, names = self.xp, list(selected)
        if not self._stateful(model, weights):
            layout = TreeLayout.of(self.tree, weights, is_tf_array)
            layout.check_selected(names)
            # Snapshots: products see the values of the moment of binding, whatever happens to the variables later.
            layout.leaves = [tf.identity(as_tensor(leaf)) if is_tf_array(leaf) else leaf for leaf in layout.leaves]
            chosen = [layout.leaves[layout.position[n]] for n in names]
            shapes = [shape_of(p) for p in chosen]

            @with_exact_moments
            def apply_function(flat: tf.Tensor, x: Any) -> tf.Tensor:
                tree = layout.filled(split_flat(xp, flat, names, shapes, tf.split))
                return model(tree) if x is None else model(tree, x)

            w = tf.concat([tf.reshape(p, [-1]) for p in chosen], axis=0)
            return ParameterBinding(w, names, shapes, apply_function, *vector_trees(self, layout, names, chosen))

        return stateful_binding(self, model, self.named_parameters(model, weights), names)

    # ------------------------------------------------------------------ primitives
    def value_and_grad(self, f: Callable[[Array], Array], w: Array) -> tuple[Array, Array]:
        with tf.GradientTape() as tape:
            tape.watch(w)
            value = f(w)
        return value, tape.gradient(value, w, unconnected_gradients=_ZERO)

    def jvp(self, f: Callable[[Array], Array], w: Array, v: Array) -> tuple[Array, Array]:
        if self.jvp_mode == "accumulator":
            with tf.autodiff.ForwardAccumulator(w, v) as acc:
                out = f(w)
            return out, acc.jvp(out, unconnected_gradients=_ZERO)
        # J v as the derivative of the linear map u -> J^T u, applied to v.
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(w)
                out = f(w)
            u = tf.zeros_like(out)
            outer.watch(u)
            jt_u = inner.gradient(out, w, output_gradients=u, unconnected_gradients=_ZERO)
        return out, outer.gradient(jt_u, u, output_gradients=v, unconnected_gradients=_ZERO)

    def vjp(self, f: Callable[[Array], Array], w: Array, u: Array) -> tuple[Array, Array]:
        with tf.GradientTape() as tape:
            tape.watch(w)
            out = f(w)
        return out, tape.gradient(out, w, output_gradients=u, unconnected_gradients=_ZERO)

    def vmap(self, f: Callable[..., Array], in_axes: tuple[int | None, ...]) -> Callable[..., Array] | None:
        # tf.vectorized_map is 2x slower than tf.map_fn on 64 vectors (see the module docstring);
        # _rowwise and hvp_function loop with tf.map_fn inside one compiled call instead.
        return None

    def compile(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """``tf.function(f)``: traced once per distinct argument shapes, dtypes and Python values.

        ``f`` goes in through ``functools.partial`` so that TensorFlow keeps
        call statistics per compiled function: its warning about frequent
        retracing would otherwise count the traces of every operator built
        from the same code as retraces of one function.  With
        ``jit_compile=True``, a program that XLA would get wrong runs
        without XLA (see :class:`XlaUnlessInexact`).
        """
        plain = FlatCall(tf.function(functools.partial(f)))
        if not self.jit_compile:
            return plain
        return XlaUnlessInexact(FlatCall(tf.function(functools.partial(f), jit_compile=True)), plain)

    def hvp_function(self, loss: Callable[[Array, Any], Array]) -> Callable[[Array, Any, Array], Array]:
        if self.hvp_mode == "forward":
            return self.rowwise(self._forward_over_reverse(loss))

        def gradient_under(outer: tf.GradientTape, w: tf.Tensor, batch: Any) -> tf.Tensor:
            outer.watch(w)
            return self.value_and_grad(lambda p: loss(p, batch), w)[1]

        def single(w: tf.Tensor, batch: Any, rows: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as outer:
                g = gradient_under(outer, w, batch)
            return outer.gradient(g, w, output_gradients=rows[0], unconnected_gradients=_ZERO)[None]

        def batched(w: tf.Tensor, batch: Any, rows: tf.Tensor) -> tf.Tensor:
            # The forward pass and the gradient once; one more backward pass per row.
            with tf.GradientTape(persistent=True) as outer:
                g = gradient_under(outer, w, batch)
            return self._each_row(lambda v: outer.gradient(g, w, output_gradients=v, unconnected_gradients=_ZERO), rows)

        def vector(w: tf.Tensor, batch: Any, v: tf.Tensor) -> tf.Tensor:
            return single(w, batch, v[None])[0]

        def matrix(w: tf.Tensor, batch: Any, chunk: int, vectorized: bool) -> tf.Tensor:
            # The Jacobian of the gradient, chunk rows at a time: vectorized by pfor as tape.jacobian is (12x
            # faster than a loop of backward passes on a LeNet-5's last layer), else a while loop.
            with tf.GradientTape(persistent=True) as outer:
                g = gradient_under(outer, w, batch)
            # pfor refuses one row at a time (parallel_iterations=1): that is the while loop's job.
            pfor = vectorized and chunk > 1
            return outer.jacobian(
                g, w, unconnected_gradients=_ZERO, parallel_iterations=chunk, experimental_use_pfor=pfor
            )

        # Each takes w flat or as the binding's pieces (see Backend.rowwise); dense matrices take it flat.
        single, batched, vector = (parameters_joined(self.xp, g) for g in (single, batched, vector))
        compiled = self.compile
        product = self._by_row_count(
            compiled(single), compiled(batched), compiled(vector), self._parts(vector), self._forms(batched)
        )
        product.dense = _VectorizedUnlessUnsafe(compiled(matrix), loss)  # type: ignore[attr-defined]
        return product

    def _forward_over_reverse(self, loss: Callable[[Array, Any], Array]) -> Callable[[Array, Any, Array], Array]:
        def hvp_one(w: tf.Tensor, batch: Any, v: tf.Tensor) -> tf.Tensor:
            with tf.autodiff.ForwardAccumulator(w, v) as acc:
                g = self.value_and_grad(lambda p: loss(p, batch), w)[1]
            return acc.jvp(g, unconnected_gradients=_ZERO)

        return hvp_one

    def rowwise(self, f: Callable[[Array, Any, Array], Array]) -> Callable[[Array, Any, Array], Array]:
        dense_f, f = f, parameters_joined(self.xp, f)

        def single(w: tf.Tensor, batch: Any, rows: tf.Tensor) -> tf.Tensor:
            return f(w, batch, rows[0])[None]

        def batched(w: tf.Tensor, batch: Any, rows: tf.Tensor) -> tf.Tensor:
            return self._each_row(lambda v: f(w, batch, v), rows)

        def matrix(w: tf.Tensor, batch: Any, chunk: int) -> tf.Tensor:
            # f is linear in v, so its Jacobian in v is the matrix: what does not depend on v (the forward pass)
            # runs once, then a while loop of backward passes through f, chunk rows in flight.  Not pfor: on a
            # Keras MLP's GGN (a tape inside a tape inside pfor) it returned wrong columns without an error.
            v = tf.zeros_like(w)
            with tf.GradientTape() as tape:
                tape.watch(v)
                out = dense_f(w, batch, v)
            return tape.jacobian(
                out, v, unconnected_gradients=_ZERO, parallel_iterations=chunk, experimental_use_pfor=False
            )

        parts, forms = self._parts(f), self._forms(batched)
        product = self._by_row_count(self.compile(single), self.compile(batched), self.compile(f), parts, forms)
        product.dense = self.compile(matrix)  # type: ignore[attr-defined]
        return product

    def _parts(self, f: Callable[[Array, Any, Array], Array]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """``f`` compiled on the pieces of its vector, with and without the finiteness test (see ``rowwise``)."""
        return (
            self.compile(functools.partial(product_on_parts, self.xp, f)),
            self.compile(functools.partial(product_on_parts, self.xp, f, checked=False)),
        )

    def _forms(self, batched: Callable[[Array, Any, Array], Array]) -> Callable[..., Any]:
        """``zᵀAz`` per row, compiled with the batched product (``forms`` of :meth:`Backend.rowwise`)."""
        return self.compile(functools.partial(quadratic_forms, self.xp, batched))

    def _each_row(self, body: Callable[[tf.Tensor], tf.Tensor], rows: tf.Tensor) -> tf.Tensor:
        """``body`` applied to each row of ``rows``, stacked: a ``tf.map_fn`` loop, or unrolled under XLA.

        XLA's CPU while loops ran the rows' backward passes through
        convolutions 5-13 times slower than the same passes written out
        (10 rows of a LeNet-5: 733 ms vs 148 ms; of a small ResNet: 4.2 s
        vs 0.32 s), and pfor 3-9 times.  Under XLA the rows are therefore
        unrolled, at most :data:`_UNROLLED_ROWS` per program (see
        :meth:`_by_row_count`), which bounds the tracing.
        """
        if self.jit_compile:
            return tf.stack([body(v) for v in tf.unstack(rows)])
        return tf.map_fn(body, rows)

    def _by_row_count(
        self,
        single: Callable[..., Array],
        batched: Callable[..., Array],
        vector: Callable[..., Array],
        parts: tuple[Callable[..., Any], Callable[..., Any]],
        forms: Callable[..., Array],
    ) -> Callable[..., Array]:
        # One row (Lanczos) skips the loop machinery of map_fn; a vector (matvec) the reshapes around the call too.
        # Each is traced on its first use.
        group = _UNROLLED_ROWS if self.jit_compile else None
        grouped = _in_groups(batched, group)

        def rows_product(w: Array, batch: Any, rows: Array) -> Array:
            if len(rows.shape) == 1:
                return vector(w, batch, rows)
            return (single if int(rows.shape[0]) == 1 else grouped)(w, batch, rows)

        rows_product.takes_vectors = True  # type: ignore[attr-defined]
        rows_product.on_parts, rows_product.on_parts_unchecked = parts  # type: ignore[attr-defined]
        rows_product.forms = _in_groups(forms, group)  # type: ignore[attr-defined]
        return rows_product

    def linearize(self, f: Callable[[Array, Any], Array], w: Array, x: Any) -> Linearization:
        """Value of ``f(·, x)`` at ``w``, and compiled batched JVPs and VJPs that run the forward pass once per call."""

        def vjp_rows(w: tf.Tensor, x: Any, U: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(w)
                z = f(w, x)
            return tf.map_fn(lambda u: tape.gradient(z, w, output_gradients=u, unconnected_gradients=_ZERO), U)

        def jvp_rows(w: tf.Tensor, x: Any, V: tf.Tensor) -> tf.Tensor:
            if self.jvp_mode == "accumulator":
                return tf.map_fn(lambda v: self.jvp(lambda p: f(p, x), w, v)[1], V)
            # The transposed VJP once; each row is one more backward pass through it.
            with tf.GradientTape(persistent=True) as outer:
                with tf.GradientTape() as inner:
                    inner.watch(w)
                    z = f(w, x)
                u = tf.zeros_like(z)
                outer.watch(u)
                jt_u = inner.gradient(z, w, output_gradients=u, unconnected_gradients=_ZERO)
            return tf.map_fn(
                lambda v: outer.gradient(jt_u, u, output_gradients=v, unconnected_gradients=_ZERO),
                V,
                fn_output_signature=z.dtype,
            )

        out = f(w, x)
        jvps, vjps = self.compile(jvp_rows), self.compile(vjp_rows)
        jvp_batched = lambda V: jvps(w, x, V)  # noqa: E731
        vjp_batched = lambda U: vjps(w, x, U)  # noqa: E731
        return Linearization(
            out, lambda v: jvp_batched(v[None])[0], lambda u: vjp_batched(u[None])[0], jvp_batched, vjp_batched
        )

    def per_sample_squares(
        self, f: Callable[[Array, Any], Array], per_cotangent: bool = False
    ) -> Callable[[Array, Any, Callable[[Array], Array], int], Array]:
        """Squares by the structured route of :mod:`.tensorflow_per_sample`, the generic one for what it leaves.

        Entries read once by a recognized op (``MatMul``, batched matmuls,
        ``Conv2D``, ``GatherV2``, a broadcast bias or scale), directly or
        through ops on parameters alone (inference batch norm), take
        per-sample products from the cotangents at that op's output; every
        other entry, or the whole model where nothing is recognized, goes
        through the generic squares of per-sample products with the pairs
        batched by :meth:`per_sample_vjp`.
        """
        from .tensorflow_per_sample import per_sample_squares

        def generic(g: Callable[[Array, Any], Array], pc: bool) -> Any:
            return generic_squares(self, g, pc, vjps=self.per_sample_vjp)

        return per_sample_squares(f, per_cotangent, generic, self.compile)

    def per_sample_vjp(self, f: Callable[[Array, Any], Array], w: Array, x: Any, U: Array) -> Array:
        """``out[k, n] = J_nᵀ U[k, n]``, every (cotangent, sample) pair in one ``tf.vectorized_map``.

        TensorFlow's vectorizer turns the pairs' forward and backward passes
        into batched ops (the inputs tiled ``K`` times), where a loop over
        pairs would trace ``K · N`` copies of the model.
        """
        K, N = shape_of(U)[:2]
        tiled = tuple(_tile_samples(a, K) for a in x) if isinstance(x, tuple) else _tile_samples(x, K)
        pairs = tf.reshape(U, (K * N,) + tuple(U.shape[2:]))  # cotangent k of sample n at row k·N + n

        first = tuple(a[:1] for a in x) if isinstance(x, tuple) else x[:1]
        ops = _op_types_under_onednn(f, w, first)
        copies = 2 if ops & _UNSAFE_ON_ONE_SAMPLE else 1

        def one_pair(args: tuple[Any, tf.Tensor]) -> tf.Tensor:
            x_n, u_n = args
            # With two copies of the sample and half the cotangent each, the products are the same
            # (the samples of f are independent), and oneDNN's kernels never see a batch of one.
            x_one = tf.nest.map_structure(lambda a: tf.stack([a] * copies), x_n)
            u_one = tf.stack([u_n] * copies) * (1.0 / copies) if copies > 1 else u_n[None]
            return self.vjp(lambda p: f(p, x_one), w, u_one)[1]

        if ops & _UNSAFE_TO_VECTORIZE:
            out = tf.map_fn(one_pair, (tiled, pairs), fn_output_signature=w.dtype)  # see the module docstring
        else:
            out = tf.vectorized_map(one_pair, (tiled, pairs))
        return tf.reshape(out, (K, N, shape_of(w)[0]))

    def stop_gradient(self, x: Array) -> Array:
        return tf.stop_gradient(x)
