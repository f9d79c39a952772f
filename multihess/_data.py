"""Data as a re-iterable source of batches, streamed one pass at a time.

``data=`` is one batch ``(x, y)`` or a source of batches: a list, a
``DataLoader``, a ``tf.data.Dataset``, any object with ``__iter__`` that
starts over on each call, or a zero-argument callable returning an iterator.
A source is iterated once per pass (one batched product, one Lanczos step)
and never held whole, so memory stays within a batch or two plus the model's
graph whatever the dataset's length.  One in-memory batch is held as is,
which lets backends keep its graphs between products.

Batches that are not ``(x, y)`` pairs (Hugging Face style dicts, records)
go through ``batch_fn(batch) -> (x, y)``.

Examples
--------
>>> source = DataSource([(1, 2), (3, 4)])
>>> list(source), list(source)  # re-iterable: each pass starts over
([(1, 2), (3, 4)], [(1, 2), (3, 4)])
>>> DataSource(((1, 2) for _ in range(3)))
Traceback (most recent call last):
...
TypeError: data is a one-shot iterator (generator): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Batch = Any


class DataSource:
    """The user's ``data=`` as something to iterate once per pass.

    Parameters
    ----------
    data : (x, y), iterable of batches, or callable returning an iterator
        See the module docstring.
    batch_fn : callable, optional
        Maps each raw batch to ``(x, y)`` (e.g. ``lambda b: (b["input_ids"], b["labels"])``).
    cache : bool
        Hold the batches of a one-shot iterator (a generator) in memory, so
        that it can be passed over more than once.  Without it, a one-shot
        iterator is refused: a second pass would silently see no data.
    """

    def __init__(self, data: Any, batch_fn: Callable[[Any], Any] | None = None, cache: bool = False) -> None:
        if batch_fn is not None and not callable(batch_fn):
            raise TypeError(f"batch_fn must be a callable batch -> (x, y), got {type(batch_fn).__name__}")
        self.batch_fn = batch_fn
        self._factory: Callable[[], Iterator[Any]]
        self.single: Batch | None = None
        if _is_one_batch(data, batch_fn):
            self.single = self._pair(data, 0)
            self._factory = lambda: iter([self.single])
        elif callable(data) and not hasattr(data, "__iter__"):
            self._factory = data
        elif hasattr(data, "__iter__"):
            if iter(data) is data:  # an iterator or a generator: it cannot start over
                if not cache:
                    raise TypeError(
                        f"data is a one-shot iterator ({type(data).__name__}): a second pass would see no batches. "
                        "Pass a list, a DataLoader or tf.data.Dataset, a zero-argument function returning a fresh "
                        "iterator (data=lambda: make_batches()), or cache_data=True to hold its batches in memory"
                    )
                data = list(data)
            self._factory = lambda: iter(data)
        else:
            raise TypeError(
                f"data must be one batch (x, y), an iterable of batches or a function returning an iterator, "
                f"got {type(data).__name__}"
            )
        self._length = len(data) if hasattr(data, "__len__") and self.single is None else None

    @property
    def num_batches(self) -> int | None:
        """Number of batches per pass when known in advance (``len(data)``), else ``None``."""
        return 1 if self.single is not None else self._length

    def __iter__(self) -> Iterator[Batch]:
        """One pass: the batches as ``(x, y)`` pairs, read lazily."""
        if self.single is not None:
            yield self.single
            return
        count = 0
        for raw in self._factory():
            for part in _replica_parts(raw):
                yield self._pair(part, count)
                count += 1
        if count == 0:
            raise ValueError("data is empty: a pass over it gave no batch; give at least one batch (x, y)")

    def _pair(self, raw: Any, index: int) -> Batch:
        batch = self.batch_fn(raw) if self.batch_fn is not None else raw
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return tuple(batch)
        if isinstance(batch, dict) or hasattr(batch, "keys"):
            raise TypeError(
                f"batch {index} of data is a mapping with keys {sorted(map(str, batch.keys()))}, not a pair (x, y); "
                'say which entries are inputs and targets with batch_fn=lambda b: (b["input"], b["label"])'
            )
        what = "batch_fn returned" if self.batch_fn is not None else f"batch {index} of data is"
        raise TypeError(f"{what} {type(batch).__name__}, not a pair (x, y); pass batch_fn= to build one")


def _replica_parts(batch: Any) -> list[Any]:
    """The per-replica slices of a batch from a ``tf.distribute`` distributed dataset, else the batch itself.

    Under ``MirroredStrategy`` a distributed dataset yields ``PerReplica``
    values, one slice of the global batch per replica.  Each slice is a
    batch of its own here (on its replica's device); the sample-weighted sum
    over slices gives the result of the whole global batch.
    """
    leaves = batch if isinstance(batch, (tuple, list)) else (batch,)
    if not any(type(leaf).__name__ == "PerReplica" for leaf in leaves):
        return [batch]
    per_leaf = [leaf.values if type(leaf).__name__ == "PerReplica" else None for leaf in leaves]
    replicas = len(next(v for v in per_leaf if v is not None))
    return [type(batch)(v[r] if v is not None else leaf for v, leaf in zip(per_leaf, leaves)) for r in range(replicas)]


def _is_one_batch(data: Any, batch_fn: Callable[[Any], Any] | None) -> bool:
    """Whether ``data`` is itself one batch rather than a source of batches."""
    if batch_fn is not None:
        # With batch_fn, a mapping is one raw batch; anything iterable is a source.
        return isinstance(data, dict)
    # ``(x, y)`` is one batch; so is ``((x_a, x_b), y)`` for a model with two inputs.  A
    # list whose first entry is itself a pair is a list of batches.
    if isinstance(data, (tuple, list)) and len(data) == 2:
        if all(hasattr(entry, "keys") for entry in data):  # two records (dicts): a list of batches
            return False
        return not _looks_like_pair(data[0]) or (isinstance(data, tuple) and not _looks_like_pair(data[1]))
    return False


def _looks_like_pair(obj: Any) -> bool:
    """Whether ``obj`` is itself an ``(x, y)`` pair, i.e. ``data`` is a list of batches."""
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and not hasattr(obj, "shape")
