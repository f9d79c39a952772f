"""Losses with analytic output Hessians ``H_z`` and their square roots.

Each built-in loss follows PyTorch's conventions (``torch.nn.functional``):
the class axis of cross-entropy logits is axis 1, ``"mean"`` divides by the
number of reduced elements, ``"sum"`` adds them.  The value is written with
backend operations so that it is differentiable in every framework; the
output Hessian ``H_z`` and a square root ``S`` with ``H_z = S S^T`` are closed
forms (DESIGN.md, "The math the library is built on").

Framework loss objects are recognised by their class's module and name (no
framework is imported here): PyTorch's ``nn.CrossEntropyLoss``,
``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` and ``nn.PoissonNLLLoss`` and
Keras's ``CategoricalCrossentropy``, ``SparseCategoricalCrossentropy``,
``MeanSquaredError`` and ``BinaryCrossentropy`` become the built-in loss they
equal, when their settings make them equal exactly (see :func:`make_loss`).
Any other Keras loss is called the Keras way, ``loss(targets, outputs)``.

Examples
--------
>>> make_loss("mse")
MSELoss(reduction='mean')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._arrays import dtype_name, is_floating, one_hot, shape, sigmoid, softplus
from ._backend import Array, Backend

REDUCTIONS = ("mean", "sum")


class Loss:
    """A loss ``ℓ(z, y)`` of network outputs ``z`` and targets ``y``.

    Parameters
    ----------
    reduction : {"mean", "sum"}
        How per-element losses are combined within one batch.
    keras_targets : bool
        Follow Keras's target conventions (for Keras loss objects): targets
        one trailing axis of size 1 away from the expected shape are
        reshaped to it, and integer targets are cast to the outputs' dtype.
    """

    name = ""

    def __init__(self, reduction: str = "mean", *, keras_targets: bool = False) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.keras_targets = keras_targets

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    def check(self, backend: Backend, z: Array, y: Array) -> None:
        """Raise ``ValueError`` (or ``TypeError``) when outputs and targets cannot go together.

        Run once per batch outside compiled code: it may read the targets on
        the host.
        """
        zs = shape(z)
        ys = self._aligned_shape(shape(y), zs)
        if zs != ys:
            raise ValueError(
                f"loss {self.name!r}: outputs have shape {zs} but targets have shape {shape(y)}; "
                "they must match elementwise (reshape the targets or the model output)"
            )
        if not is_floating(backend.xp, y) and not self.keras_targets:
            raise TypeError(
                f"loss {self.name!r}: targets must be floating point, got {dtype_name(y)}; cast them to the "
                "outputs' dtype"
            )
        self.check_targets(backend, y, zs[1:])

    def check_targets(self, backend: Backend, y: Array, sample_shape: tuple[int, ...]) -> None:
        """Checks of one batch's targets that need only the shape of one sample's outputs (``z.shape[1:]``).

        For batches after the first, whose outputs need not be computed to
        check them.  Runs on the host, outside compiled code.
        """
        return None

    def num_reduced(self, backend: Backend, z: Array) -> int:
        """Number of elements that ``"mean"`` divides by."""
        return math.prod(shape(z))

    def scale(self, backend: Backend, z: Array) -> float:
        """Factor of the reduction: ``1/num_reduced`` for mean, 1 for sum."""
        return 1.0 / self.num_reduced(backend, z) if self.reduction == "mean" else 1.0

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        """The reduced loss, a differentiable scalar."""
        raise NotImplementedError

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        """``H_z u`` for a stack ``u`` of tangents shaped like ``z`` along a leading axis."""
        raise NotImplementedError

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        """Columns of ``S`` (``H_z = S S^T``): shape ``(K,) + z.shape``, K columns per sample."""
        raise NotImplementedError

    # ------------------------------------------------------------------
    # Keras's target conventions
    # ------------------------------------------------------------------
    def _aligned_shape(self, ys: tuple[int, ...], expected: tuple[int, ...]) -> tuple[int, ...]:
        """The shape targets of shape ``ys`` take: ``expected`` where Keras would reshape them, else ``ys``."""
        if not self.keras_targets or ys == expected:
            return ys
        # Keras squeezes or expands one trailing axis of size 1 (squeeze_or_expand_to_same_rank).
        if len(ys) == len(expected) + 1 and ys[-1] == 1 and ys[:-1] == expected:
            return expected
        if len(ys) + 1 == len(expected) and expected[-1] == 1 and ys == expected[:-1]:
            return expected
        return ys

    def _align(self, backend: Backend, y: Array, expected: tuple[int, ...], like: Array | None = None) -> Array:
        """Targets in the shape (and, for Keras, the floating dtype of ``like``) the loss computes with."""
        if not self.keras_targets:
            return y
        target_shape = self._aligned_shape(shape(y), expected)
        if target_shape != shape(y):
            y = backend.xp.reshape(y, target_shape)
        if like is not None and not is_floating(backend.xp, y):
            y = backend.xp.astype(y, like.dtype)
        return y


class MSELoss(Loss):
    """Sum of squares ``Σ (z - y)^2`` (PyTorch's ``mse_loss``); ``H_z = 2 I``."""

    name = "mse"

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        y = self._align(backend, y, shape(z), like=z)
        return backend.xp.sum((z - y) ** 2) * self.scale(backend, z)

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        return u * (2.0 * self.scale(backend, z))

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        # S = sqrt(2 s) I: one column per output element of a sample, so the
        # columns are the unit tangents of each output coordinate.
        return _unit_columns(backend, z) * math.sqrt(2.0 * self.scale(backend, z))


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy on logits; ``H_z = σ(z)(1 - σ(z))`` elementwise."""

    name = "bce_with_logits"

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        y = self._align(backend, y, shape(z), like=z)
        return backend.xp.sum(softplus(backend.xp, z) - y * z) * self.scale(backend, z)

    def _curvature(self, backend: Backend, z: Array) -> Array:
        s = sigmoid(backend.xp, backend.stop_gradient(z))
        return s * (1.0 - s) * self.scale(backend, z)

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        return u * self._curvature(backend, z)

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        return _unit_columns(backend, z) * backend.xp.sqrt(self._curvature(backend, z))


class PoissonNLLLoss(Loss):
    """Poisson negative log-likelihood with log input: ``exp(z) - y z``; ``H_z = exp(z)``."""

    name = "poisson_nll"

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        y = self._align(backend, y, shape(z), like=z)
        return backend.xp.sum(backend.xp.exp(z) - y * z) * self.scale(backend, z)

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        return u * (backend.xp.exp(backend.stop_gradient(z)) * self.scale(backend, z))

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        root = backend.xp.exp(backend.stop_gradient(z) * 0.5) * math.sqrt(self.scale(backend, z))
        return _unit_columns(backend, z) * root


CE_TARGETS = ("auto", "labels", "probabilities")


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy with integer labels or probability targets.

    Logits have shape ``(N, C)`` or ``(N, C, d1, ...)`` (class axis 1, as in
    PyTorch; ``(N, d1, ..., C)`` with ``class_axis=-1``, as in Keras); integer
    targets have the logits' shape without the class axis, probability
    targets the logits' shape.  ``"mean"`` divides by the number of samples
    ``N·d1·…``.  ``H_z = t (diag(p) - p p^T)`` with ``t`` the sum of the
    target row (1 for labels and proper distributions).

    Labels must lie in ``[0, C)``: a label outside would be the one-hot code
    of no class, a zero row that still counts in the mean, so
    :meth:`check_targets` refuses it.  Probability targets need not be
    distributions: only their mass ``t`` enters ``H_z``, and ``H_z`` is
    positive semi-definite, with the square root ``sqrt(t) (diag(√p) - p √pᵀ)``
    that exact GGN diagonals use, exactly when ``t ≥ 0`` for every sample;
    negative entries with a non-negative mass are fine.

    Parameters
    ----------
    reduction : {"mean", "sum"}
    class_axis : {1, -1}
        Axis of the classes in the logits and in probability targets.
    targets : {"auto", "labels", "probabilities"}
        How targets are read: by dtype (integer labels, floating
        probabilities), always as labels (Keras's sparse cross-entropy,
        which takes floating labels too), or always as probabilities.
    keras_targets : bool
        Keras's target conventions (see :class:`Loss`).
    """

    name = "cross_entropy"

    def __init__(
        self, reduction: str = "mean", *, class_axis: int = 1, targets: str = "auto", keras_targets: bool = False
    ) -> None:
        super().__init__(reduction, keras_targets=keras_targets)
        if class_axis not in (1, -1):
            raise ValueError(f"class_axis must be 1 (PyTorch) or -1 (Keras), got {class_axis!r}")
        if targets not in CE_TARGETS:
            raise ValueError(f"targets must be one of {CE_TARGETS}, got {targets!r}")
        self.class_axis = class_axis
        self.targets = targets

    def __repr__(self) -> str:
        return f"CrossEntropyLoss(reduction={self.reduction!r}, class_axis={self.class_axis}, targets={self.targets!r})"

    def with_probability_targets(self) -> CrossEntropyLoss:
        """The same loss reading every target as probabilities (for one-hot codes of sampled labels)."""
        return CrossEntropyLoss(self.reduction, class_axis=self.class_axis, targets="probabilities")

    # ------------------------------------------------------------------ shapes and checks
    def num_classes(self, sample_shape: tuple[int, ...]) -> int:
        """``C``, read from the shape of one sample's logits."""
        return int(sample_shape[0] if self.class_axis == 1 else sample_shape[-1])

    def label_shape(self, zs: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of integer labels for logits of shape ``zs``: the class axis removed."""
        return zs[:1] + zs[2:] if self.class_axis == 1 else zs[:-1]

    def is_labels(self, backend: Backend, y: Array) -> bool:
        """Whether ``y`` holds class labels (else probability targets)."""
        if self.targets == "auto":
            return not is_floating(backend.xp, y)
        return self.targets == "labels"

    def check(self, backend: Backend, z: Array, y: Array) -> None:
        zs = shape(z)
        if len(zs) < 2:
            layout = "(N, C) or (N, C, ...)" if self.class_axis == 1 else "(N, C) or (N, ..., C)"
            raise ValueError(f"loss 'cross_entropy': logits must have shape {layout}, got {zs}")
        if self.is_labels(backend, y):
            expected, what = self.label_shape(zs), "integer labels"
        else:
            expected, what = zs, "probability targets"
        if self._aligned_shape(shape(y), expected) != expected:
            raise ValueError(
                f"loss 'cross_entropy': {what} must have shape {expected} for logits of shape {zs}, got {shape(y)}"
            )
        self.check_targets(backend, y, zs[1:])

    def check_targets(self, backend: Backend, y: Array, sample_shape: tuple[int, ...]) -> None:
        """Labels in ``[0, C)`` (and whole numbers where they come as floats), read on the host."""
        if not self.is_labels(backend, y):
            return
        num_classes = self.num_classes(sample_shape)
        labels = np.asarray(backend.to_numpy(y))
        if labels.size == 0:
            return
        if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
            raise ValueError(
                "loss 'cross_entropy': labels must be whole numbers (class indices), got fractional values; "
                "pass integer labels, or probability targets with a probability-target loss"
            )
        low, high = labels.min(), labels.max()
        if low < 0 or high >= num_classes:
            hint = ""
            if low == -100:
                hint = (
                    " (-100 is PyTorch's default ignore_index: multihess has no ignored labels, so drop those "
                    "samples from the batch)"
                )
            raise ValueError(
                f"loss 'cross_entropy': labels must lie in [0, {num_classes - 1}] for {num_classes} classes, but "
                f"this batch's labels range over [{low:g}, {high:g}]{hint}; fix the labels or the model's number "
                "of outputs"
            )

    def sample_mass(self, backend: Backend, y: Array) -> np.ndarray | None:
        """Target mass ``t`` of every sample (float64 on the host, class axis kept, size 1), or ``None`` for labels."""
        if self.is_labels(backend, y):
            return None
        targets = np.asarray(backend.to_numpy(y), dtype=np.float64)
        return targets.sum(axis=self.class_axis, keepdims=True)

    def num_reduced(self, backend: Backend, z: Array) -> int:
        return math.prod(self.label_shape(shape(z)))

    # ------------------------------------------------------------------ layout
    def _last(self, backend: Backend, x: Array) -> Array:
        """Class axis moved last."""
        return x if self.class_axis == -1 or len(shape(x)) == 2 else backend.xp.moveaxis(x, 1, -1)

    def _first(self, backend: Backend, x: Array) -> Array:
        """Class axis moved back to where the loss keeps it (inverse of :meth:`_last`)."""
        return x if self.class_axis == -1 or len(shape(x)) == 2 else backend.xp.moveaxis(x, -1, 1)

    def _last_batched(self, backend: Backend, u: Array) -> Array:
        return u if self.class_axis == -1 or len(shape(u)) == 3 else backend.xp.moveaxis(u, 2, -1)

    def _first_batched(self, backend: Backend, u: Array) -> Array:
        return u if self.class_axis == -1 or len(shape(u)) == 3 else backend.xp.moveaxis(u, -1, 2)

    def _targets(self, backend: Backend, z: Array, z_last: Array, y: Array) -> Array:
        """Targets as distributions with the class axis last."""
        if self.is_labels(backend, y):
            labels = self._align(backend, y, self.label_shape(shape(z)))
            if is_floating(backend.xp, labels):  # Keras takes floating labels
                labels = backend.xp.astype(labels, backend.xp.int32)
            return one_hot(backend, labels, shape(z_last)[-1], like=z_last)
        probs = self._align(backend, y, shape(z))
        if not is_floating(backend.xp, probs):  # integer one-hot codes
            probs = backend.xp.astype(probs, z.dtype)
        return self._last(backend, probs)

    # ------------------------------------------------------------------ value and curvature
    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        z_last = self._last(backend, z)
        m = backend.stop_gradient(backend.xp.max(z_last, axis=-1, keepdims=True))
        log_norm = backend.xp.log(backend.xp.sum(backend.xp.exp(z_last - m), axis=-1, keepdims=True)) + m
        t = self._targets(backend, z, z_last, y)
        return -backend.xp.sum(t * (z_last - log_norm)) * self.scale(backend, z)

    def _probs(self, backend: Backend, z: Array, y: Array) -> tuple[Array, Array]:
        """Softmax probabilities and the weight ``t`` (target mass) per sample, class axis last."""
        z_last = backend.stop_gradient(self._last(backend, z))
        e = backend.xp.exp(z_last - backend.xp.max(z_last, axis=-1, keepdims=True))
        p = e / backend.xp.sum(e, axis=-1, keepdims=True)
        t = backend.xp.sum(self._targets(backend, z, z_last, y), axis=-1, keepdims=True)
        return p, t * self.scale(backend, z)

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        p, t = self._probs(backend, z, y)
        u_last = self._last_batched(backend, u)
        # (diag(p) - p p^T) u = p ⊙ (u - <p, u>)
        hu = p * (u_last - backend.xp.sum(p * u_last, axis=-1, keepdims=True)) * t
        return self._first_batched(backend, hu)

    def sqrt_hz(self, backend: Backend, z: Array, y: Array) -> Array:
        xp = backend.xp
        p, t = self._probs(backend, z, y)
        num_classes, ones = shape(p)[-1], (1,) * (len(shape(p)) - 1)
        # Column c of S is sqrt(p_c) (e_c - p), scaled by sqrt(t) (t ≥ 0 is checked by the exact diagonal):
        # all columns at once, (C, *p.shape), with no loop over the classes.
        eye = xp.reshape(backend.asarray(np.eye(num_classes), p), (num_classes,) + ones + (num_classes,))
        root_p = xp.expand_dims(xp.moveaxis(xp.sqrt(p), -1, 0), axis=-1)  # (C, *p.shape[:-1], 1)
        cols = root_p * (eye - p[None, ...]) * xp.sqrt(t)[None, ...]
        return self._first_batched(backend, cols)


def _unit_columns(backend: Backend, z: Array) -> Array:
    """Unit tangents of every output coordinate of a sample: ``(K,) + z.shape``.

    Column ``k`` is 1 at coordinate ``k`` of every sample's output and 0
    elsewhere, so that ``K = z[0].size`` columns cover a diagonal ``H_z``.
    """
    dims = shape(z)
    per_sample = math.prod(dims[1:])
    eye = np.eye(per_sample).reshape((per_sample, 1) + dims[1:])
    eye = np.broadcast_to(eye, (per_sample,) + dims)
    return backend.asarray(np.ascontiguousarray(eye), z)


class CallableLoss(Loss):
    """A framework-native ``loss(outputs, targets) -> scalar``; ``H_z`` by autodiff.

    Parameters
    ----------
    fn : callable
        The loss.
    targets_first : bool
        Call ``fn(targets, outputs)`` instead: Keras's order (``y_true, y_pred``).
    name : str, optional
        How errors name the loss (default: the callable's name).
    """

    def __init__(self, fn: Callable[[Any, Any], Any], targets_first: bool = False, name: str | None = None) -> None:
        super().__init__("sum")
        self.fn = fn
        self.targets_first = targets_first
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __repr__(self) -> str:
        order = "targets, outputs" if self.targets_first else "outputs, targets"
        return f"CallableLoss({self.name!r}, called as ({order}))"

    def check(self, backend: Backend, z: Array, y: Array) -> None:
        return None

    def value(self, backend: Backend, z: Array, y: Array) -> Array:
        out = self.fn(y, z) if self.targets_first else self.fn(z, y)
        if not hasattr(out, "shape") or shape(out) not in ((), (1,)):
            raise ValueError(
                f"loss callable {self.name!r} returned shape {getattr(out, 'shape', type(out).__name__)}; it must "
                "return a scalar array of the model's framework (reduce with mean or sum)"
            )
        return backend.xp.reshape(out, ())

    def hz_matvec(self, backend: Backend, z: Array, y: Array, u: Array) -> Array:
        z0 = backend.stop_gradient(z)

        def grad_z(q: Array) -> Array:
            return backend.value_and_grad(lambda r: self.value(backend, r, y), q)[1]

        rows = [backend.jvp(grad_z, z0, u[i])[1] for i in range(shape(u)[0])]
        return backend.xp.stack(rows)


LOSSES: dict[str, type[Loss]] = {
    cls.name: cls for cls in (CrossEntropyLoss, MSELoss, BCEWithLogitsLoss, PoissonNLLLoss)
}


# ----------------------------------------------------------------------
# Framework loss objects
# ----------------------------------------------------------------------
_TORCH_LOSS_MODULE = "torch.nn.modules.loss"
_KERAS_PACKAGES = ("keras", "tf_keras")
_KERAS_MEAN = ("sum_over_batch_size", "mean", "mean_with_sample_weight", "auto")
"""Keras reductions that divide by the number of per-sample losses ("auto" is Keras 2's default)."""


def _root_package(module: str) -> str:
    return module.split(".", 1)[0]


def is_keras_loss_class(cls: type) -> bool:
    """Whether ``cls`` derives from ``keras.losses.Loss`` (found by name: Keras is not imported)."""
    return any(c.__name__ == "Loss" and _root_package(c.__module__) in _KERAS_PACKAGES for c in cls.__mro__)


def is_keras_loss(loss: Any) -> bool:
    """Whether ``loss`` is a Keras loss object (a subclass of ``keras.losses.Loss``) or a Keras loss function."""
    if isinstance(loss, type):
        return False
    if is_keras_loss_class(type(loss)):
        return True
    module = getattr(loss, "__module__", None) or ""
    # A function of keras.losses, such as keras.losses.categorical_crossentropy.
    return not hasattr(loss, "__mro__") and _root_package(module) in _KERAS_PACKAGES and ".losses" in module


def make_loss(loss: Any, reduction: str = "mean") -> Loss:
    """Resolve a built-in loss name, a framework loss object, or a framework-native callable.

    Loss objects that equal a built-in loss exactly become that loss (with an
    analytic ``H_z``, so that exact GGN diagonals work, on any framework's
    arrays); every other one is called as its framework calls it, so the
    answer is right either way.  Recognised exactly (the class itself, not a
    subclass, and for PyTorch no forward hooks):

    - PyTorch, reduction ``"mean"`` or ``"sum"``:
      ``nn.CrossEntropyLoss()`` without ``weight``, with ``ignore_index=-100``
      and no label smoothing → ``"cross_entropy"`` (labels outside
      ``[0, C)``, -100 included, are refused);
      ``nn.MSELoss()`` → ``"mse"``;
      ``nn.BCEWithLogitsLoss()`` without ``weight`` and ``pos_weight`` →
      ``"bce_with_logits"``;
      ``nn.PoissonNLLLoss(log_input=True, full=False)`` → ``"poisson_nll"``.
    - Keras, reduction ``"sum_over_batch_size"`` (the default) or ``"mean"``:
      ``CategoricalCrossentropy(from_logits=True)`` without label smoothing,
      ``axis=-1`` → ``"cross_entropy"`` on probability targets with the class
      axis last; ``SparseCategoricalCrossentropy(from_logits=True)`` without
      ``ignore_class`` → ``"cross_entropy"`` on labels with the class axis
      last (both with ``"sum"`` too); ``MeanSquaredError()`` → ``"mse"`` (the
      mean over every element); ``BinaryCrossentropy(from_logits=True)``
      without label smoothing → ``"bce_with_logits"``.  Targets follow
      Keras: one trailing axis of size 1 more or less than the outputs is
      reshaped away, integer targets are cast.

    Called through autodiff instead: Keras's ``"sum"`` for mean squared error
    and binary cross-entropy (a sum of per-sample means over the last axis,
    which no built-in loss is), ``keras.losses.Poisson`` (it takes rates,
    ``"poisson_nll"`` log-rates), probabilities (``from_logits=False``),
    label smoothing, class weights, ignored classes and every other loss;
    Keras losses, objects and functions of ``keras.losses``, in Keras's order
    ``loss(y_true, y_pred)``.

    Parameters
    ----------
    loss : str, Loss, loss object or callable
    reduction : {"mean", "sum"}
        The reduction of a built-in name.  A loss object brings its own;
        ``"sum"`` with an object that averages is refused as contradictory.
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        key = loss.lower().replace("-", "_")
        if key not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable loss(outputs, targets)")
        return LOSSES[key](reduction)
    if isinstance(loss, type) and (loss.__module__ == _TORCH_LOSS_MODULE or is_keras_loss_class(loss)):
        raise TypeError(f"loss={loss.__name__} is a class; pass an instance, such as loss={loss.__name__}()")
    if callable(loss):
        module = type(loss).__module__
        if module == _TORCH_LOSS_MODULE:
            return _from_torch(loss, reduction)
        if is_keras_loss(loss):
            return _from_keras(loss, reduction)
        return CallableLoss(loss)
    raise TypeError(f"loss must be a name from {sorted(LOSSES)} or a callable loss(outputs, targets), got {loss!r}")


def _object_reduction(loss: Any, own: str | None, reduction: str) -> str:
    """The reduction of a loss object, refusing a ``reduction=`` that contradicts it."""
    label = type(loss).__name__
    if own is None:
        raise ValueError(
            f"the loss object {label} has reduction 'none' and returns one loss per sample; multihess needs a "
            "scalar loss: construct it with reduction='mean' (or 'sum')"
        )
    if reduction != "mean" and reduction != own:
        raise ValueError(
            f"reduction={reduction!r} contradicts the loss object {label}, whose reduction is {own!r}; set the "
            "reduction on the loss object and leave reduction= at its default"
        )
    return own


def _from_torch(loss: Any, reduction: str) -> Loss:
    """A PyTorch loss module (exactly one of ``torch.nn``'s classes) as a built-in loss, or called as it is."""
    kind = type(loss).__name__
    raw = getattr(loss, "reduction", "mean")
    own = _object_reduction(loss, None if raw == "none" else raw, reduction)
    fallback = CallableLoss(loss, name=f"torch.nn.{kind}")
    if own not in REDUCTIONS or getattr(loss, "_forward_hooks", None) or getattr(loss, "_forward_pre_hooks", None):
        return fallback  # hooks may change what the module computes
    if kind == "CrossEntropyLoss":
        plain = loss.weight is None and loss.ignore_index == -100 and loss.label_smoothing == 0.0
        return CrossEntropyLoss(own) if plain else fallback
    if kind == "MSELoss":
        return MSELoss(own)
    if kind == "BCEWithLogitsLoss":
        return BCEWithLogitsLoss(own) if loss.weight is None and loss.pos_weight is None else fallback
    if kind == "PoissonNLLLoss":
        # log_input=True: exp(z) - y z, as "poisson_nll" (eps only enters with log_input=False).
        return PoissonNLLLoss(own) if loss.log_input and not loss.full else fallback
    return fallback


def _from_keras(loss: Any, reduction: str) -> Loss:
    """A Keras loss object as a built-in loss where it equals one exactly, else called in Keras's order."""
    kind = type(loss).__name__
    fallback = CallableLoss(loss, targets_first=True, name=f"keras {kind}")
    if not hasattr(loss, "get_config") or _root_package(type(loss).__module__) not in _KERAS_PACKAGES:
        return fallback  # a Keras loss function, or a user's subclass: its own call decides
    if ".losses" not in type(loss).__module__:
        return fallback
    config = loss.get_config()
    raw = config.get("reduction", "sum_over_batch_size")
    if raw not in _KERAS_MEAN + ("sum", None, "none"):
        return fallback  # a reduction multihess does not know: Keras's own call decides
    own = _object_reduction(loss, "mean" if raw in _KERAS_MEAN else ("sum" if raw == "sum" else None), reduction)
    logits = config.get("from_logits") is True
    smoothing = float(config.get("label_smoothing", 0.0) or 0.0)
    if kind == "CategoricalCrossentropy" and logits and smoothing == 0.0 and config.get("axis", -1) == -1:
        return CrossEntropyLoss(own, class_axis=-1, targets="probabilities", keras_targets=True)
    if kind == "SparseCategoricalCrossentropy" and logits and config.get("ignore_class") is None:
        return CrossEntropyLoss(own, class_axis=-1, targets="labels", keras_targets=True)
    # Keras's "sum" of these sums per-sample means over the last axis: no built-in loss matches.
    if kind == "MeanSquaredError" and own == "mean":
        return MSELoss("mean", keras_targets=True)
    if kind == "BinaryCrossentropy" and logits and smoothing == 0.0 and own == "mean":
        return BCEWithLogitsLoss("mean", keras_targets=True)
    return fallback
